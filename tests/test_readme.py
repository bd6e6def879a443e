"""The README's Python examples run as written, from a fresh folder, with the repository on the path."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def readme_example(name: str) -> str:
    """The fenced Python block that follows `<!-- test: name -->` in README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- test: {name} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md has no example marked <!-- test: {name} -->"
    return match.group(1)


def run_example(name: str, cwd, epilogue: str = "") -> subprocess.CompletedProcess:
    # One thread: on a shared 2-core machine, spinning OpenMP threads slow small models down tenfold.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", readme_example(name) + epilogue], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quickstart_example(tmp_path):
    result = run_example("quickstart", tmp_path)
    assert "torch.Size([1, 3])" in result.stdout
    assert (tmp_path / "outputs/my-vit/model.safetensors").exists()


@pytest.mark.filterwarnings("ignore")
def test_trainer_example_learns_the_digits(tmp_path):
    epilogue = "\nimport json\nprint(json.dumps({'log': trainer.state.log_history, 'eval': trainer.evaluate()}))\n"
    result = run_example("trainer", tmp_path, epilogue)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    losses = [entry["loss"] for entry in report["log"] if "loss" in entry]
    assert losses[-1] < losses[0] / 3
    assert report["eval"]["eval_accuracy"] >= 0.9


def test_explain_example_returns_attention_under_sdpa_and_runs_grad_cam(tmp_path):
    result = run_example("explain", tmp_path)
    assert result.stdout.split() == ["12", "(2,", "112,", "112)"]

"""A run killed part-way resumes from its checkpoints to exactly what an uninterrupted run ends with."""

import json
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO_ROOT
from finetune_helpers import TINY_MODEL, fresh_accelerate_state, run_main, script_env
from safetensors.torch import load_file

import run_finetune

# 3 epochs of 12 steps, a checkpoint every 4 steps, dropout so that the random state matters too.
RESUMABLE_RUN = [
    *TINY_MODEL,
    "--num_train_epochs", 3, "--max_train_samples", 96, "--max_eval_samples", 40,
    "--per_device_train_batch_size", 8, "--checkpointing_steps", 4, "--hidden_dropout_prob", 0.1,
]  # fmt: skip


def test_killed_run_resumes_to_the_same_weights_and_metrics(tmp_path):
    run_main(*RESUMABLE_RUN, "--output_dir", tmp_path / "reference")

    killed_dir = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "run_finetune.py"), *map(str, RESUMABLE_RUN), "--output_dir", killed_dir],
            cwd=REPO_ROOT, env=script_env(), stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while not (killed_dir / "checkpoint-4").exists():  # mid-way through the first epoch
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed"
        process.kill()
        process.wait()
    assert not (killed_dir / "all_results.json").exists()

    run_main(*RESUMABLE_RUN, "--output_dir", killed_dir, "--resume_from_checkpoint", "latest")

    reference_weights = load_file(tmp_path / "reference" / "model.safetensors")
    resumed_weights = load_file(killed_dir / "model.safetensors")
    assert reference_weights.keys() == resumed_weights.keys()
    for name, tensor in reference_weights.items():  # the promise: the same weights, bit for bit
        assert torch.equal(resumed_weights[name], tensor), name
    reference_results = json.loads((tmp_path / "reference" / "all_results.json").read_text())
    resumed_results = json.loads((killed_dir / "all_results.json").read_text())
    for timing in ("train_runtime", "train_loop_samples_per_second", "seconds_to_first_step"):
        reference_results.pop(timing), resumed_results.pop(timing)
    # Metrics come from the same weights evaluated in two processes: equal within fp32 rounding.
    assert resumed_results == pytest.approx(reference_results, rel=1e-6, abs=1e-9)
    assert [p.name for p in run_finetune.list_checkpoints(killed_dir)] == [f"checkpoint-{s}" for s in range(4, 37, 4)]


class Killed(BaseException):
    """Stands for the process being killed: nothing after it runs."""


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_to_resume_from(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    save_state = Accelerator.save_state

    def save_state_killed_at_step_8(self, output_dir, **kwargs):
        if output_dir.endswith("checkpoint-8"):
            save_state(self, output_dir, **kwargs)  # everything is written, but the folder is not renamed yet
            raise Killed
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state_killed_at_step_8)
    with pytest.raises(Killed):
        run_main(*RESUMABLE_RUN, "--output_dir", output_dir)
    monkeypatch.setattr(Accelerator, "save_state", save_state)

    assert [p.name for p in run_finetune.list_checkpoints(output_dir)] == ["checkpoint-4"]
    assert (output_dir / "tmp" / "checkpoint-8").is_dir()  # the unfinished save, never taken for a checkpoint
    assert run_finetune.find_checkpoint("latest", output_dir) == output_dir / "checkpoint-4"

    results = run_main(*RESUMABLE_RUN, "--output_dir", output_dir, "--resume_from_checkpoint", "latest")
    assert results["epoch"] == 3
    assert (output_dir / "checkpoint-8" / "model.safetensors").is_file()


def fake_run_folder(folder, steps=(4, 8, 12)):
    """A folder as a run leaves it: checkpoints, results, and a file of the user's own."""
    for step in steps:
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "custom_checkpoint_0.pkl").write_bytes(b"state")
    for name in ("model.safetensors", "all_results.json", "README.md"):
        (folder / name).write_text("old run")
    (folder / "notes.txt").write_text("mine")


def prepare(folder, *flags, checkpoint=None):
    with fresh_accelerate_state():
        args = run_finetune.parse_args([*map(str, flags), "--output_dir", str(folder)])
        run_finetune.prepare_output_dir(folder, checkpoint, args, run_finetune.create_accelerator(args))


def test_overwrite_deletes_the_previous_runs_outputs_and_checkpoints_only(tmp_path):
    fake_run_folder(tmp_path)
    prepare(tmp_path, "--overwrite_output_dir")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_resuming_from_an_older_checkpoint_drops_the_abandoned_newer_ones(tmp_path):
    fake_run_folder(tmp_path)
    prepare(tmp_path, "--resume_from_checkpoint", tmp_path / "checkpoint-4", checkpoint=tmp_path / "checkpoint-4")
    assert run_finetune.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "notes.txt").exists()


def test_overwrite_while_resuming_from_another_folder_clears_this_one(tmp_path):
    fake_run_folder(tmp_path / "old")
    fake_run_folder(tmp_path / "new", steps=(50,))
    source = tmp_path / "old" / "checkpoint-4"
    prepare(tmp_path / "new", "--overwrite_output_dir", "--resume_from_checkpoint", source, checkpoint=source)
    assert run_finetune.list_checkpoints(tmp_path / "new") == []
    assert run_finetune.list_checkpoints(tmp_path / "old") == [tmp_path / "old" / f"checkpoint-{s}" for s in (4, 8, 12)]

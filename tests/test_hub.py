"""Sharing on the Hub for real: push, pull and reload through the unmodified clients and a local test Hub.

Every client runs in a fresh process with an empty `HF_HOME` (see `hub_fixtures.py`); the test Hub is
`hub_server.py`, which keeps the repos as git repositories and the large files in an LFS store.
"""

import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, assert_same_outputs, tiny_config
from hub_fixtures import Hub
from test_readme import readme_example


HF_CLI = str(Path(sys.executable).with_name("hf"))


@pytest.fixture
def hub(tmp_path):
    with Hub(tmp_path / "hub", tmp_path / "clients") as hub:
        yield hub


# Pushes two versions of a tiny model and its image processor, and records the logits each gives on one image.
PUSH_TWO_VERSIONS = """
import json, sys
import numpy as np, torch
from PIL import Image
from huggingface_hub import HfApi

repo_id, repo_root, config_file, out = sys.argv[1:]
sys.path.insert(0, repo_root)
from configuration_vit_custom import ViTCustomConfig
from modeling_vit_custom import ViTCustomForImageClassification
from transformers import ViTImageProcessor

processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
image.save(f"{out}/image.png")
pixel_values = processor(image, return_tensors="pt").pixel_values
commits, logits = [], []
for seed in (0, 1):
    torch.manual_seed(seed)
    model = ViTCustomForImageClassification(ViTCustomConfig.from_json_file(config_file)).eval()
    model.push_to_hub(repo_id)
    commits.append(processor.push_to_hub(repo_id).oid)
    with torch.no_grad():
        logits.append(model(pixel_values).logits)
torch.save(torch.stack(logits), f"{out}/pushed_logits.pt")
info = HfApi().model_info(repo_id, files_metadata=True)
print(json.dumps({"commits": commits, "lfs": {s.rfilename: s.lfs is not None for s in info.siblings}}))
"""

# Loads the latest and a pinned version through the Auto classes and the pipeline, as a user would.
LOAD_LATEST_AND_PINNED = """
import json, sys
import torch
from PIL import Image
from huggingface_hub import hf_hub_download
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

repo_id, pinned_commit, out = sys.argv[1:]
image = Image.open(f"{out}/image.png")
processor = AutoImageProcessor.from_pretrained(repo_id)
pixel_values = processor(image, return_tensors="pt").pixel_values
pinned = AutoModelForImageClassification.from_pretrained(repo_id, revision=pinned_commit, trust_remote_code=True)
latest = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)
with torch.no_grad():
    torch.save(torch.stack([pinned.eval()(pixel_values).logits, latest.eval()(pixel_values).logits]), f"{out}/loaded_logits.pt")
classify = pipeline("image-classification", model=repo_id, trust_remote_code=True)
try:
    AutoModelForImageClassification.from_pretrained(repo_id, revision="no-such-branch", trust_remote_code=True)
    missing_revision = "loaded"
except OSError as error:
    missing_revision = str(error)
print(json.dumps({
    "processor": type(processor).__name__,
    "modules": [type(pinned).__module__, type(latest).__module__],
    "auto_map": json.load(open(hf_hub_download(repo_id, "config.json")))["auto_map"],
    "pipeline": classify(image),
    "missing_revision": missing_revision,
}))
"""


def test_push_then_load_in_fresh_process_gives_the_same_logits_and_pinned_revision(hub, tmp_path):
    repo_id = "user/vit-tiny"
    config_file = tmp_path / "config.json"
    tiny_config().to_json_file(config_file)
    pushed = hub.run_python(PUSH_TWO_VERSIONS, repo_id, REPO_ROOT, config_file, tmp_path, name="push")
    first_commit, latest_commit = pushed["commits"]
    assert first_commit != latest_commit
    assert pushed["lfs"] == {
        ".gitattributes": False,
        "README.md": False,
        "config.json": False,
        "configuration_vit_custom.py": False,
        "model.safetensors": True,
        "modeling_vit_custom.py": False,
        "preprocessor_config.json": False,
    }

    loaded = hub.run_python(LOAD_LATEST_AND_PINNED, repo_id, first_commit, tmp_path, name="load")

    pushed_logits, loaded_logits = torch.load(tmp_path / "pushed_logits.pt"), torch.load(tmp_path / "loaded_logits.pt")
    # Another process, and weights read from a memory-mapped file: equal within fp32 rounding, not bit for bit.
    assert_same_outputs(loaded_logits[1], pushed_logits[1])
    pinned = "the pinned revision must give the first push's weights"
    assert_same_outputs(loaded_logits[0], pushed_logits[0], msg=pinned)
    assert not torch.allclose(pushed_logits[0], pushed_logits[1], rtol=1e-3, atol=1e-3)
    # The code ran from the Hub, each model from its own commit's copy of it.
    assert loaded["modules"] == [
        f"transformers_modules.user.vit_hyphen_tiny.{first_commit}.modeling_vit_custom",
        f"transformers_modules.user.vit_hyphen_tiny.{latest_commit}.modeling_vit_custom",
    ]
    assert set(loaded["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
        "AutoModelForMaskedImageModeling",
    }
    assert loaded["processor"] == "ViTImageProcessor"
    scores = {p["label"]: p["score"] for p in loaded["pipeline"]}
    expected = pushed_logits[1, 0].softmax(-1)
    assert scores == pytest.approx({f"LABEL_{i}": p for i, p in enumerate(expected.tolist())}, rel=1e-6)
    assert "is not a valid git identifier" in loaded["missing_revision"]


# Pushes two versions of a transformers ViT, then imports each through vit_loading.load_model by revision.
IMPORT_PINNED_REVISION = """
import json, sys
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

repo_id, repo_root = sys.argv[1:]
sys.path.insert(0, repo_root)
import vit_loading

config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, num_labels=3)
pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
commits, pushed_logits = [], []
for seed, mean in ((0, 0.3), (1, 0.6)):
    torch.manual_seed(seed)
    vit = ViTForImageClassification(config).eval()
    vit.push_to_hub(repo_id)
    commits.append(ViTImageProcessor(image_mean=[mean] * 3, image_std=[0.2] * 3).push_to_hub(repo_id).oid)
    with torch.no_grad():
        pushed_logits.append(vit(pixel_values).logits)

def import_logits(revision):
    with torch.no_grad():
        return vit_loading.load_model(repo_id, revision=revision)[0](pixel_values).logits

def error_of(call):
    try:
        call()
    except (OSError, ValueError) as error:
        return f"{type(error).__name__}: {error}"

def difference(a, b):
    return (a - b).abs().max().item()

first, latest = import_logits(commits[0]), import_logits(None)
print(json.dumps({
    "first vs first push": difference(first, pushed_logits[0]),
    "first vs second push": difference(first, pushed_logits[1]),
    "latest vs second push": difference(latest, pushed_logits[1]),
    "first image_mean": vit_loading.load_model(repo_id, revision=commits[0])[1].image_mean,
    "missing revision": error_of(lambda: vit_loading.load_model(repo_id, revision="no-such-branch")),
    "local path with revision": error_of(lambda: vit_loading.resolve_source(repo_root, revision=commits[0])),
}))
"""


def test_load_model_reads_the_pinned_revision_of_a_hub_repo(hub):
    imported = hub.run_python(IMPORT_PINNED_REVISION, "user/vit-two-versions", REPO_ROOT, name="import")
    assert imported["first vs first push"] < 1e-5
    assert imported["first vs second push"] > 1e-3
    assert imported["latest vs second push"] < 1e-5
    assert imported["first image_mean"] == [0.3] * 3
    assert "at revision 'no-such-branch'" in imported["missing revision"]
    assert imported["local path with revision"].startswith("ValueError: revision=")


HUB_ERRORS = """
import json, os, sys
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

repo_id = sys.argv[1]
api = HfApi()
api.create_repo(repo_id)
first_commit = api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id).oid
api.upload_file(path_or_fileobj=b"{}", path_in_repo="folder/config.json", repo_id=repo_id)
api.upload_file(path_or_fileobj=b"{}", path_in_repo="kept.json", repo_id=repo_id)
api.delete_file("config.json", repo_id=repo_id)
api.delete_folder("folder", repo_id=repo_id)
api.create_branch(repo_id, branch="dev")
api.upload_file(path_or_fileobj=b"{}", path_in_repo="dev.json", repo_id=repo_id, revision="dev")
checks = {
    "file of a branch": lambda: hf_hub_download(repo_id, "dev.json", revision="dev"),
    "file of a branch, on main": lambda: hf_hub_download(repo_id, "dev.json"),
    "branch created twice": lambda: api.create_branch(repo_id, branch="dev"),
    "branch created twice, exist_ok": lambda: api.create_branch(repo_id, branch="dev", exist_ok=True),
    "kept file": lambda: hf_hub_download(repo_id, "kept.json"),
    "deleted file": lambda: hf_hub_download(repo_id, "config.json"),
    "deleted file, at an older commit": lambda: hf_hub_download(repo_id, "config.json", revision=first_commit),
    "file of a deleted folder": lambda: hf_hub_download(repo_id, "folder/config.json"),
    "deletion of a missing file": lambda: api.delete_file("missing.json", repo_id=repo_id),
    "missing repo": lambda: hf_hub_download("user/missing", "config.json"),
    "missing file": lambda: hf_hub_download(repo_id, "missing.json"),
    "missing branch": lambda: hf_hub_download(repo_id, "config.json", revision="no-such-branch"),
    "missing commit": lambda: hf_hub_download(repo_id, "config.json", revision="0" * 40),
    "info of missing repo": lambda: api.model_info("user/missing"),
    "info of missing revision": lambda: api.model_info(repo_id, revision="no-such-branch"),
    "upload to missing repo": lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="user/missing"),
    "repo created twice": lambda: api.create_repo(repo_id),
    "repo created twice, exist_ok": lambda: api.create_repo(repo_id, exist_ok=True),
}

def outcome(check):
    try:
        check()
    except Exception as error:
        return f"{type(error).__name__} {error.response.status_code}"
    return "ok"

print(json.dumps({
    "outcomes": {name: outcome(check) for name, check in checks.items()},
    "files on main": api.list_repo_files(repo_id),
    "snapshot of dev": sorted(os.listdir(snapshot_download(repo_id, revision="dev"))),
}))
"""


def test_hub_server_keeps_branches_and_history_and_answers_with_the_hubs_errors(hub):
    found = hub.run_python(HUB_ERRORS, "user/errors", name="errors")

    assert found["files on main"] == [".gitattributes", "kept.json"]
    assert found["snapshot of dev"] == [".gitattributes", "dev.json", "kept.json"]
    assert found["outcomes"] == {
        "file of a branch": "ok",
        "file of a branch, on main": "RemoteEntryNotFoundError 404",
        "branch created twice": "HfHubHTTPError 409",
        "branch created twice, exist_ok": "ok",
        "kept file": "ok",
        "deleted file": "RemoteEntryNotFoundError 404",
        "deleted file, at an older commit": "ok",
        "file of a deleted folder": "RemoteEntryNotFoundError 404",
        "deletion of a missing file": "RemoteEntryNotFoundError 404",
        "missing repo": "RepositoryNotFoundError 404",
        "missing file": "RemoteEntryNotFoundError 404",
        "missing branch": "RevisionNotFoundError 404",
        "missing commit": "RevisionNotFoundError 404",
        "info of missing repo": "RepositoryNotFoundError 404",
        "info of missing revision": "RevisionNotFoundError 404",
        "upload to missing repo": "RepositoryNotFoundError 404",
        "repo created twice": "HfHubHTTPError 409",
        "repo created twice, exist_ok": "ok",
    }


VALID_CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: image-classification
tags:
- vision
- vit-custom
datasets:
- beans
model-index:
- name: vit-custom-beans
  results:
  - task:
      type: image-classification
      name: Image Classification
    dataset:
      type: beans
      name: Beans
      split: validation
    metrics:
    - type: accuracy
      value: 0.93
      name: Accuracy
---

# vit-custom fine-tuned on beans
"""

VALIDATE_CARDS = """
import json, sys
from huggingface_hub import HfApi, ModelCard

repo_id, cards = sys.argv[1], json.loads(sys.argv[2])
api = HfApi()
api.create_repo(repo_id)

def outcome(check):
    try:
        check()
    except Exception as error:
        return str(error)
    return "valid"

print(json.dumps({
    name: {
        "validate": outcome(lambda: ModelCard(text).validate()),
        "upload": outcome(lambda: api.upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id=repo_id)),
    }
    for name, text in cards.items()
}))
"""


def test_model_card_validation_checks_metadata_like_the_hub(hub):
    cards = {
        "valid": VALID_CARD,
        "unknown license": VALID_CARD.replace("apache-2.0", "apache"),
        "unknown pipeline tag": VALID_CARD.replace("pipeline_tag: image-classification", "pipeline_tag: vision"),
        "model-index without value": VALID_CARD.replace("      value: 0.93\n", ""),
        "broken yaml": VALID_CARD.replace("- vision", "- [vision"),
    }

    results = hub.run_python(VALIDATE_CARDS, "user/card", json.dumps(cards), name="cards")

    assert results["valid"] == {"validate": "valid", "upload": "valid"}
    license_error = '"license" must be a license identifier of the Hub, not "apache"'
    assert license_error in results["unknown license"]["validate"]
    assert license_error in results["unknown license"]["upload"]
    assert '"pipeline_tag" must be a task of the Hub, not "vision"' in results["unknown pipeline tag"]["validate"]
    # `ModelCard` itself refuses these two before asking the Hub; the upload sends the README.md as it is.
    index_error = '"model-index[0].results[0].metrics[0].value" is required'
    assert index_error in results["model-index without value"]["upload"]
    assert "Invalid YAML" in results["broken yaml"]["upload"]
    assert all(result["upload"].startswith("Invalid metadata in README.md") for result in list(results.values())[1:])
    # Refused uploads commit nothing: the repo keeps the valid card.
    repos = hub.server.repos
    files = repos.files("user/card", repos.resolve("user/card", "main"))
    assert repos.read("user/card", files["README.md"].blob_id).decode() == VALID_CARD


def finetune_command(output_dir: Path, repo_id: str) -> list[str]:
    """`run_finetune.py` on 64 digits for 2 steps of a tiny model, saving a checkpoint at each step, then pushing."""
    config = tiny_config()
    model_flags = [
        flag
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        for flag in (f"--{name}", str(getattr(config, name)))
    ]
    return [
        sys.executable,
        str(REPO_ROOT / "run_finetune.py"),
        *model_flags,
        *("--max_train_samples", "64", "--max_eval_samples", "32", "--max_train_steps", "2"),
        *("--checkpointing_steps", "1", "--cpu", "--output_dir", str(output_dir)),
        *("--push_to_hub", "--hub_model_id", repo_id),
    ]


# Loads the model card from the Hub, has the Hub validate it, and returns its metadata.
LOAD_AND_VALIDATE_CARD = """
import json, sys
from huggingface_hub import ModelCard

card = ModelCard.load(sys.argv[1])
card.validate()
print(json.dumps(card.data.to_dict()))
"""


def test_run_finetune_pushes_its_output_folder_with_a_valid_model_card_but_no_checkpoints(hub, tmp_path):
    output_dir = tmp_path / "digits"

    hub.run(finetune_command(output_dir, "user/digits"), name="finetune")

    local = file_hashes(output_dir)
    assert any(path.startswith("checkpoint-") for path in local)
    final_files = {path: digest for path, digest in local.items() if not path.startswith(("checkpoint-", "tmp/"))}
    assert {"README.md", "training_curves.png", "all_results.json", "model.safetensors"} <= set(final_files)
    assert hub_file_hashes(hub, "user/digits", "main") == final_files
    # The model card's loading snippet pins the commit that holds the weights.
    pinned = re.search(r'revision="([0-9a-f]{40})"', (output_dir / "README.md").read_text()).group(1)
    assert hub_file_hashes(hub, "user/digits", pinned)["model.safetensors"] == final_files["model.safetensors"]

    card = hub.run_python(LOAD_AND_VALIDATE_CARD, "user/digits", name="card")

    results = json.loads((output_dir / "all_results.json").read_text())
    (evaluation,) = card["model-index"][0]["results"]
    assert {metric["type"]: metric["value"] for metric in evaluation["metrics"]} == {
        "accuracy": round(results["test_accuracy"], 4),
        "top5_accuracy": round(results["test_top5_accuracy"], 4),
    }
    assert card["library_name"] == "transformers"
    assert card["pipeline_tag"] == "image-classification"
    assert "vit-custom" in card["tags"]
    assert card.get("license"), "the model card must declare a license"
    assert evaluation["dataset"]["type"] in card.get("datasets", []), "the model card must list its dataset"


def test_run_finetune_failed_push_reports_error_keeps_output_and_suggested_upload_succeeds(hub, tmp_path):
    output_dir = tmp_path / "digits"

    hub.server.stop_before("commit")
    failed = hub.run(finetune_command(output_dir, "user/digits"), name="failed-push", check=False)

    assert failed.returncode != 0
    assert "Server disconnected without sending a response" in failed.stderr
    local = file_hashes(output_dir)
    assert {"README.md", "training_curves.png", "all_results.json", "model.safetensors", "config.json"} <= set(local)
    assert any(path.startswith("checkpoint-") for path in local)
    # The weights reached the Hub's storage, but no commit did.
    assert ("PUT", "lfs_upload", 200) in hub.server.requests
    hub.restart()
    repos = hub.server.repos
    assert list(repos.files("user/digits", repos.resolve("user/digits", "main"))) == [".gitattributes"]

    # A second push, with the command the error message gives.
    upload = shlex.split(re.search(r"`(hf upload [^`]+)`", failed.stderr).group(1))
    hub.run([HF_CLI, *upload[1:]], name="second-push")

    assert hub_file_hashes(hub, "user/digits", "main") == {
        path: digest for path, digest in local.items() if not path.startswith(("checkpoint-", "tmp/"))
    }
    # The second push does not send the weights again.
    assert not [request for request in hub.server.requests if request[1] == "lfs_upload"]


def test_readme_hub_example_pushes_and_loads_a_pinned_commit(hub):
    example = f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n" + readme_example("hub")

    hub.run([sys.executable, "-I", "-c", example], name="readme")

    (repo,) = (hub.root / "models").glob("*/*.git")
    repo_id = repo.relative_to(hub.root / "models").as_posix().removesuffix(".git")
    files = hub.server.repos.files(repo_id, hub.server.repos.resolve(repo_id, "main"))
    assert {"model.safetensors", "config.json", "modeling_vit_custom.py", "preprocessor_config.json"} <= set(files)


def file_hashes(folder: Path) -> dict[str, str]:
    """The sha256 of every file under `folder`, by path relative to it."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def hub_file_hashes(hub, repo_id: str, revision: str) -> dict[str, str]:
    """The sha256 of the content of every file of a Hub repo at `revision`, but its `.gitattributes`."""
    repos = hub.server.repos
    files = repos.files(repo_id, repos.resolve(repo_id, revision))
    return {
        path: file.lfs_oid or hashlib.sha256(repos.read(repo_id, file.blob_id)).hexdigest()
        for path, file in files.items()
        if path != ".gitattributes"
    }

"""--push_to_hub uploads the output folder without checkpoints and pins the model card; failures lose nothing.

A stand-in for `huggingface_hub.HfApi` records the calls; tests/test_hub*.py push to a local Hub server instead.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
from finetune_helpers import SHORT_RUN, TINY_MODEL, run_main
from huggingface_hub.utils import filter_repo_objects

import finetune_utils
from finetune_utils import FinetuneError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PUSHED_RUN = [*TINY_MODEL, *SHORT_RUN, "--checkpointing_steps", 2, "--push_to_hub", "--hub_model_id", "me/digits"]


class FakeHub:
    """Stands for `HfApi`: records what would be uploaded, and fails the upload when told to."""

    def __init__(self, fail_upload: bool = False):
        self.fail_upload = fail_upload
        self.uploaded: list[str] = []
        self.readme_uploads: list[str] = []

    def __call__(self, token=None):  # `HfApi(token=...)`
        return self

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns, **kwargs):
        if self.fail_upload:
            raise ConnectionError("[Errno 111] Connection refused")
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        self.uploaded = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        return SimpleNamespace(oid=COMMIT)

    def upload_file(self, *, path_or_fileobj, path_in_repo, **kwargs):
        assert path_in_repo == "README.md"
        self.readme_uploads.append(Path(path_or_fileobj).read_text())


def test_push_uploads_the_folder_without_checkpoints_and_pins_the_card_to_the_commit(tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(finetune_utils, "HfApi", hub)

    run_main(*PUSHED_RUN, "--output_dir", tmp_path / "out")

    assert {"model.safetensors", "config.json", "README.md", "training_curves.png"} <= set(hub.uploaded)
    assert {"modeling_vit_custom.py", "configuration_vit_custom.py", "preprocessor_config.json"} <= set(hub.uploaded)
    assert not [name for name in hub.uploaded if name.startswith(("checkpoint-", "tmp/"))]
    assert (tmp_path / "out" / "checkpoint-2").is_dir()  # kept locally
    assert len(hub.readme_uploads) == 1
    assert f'model="me/digits", trust_remote_code=True, revision="{COMMIT}"' in hub.readme_uploads[0]
    assert (tmp_path / "out" / "README.md").read_text() == hub.readme_uploads[0]


def test_a_failed_upload_names_the_problem_and_leaves_the_output_folder_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(finetune_utils, "HfApi", FakeHub(fail_upload=True))

    with pytest.raises(FinetuneError) as error:
        run_main(*PUSHED_RUN, "--output_dir", tmp_path / "out")

    message = str(error.value)
    assert "everything is saved in" in message and "Connection refused" in message
    assert "hf upload me/digits" in message and "--exclude 'checkpoint-*' --exclude 'tmp/*'" in message
    for name in ("model.safetensors", "config.json", "README.md", "all_results.json", "training_curves.png"):
        assert (tmp_path / "out" / name).is_file()

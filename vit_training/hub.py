"""Sharing on the Hugging Face Hub: the repo created before training, the output folder uploaded after it."""

import logging
import shlex
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi

from vit_training.checkpoints import STAGING_DIR
from vit_training.errors import TrainingError
from vit_training.reporting import CARD_FILE

logger = logging.getLogger(__name__)

# The output folder goes to the Hub without its checkpoints and unfinished checkpoint saves (`*` matches across `/`).
NOT_UPLOADED = ["checkpoint-*", f"{STAGING_DIR}/*"]


def create_hub_repo(name: str, token: str | None = None, private: bool = False, branch: str | None = None) -> str:
    """Create (or find) the Hub repo `name` (`user/name`, or a name in the token's namespace) and its `branch`, before
    training, so that a missing token or connection shows up at once. Returns the repo id."""
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(name, private=private, exist_ok=True).repo_id
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    except Exception as error:
        raise TrainingError(
            f"Cannot push to the Hub: creating the repo {name!r} failed ({error}). "
            "Check your connection, that HF_HUB_OFFLINE is not set, and your token (`hf auth login` or "
            "--hub_token); or drop --push_to_hub. Nothing was trained or written."
        ) from error
    return repo_id


def push_to_hub(
    output_dir: Path, repo_id: str, write_card: Callable[[str], None], token: str | None = None,
    branch: str | None = None,
):
    """Upload the output folder without its checkpoints, then rewrite its model card with `write_card(commit)` and
    upload it, to pin the card's loading snippet to that upload's commit."""
    api = HfApi(token=token)
    try:
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            revision=branch,
            ignore_patterns=NOT_UPLOADED,
            commit_message="Upload vit-custom model trained with run_finetune.py",
        )
        write_card(commit.oid)
        api.upload_file(
            path_or_fileobj=output_dir / CARD_FILE,
            path_in_repo=CARD_FILE,
            repo_id=repo_id,
            revision=branch,
            commit_message=f"Pin the model card's loading snippet to {commit.oid[:8]}",
        )
    except Exception as error:
        raise TrainingError(
            f"Training finished and everything is saved in {output_dir}, but uploading it to {repo_id} failed "
            f"({error}). Upload it later with `hf upload {repo_id} {shlex.quote(str(output_dir))} "
            + " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in NOT_UPLOADED)
            + "`."
        ) from error
    logger.info(f"Pushed {output_dir} to {commit.repo_url} at commit {commit.oid}")

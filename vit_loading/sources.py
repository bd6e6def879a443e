"""Where a checkpoint comes from and what it holds: a local path or a Hub repo, its kind, its config and its tensors."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from vit_loading.folders import shorten

if TYPE_CHECKING:
    import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# What a transformers preprocessor_config.json holds that the model's own image processor takes over.
PREPROCESSING_FIELDS = ("image_mean", "image_std", "resample")


def resolve_source(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local path as it is; otherwise a Hub repo id at `revision`, downloaded (configs and weights only) or found in
    the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    path = Path(path_or_repo)
    if path.exists():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} picks a version of a Hub repo, but {str(path)!r} is a local path, which has "
                "one version. Drop the revision, or pass the Hub repo id."
            )
        return path
    repo_id = str(path_or_repo)
    try:
        download = functools.partial(snapshot_download, repo_id, revision=revision)
        folder = Path(download(allow_patterns=["*.json", "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(download(allow_patterns=["*.json", "*.bin", "*.pth"]))
    except (HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as error:
        at_revision = f" at revision {revision!r}" if revision is not None else ""
        download_command = f"hf download {repo_id}" + (f" --revision {revision}" if revision is not None else "")
        raise FileNotFoundError(
            f"{repo_id!r} is not a local file or folder, and not a Hub repo that could be downloaded{at_revision} or "
            f"found in the cache ({type(error).__name__}: {error}). Offline (HF_HUB_OFFLINE=1) a repo must already "
            f"be cached: fetch it with `{download_command}` where there is internet access, or pass a local folder."
        ) from error
    return folder


def identify_checkpoint(source: Path) -> tuple[str, dict]:
    """The kind of a local checkpoint, `"vit"`, `"timm"` or `"vit_custom"`, and its config.json (empty if none)."""
    config_file = source / "config.json"
    if not source.is_dir() or not config_file.is_file():
        # A bare state dict: only timm's layout describes its own sizes, so it is read as timm's.
        return "timm", {}
    config = read_json(config_file)
    if "architecture" in config and "model_type" not in config:
        return "timm", config
    model_type = config.get("model_type")
    if model_type not in ("vit", "vit_custom"):
        raise ValueError(
            f"{source} holds a {model_type!r} checkpoint ({', '.join(config.get('architectures') or [])}). Only "
            "transformers ViT (model_type 'vit'), timm VisionTransformer and vit-custom checkpoints can be imported."
        )
    return model_type, config


def folder_preprocessing(source: Path) -> dict:
    """The mean, std and resampling of a transformers folder's `preprocessor_config.json`: those it states."""
    processor_file = source / "preprocessor_config.json"
    settings = read_json(processor_file) if processor_file.is_file() else {}
    return {name: settings[name] for name in PREPROCESSING_FIELDS if name in settings}


def read_weights(source: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, or of the (possibly sharded) weights of a folder, on the CPU.

    Raises:
        ValueError: a file is truncated or corrupt, or holds something other than named tensors; the message names it.
    """
    files = [source] if source.is_file() else _weight_files(source)
    state_dict = {}
    for file in files:
        state_dict.update(_read_safetensors(file) if file.suffix == ".safetensors" else _read_torch_weights(file))
    return state_dict


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a ValueError naming the file when it is not one."""
    try:
        content = json.loads(path.read_text())
    except ValueError as error:  # invalid JSON or text
        raise ValueError(f"{path} is not valid JSON ({error}); restore the file or download it again.") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}, not an object; restore the file.")
    return content


def _weight_files(folder: Path) -> list[Path]:
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index} has no weight_map; restore the file or download it again.")
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    candidates = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pth"))
    if len(candidates) == 1:
        return candidates
    raise FileNotFoundError(
        f"No weights in {folder}: expected {' or '.join(WEIGHT_FILES)}, a sharded index, or a single .safetensors or "
        f".pth file (found {[path.name for path in candidates]})."
    )


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as error:
        raise ValueError(
            f"{file} is not a readable safetensors file, it is truncated or corrupt ({error}). Download or save it "
            "again."
        ) from error


def _read_torch_weights(file: Path) -> dict[str, torch.Tensor]:
    """The named tensors of a `torch.save` file (.pth, .bin), unpickling nothing else."""
    import torch

    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a truncated or foreign file with several exception types
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:
            raise ValueError(
                f"{file} holds a pickled {unsafe[1]}, not only tensors; it is not unpickled, which could run any "
                "code. Save the weights alone where you trust the file: torch.save(model.state_dict(), path), or "
                "safetensors' save_file."
            ) from error
        reason = f"{type(error).__name__}: {str(error).split('. ')[0]}" if str(error) else type(error).__name__
        raise ValueError(
            f"{file} is not a readable PyTorch weights file: it is truncated, corrupt or of another format ({reason}). "
            "Download or save it again."
        ) from error
    # Training checkpoints wrap the weights; DistributedDataParallel prefixes them.
    if isinstance(loaded, dict):
        loaded = loaded.get("state_dict", loaded.get("model", loaded))
    if isinstance(loaded, dict) and all(isinstance(tensor, torch.Tensor) for tensor in loaded.values()):
        return {key.removeprefix("module."): tensor for key, tensor in loaded.items()}
    if isinstance(loaded, torch.Tensor):
        found = f"a single tensor of shape {tuple(loaded.shape)}"
    elif isinstance(loaded, dict):
        others = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
        found = f"entries that are not tensors ({shorten(others, 3)})"
    else:
        found = f"a {type(loaded).__name__}"
    raise ValueError(
        f"{file} holds {found}, not a state dict of named tensors. Save one with torch.save(model.state_dict(), path)."
    )

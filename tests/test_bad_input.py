"""Bad input ends in one message that names the file, flag or value and the fix: no traceback, no silent wrong result.

The cases of run_finetune.py's flags, data and resumes are in test_run_finetune_errors.py and
test_run_finetune_resume.py; here are the converter's, the model's, a diverging run's and what only a process shows.
"""

import re
import subprocess
import sys
import time

import pytest
import torch
from accelerate.utils import LoggerType
from conftest import REPO_ROOT, tiny_config
from finetune_helpers import TINY_MODEL, fresh_accelerate_state, run_main, save_tiny_checkpoint, script_env
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import get_scheduler

import convert_checkpoint
import run_finetune
from configuration_vit_custom import PRESETS
from modeling_vit_custom import ViTCustomForImageClassification
from vit_training.arguments import TRACKERS, preset_names
from vit_training.errors import TrainingError
from vit_training.hardware import create_accelerator
from vit_training.loop import StepSettings, train_one_epoch
from vit_training.run_state import TrainingProgress

# ----------------------------------------------------------------------------------------------------------------------
# convert_checkpoint.py


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def truncated_safetensors(tmp_path):
    save_file({"pos_embed": torch.zeros(1, 17, 32), "cls_token": torch.zeros(1, 1, 32)}, tmp_path / "vit.safetensors")
    return truncated(tmp_path / "vit.safetensors"), "is not a readable safetensors file, it is truncated or corrupt"


def truncated_pth(tmp_path):
    torch.save({"pos_embed": torch.zeros(1, 17, 32)}, tmp_path / "vit.pth")
    return truncated(tmp_path / "vit.pth"), "is not a readable PyTorch weights file: it is truncated, corrupt"


def a_pth_that_is_not_pytorch(tmp_path):
    (tmp_path / "vit.pth").write_text("not weights")
    return tmp_path / "vit.pth", "is not a readable PyTorch weights file"


def a_pickled_module(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "vit.pth")
    return tmp_path / "vit.pth", "holds a pickled torch.nn.modules.linear.Linear, not only tensors; it is not unpickled"


def a_bare_tensor(tmp_path):
    torch.save(torch.zeros(3, 4), tmp_path / "vit.pth")
    return tmp_path / "vit.pth", "holds a single tensor of shape (3, 4), not a state dict of named tensors"


def values_that_are_not_tensors(tmp_path):
    torch.save({"epoch": 3, "pos_embed": torch.zeros(1, 17, 32)}, tmp_path / "vit.pth")
    return tmp_path / "vit.pth", "holds entries that are not tensors (epoch), not a state dict of named tensors"


def a_truncated_model_folder(tmp_path):
    save_tiny_checkpoint(tmp_path / "vit", labels=["cat", "dog"])
    return tmp_path / "vit", f"{truncated(tmp_path / 'vit' / 'model.safetensors')} is not a readable safetensors file"


def a_config_that_is_not_json(tmp_path):
    save_tiny_checkpoint(tmp_path / "vit", labels=["cat", "dog"])
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit_custom",')
    return tmp_path / "vit", f"{tmp_path / 'vit' / 'config.json'} is not valid JSON"


def a_shard_index_without_its_map(tmp_path):
    save_tiny_checkpoint(tmp_path / "vit", labels=["cat", "dog"])
    (tmp_path / "vit" / "model.safetensors.index.json").write_text("{}")
    return tmp_path / "vit", "model.safetensors.index.json has no weight_map"


def a_source_that_does_not_exist(tmp_path):
    return tmp_path / "missing", "is not a local file or folder, and not a Hub repo"


@pytest.mark.parametrize(
    "bad_source",
    [
        truncated_safetensors,
        truncated_pth,
        a_pth_that_is_not_pytorch,
        a_pickled_module,
        a_bare_tensor,
        values_that_are_not_tensors,
        a_truncated_model_folder,
        a_config_that_is_not_json,
        a_shard_index_without_its_map,
        a_source_that_does_not_exist,
    ],
)
def test_converter_names_an_unreadable_source_in_one_line(bad_source, tmp_path, capsys):
    source, message = bad_source(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main([str(source), str(tmp_path / "out"), "--num_attention_heads", "2"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num_labels", "-3"], "--num_labels -3: must be a positive number"),
        (["--num_labels", "0"], "--num_labels 0: must be a positive number"),
        (["--num_attention_heads", "0"], "--num_attention_heads 0: must be a positive number"),
        (["--image_size", "0"], "--image_size 0: give one side or height and width, in pixels"),
        (["--image_size", "32", "32", "32"], "--image_size 32 32 32: give one side or height and width"),
        (["--to_hf_vit", "--labels", "cat", "dog"], "--to_hf_vit exports the model as it is; --labels apply to"),
    ],
)
def test_converter_refuses_arguments_without_a_valid_meaning_as_usage_errors(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main([str(tmp_path / "source"), str(tmp_path / "out"), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "output, arguments, message",
    [
        ("out", ["--labels", "cat", "dog", "cat"], "The labels name cat more than once"),
        ("out", ["--labels", "cat", "dog", "--num_labels", "3"], "num_labels=3 but 2 labels were given"),
        ("vit/config.json/out", [], "config.json is a file, not a folder. Choose another output folder"),
        ("vit", [], "already has files; choose another folder or pass --overwrite"),
    ],
)
def test_converter_refuses_an_impossible_conversion_in_one_line_before_reading_weights(
    output, arguments, message, tmp_path, capsys
):
    save_tiny_checkpoint(tmp_path / "vit", labels=["cat", "dog"])
    truncated(tmp_path / "vit" / "model.safetensors")  # refused before the weights are read, or this would be named
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main([str(tmp_path / "vit"), str(tmp_path / output), *arguments])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error


# ----------------------------------------------------------------------------------------------------------------------
# The model's inputs


@pytest.fixture(scope="module")
def model():
    return ViTCustomForImageClassification(tiny_config()).eval()  # 5 classes, 3 channels, 16 px


IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        ({"pixel_values": IMAGES.numpy()}, TypeError, "pixel_values is a ndarray, not a torch.Tensor; prepare the"),
        ({"pixel_values": IMAGES.to(torch.uint8)}, TypeError, "holds torch.uint8 values, not normalised floats"),
        ({"pixel_values": IMAGES.long()}, TypeError, "holds torch.int64 values, not normalised floats"),
        ({"pixel_values": IMAGES[0]}, ValueError, "For a single image, add the batch axis: pixel_values.unsqueeze(0)"),
        ({"pixel_values": IMAGES.permute(0, 2, 3, 1)}, ValueError, "channels come last: pass pixel_values.permute("),
        ({"pixel_values": IMAGES[:, :1]}, ValueError, "Convert the images to 3 channels"),
        ({"pixel_values": IMAGES[:, :, :12, :12]}, ValueError, "(12x12) doesn't match the model's image size (16x16)"),
        ({"pixel_values": IMAGES[:, :, :14]}, ValueError, "(14x16) is not divisible by the patch size 4; resize"),
        ({"labels": torch.tensor([0, 5])}, ValueError, "labels holds class 5, but the model has 5 classes: pass"),
        ({"labels": torch.tensor([-1, 0])}, ValueError, "labels holds class -1, but the model has 5 classes"),
        ({"labels": torch.tensor([0, 1, 2])}, ValueError, "one class index per image, integers of shape (2,); got"),
    ],
)
def test_model_refuses_inputs_it_would_misread_and_says_what_to_pass(model, inputs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        model(**{"pixel_values": IMAGES, **inputs})


@pytest.mark.parametrize(
    "config, labels, message",
    [
        ({"problem_type": "multi_label_classification"}, torch.ones(2, 4), "takes 0/1 labels of shape (2, 5), got"),
        ({"problem_type": "regression", "num_labels": 1}, torch.ones(2, 2), "Regression takes 2 targets (1 per image)"),
        ({"num_labels": 0}, torch.tensor([0, 1]), "The model has no classifier (num_labels=0)"),
    ],
)
def test_labels_that_do_not_fit_the_problem_type_are_refused(config, labels, message):
    model = ViTCustomForImageClassification(tiny_config(**config))
    with pytest.raises(ValueError, match=re.escape(message)):
        model(pixel_values=IMAGES, labels=labels)


# ----------------------------------------------------------------------------------------------------------------------
# A diverging run


def test_a_diverging_run_stops_at_the_step_and_keeps_only_what_came_before(tmp_path):
    # A learning rate so large that the first update makes the logits overflow (no warmup to soften it).
    output_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as error:
        run_main(
            *TINY_MODEL, "--learning_rate", 1e30, "--warmup_steps", 0, "--max_train_samples", 32,
            "--per_device_train_batch_size", 8, "--num_train_epochs", 1, "--checkpointing_steps", 1,
            "--max_eval_samples", 16, "--output_dir", output_dir,
        )  # fmt: skip
    assert re.search(r"Training diverged: the training loss is (nan|inf) at step 2 \(epoch 1\)", str(error.value))
    assert f"the last good checkpoint is {output_dir / 'checkpoint-1'}" in str(error.value)
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-1"]  # no model, metrics or card


def train_on_a_nan_image(tmp_path, *flags) -> tuple[TrainingProgress, torch.nn.Module]:
    """One epoch of 3 steps of 4 images, whose 6th image (in step 2) holds NaN."""
    flags = [*TINY_MODEL, "--image_size", "16", "--patch_size", "4", "--output_dir", str(tmp_path), *flags]
    args = run_finetune.parse_args(flags)
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[5, 0, 0, 0] = float("nan")
    batches = DataLoader([{"pixel_values": image, "labels": n % 2} for n, image in enumerate(images)], batch_size=4)
    progress = TrainingProgress()
    settings = StepSettings(
        label_smoothing=args.training.label_smoothing, max_grad_norm=args.training.max_grad_norm,
        skip_nonfinite_steps=args.training.skip_nonfinite_steps, max_steps=100,
    )  # fmt: skip
    with fresh_accelerate_state():
        accelerator = create_accelerator(tmp_path, args.training.seed)
        model, _ = run_finetune.load_model(args.model, labels=["a", "b"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        prepared = accelerator.prepare(model, batches, optimizer, get_scheduler("constant", optimizer))
        train_one_epoch(accelerator, *prepared, progress, settings)
    return progress, model


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    with pytest.raises(TrainingError, match=re.escape("the training loss is nan at step 2 (epoch 1)")):
        train_on_a_nan_image(tmp_path)


def test_skip_nonfinite_steps_skips_and_counts_them(tmp_path):
    progress, model = train_on_a_nan_image(tmp_path, "--skip_nonfinite_steps")
    assert (progress.completed_steps, progress.skipped_steps, progress.samples_seen) == (3, 1, 8)
    assert all(parameter.isfinite().all() for parameter in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# What only a process shows: speed, exit status, no traceback


def run_command(script: str, *arguments) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, arguments)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=script_env(), check=False,
    )  # fmt: skip
    return result, time.perf_counter() - started


@pytest.mark.parametrize(
    "script, arguments, status, message",
    [
        ("run_finetune.py", ["--help"], 0, "--checkpoints_total_limit"),
        ("run_finetune.py", ["--seed", "-1"], 2, "argument --seed: must be between 0 and 2**32 - 1"),
        ("convert_checkpoint.py", ["--help"], 0, "--num_labels"),
        ("convert_checkpoint.py", ["in", "out", "--num_labels", "-3"], 2, "--num_labels -3: must be a positive"),
    ],
)
def test_help_and_argument_errors_answer_within_two_seconds(script, arguments, status, message):
    result, seconds = run_command(script, *arguments)
    assert result.returncode == status and message in result.stdout + result.stderr
    assert seconds < 2, f"{script} {' '.join(arguments)} took {seconds:.1f} s"


def test_a_refused_conversion_exits_with_one_error_line_and_no_traceback(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, where the output folder should go")
    result, seconds = run_command("convert_checkpoint.py", tmp_path / "vit.pth", tmp_path / "notes.txt" / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: Cannot write the folder") and result.stderr.count("\n") == 1
    assert seconds < 2  # refused before the weights, or torch, are loaded


def test_the_names_written_out_for_speed_are_the_libraries_own():
    assert set(preset_names()) == set(PRESETS)
    assert set(TRACKERS) == {tracker.value for tracker in LoggerType}

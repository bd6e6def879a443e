"""Bad input stops run_finetune.py with a message that names the problem and its fix, and loses nothing.

Every case runs with --overwrite_output_dir pointing at a previous run's results: those must survive the error.
"""

import runpy
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from finetune_helpers import fresh_accelerate_state, make_image_folder, run_main, save_tiny_checkpoint

import run_finetune
from finetune_utils import FinetuneError


def previous_run(path: Path) -> dict[str, bytes]:
    """A folder as a finished run with checkpoints leaves it; returns its files and their contents."""
    (path / "checkpoint-10").mkdir(parents=True)
    (path / "checkpoint-10" / "model.safetensors").write_bytes(b"weights at step 10")
    (path / "model.safetensors").write_bytes(b"final weights")
    (path / "all_results.json").write_text('{"test_accuracy": 0.99}')
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def folders(tmp_path: Path) -> list[str]:
    make_image_folder(tmp_path / "data" / "train", ["cat", "dog"], images_per_class=4)
    return ["--train_dir", str(tmp_path / "data" / "train")]


def no_label_column(tmp_path):
    return [*folders(tmp_path), "--label_column_name", "fine_label"], [
        "no label column 'fine_label'",
        "--label_column_name",
    ]


def no_image_column(tmp_path):
    return [*folders(tmp_path), "--image_column_name", "img"], ["no image column 'img'", "--image_column_name"]


def empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--train_dir", str(tmp_path / "empty")], ["holds no images in class sub-folders (no class sub-folder)", "one sub-folder per class"]


def only_non_image_files(tmp_path):
    (tmp_path / "notes" / "cat").mkdir(parents=True)
    (tmp_path / "notes" / "cat" / "readme.txt").write_text("cats")
    (tmp_path / "notes" / "cat" / "labels.csv").write_text("file,label\n")
    return ["--train_dir", str(tmp_path / "notes")], [
        "holds no images in class sub-folders (only 2 other file(s): cat/labels.csv, cat/readme.txt)",
        "one sub-folder per class",
    ]


def a_file_that_is_not_an_image(tmp_path):
    arguments = folders(tmp_path)
    (tmp_path / "data" / "train" / "dog" / "broken.png").write_text("not an image")
    return arguments, ["1 train image(s) cannot be decoded", "dog/broken.png", "Remove or replace them", "--on_bad_image skip"]


def labels_that_do_not_match_the_head(tmp_path):
    save_tiny_checkpoint(tmp_path / "pretrained", labels=["a", "b", "c", "d", "e"])
    arguments = ["--model_name_or_path", str(tmp_path / "pretrained"), *folders(tmp_path)]
    return arguments, [
        "head predicts 5 classes (a, b, c, d, e) but the data has 2 (cat, dog)",
        "--ignore_mismatched_sizes",
    ]


def architecture_flags_on_a_checkpoint(tmp_path):
    save_tiny_checkpoint(tmp_path / "pretrained", labels=["cat", "dog"])
    arguments = ["--model_name_or_path", str(tmp_path / "pretrained"), "--hidden_size", "64", *folders(tmp_path)]
    return arguments, ["fixed by the pretrained weights", "hidden_size=64 (the checkpoint has 32)", "Drop them"]


def a_revision_without_a_checkpoint(tmp_path):
    return ["--model_revision", "v1.0"], ["--model_revision v1.0", "--model_name_or_path, which is not given"]


def a_revision_of_a_local_checkpoint(tmp_path):
    save_tiny_checkpoint(tmp_path / "pretrained", labels=["cat", "dog"])
    arguments = ["--model_name_or_path", str(tmp_path / "pretrained"), "--model_revision", "v1.0", *folders(tmp_path)]
    return arguments, ["revision='v1.0' picks a version of a Hub repo", "is a local path", "Drop the revision"]


def hub_dataset_while_offline(tmp_path):
    return ["--dataset_name", "uoft-cs/cifar10"], ["'uoft-cs/cifar10'", "HF_HUB_OFFLINE=1", "--train_dir"]


def hub_unreachable_for_push_to_hub(tmp_path):
    arguments = ["--push_to_hub", "--hub_model_id", "me/digits", "--max_train_samples", "32"]
    return arguments, ["Cannot push to the Hub", "'me/digits'", "HF_HUB_OFFLINE", "drop --push_to_hub"]


@pytest.mark.parametrize(
    "bad_input",
    [
        no_label_column,
        no_image_column,
        empty_dataset,
        only_non_image_files,
        a_file_that_is_not_an_image,
        labels_that_do_not_match_the_head,
        architecture_flags_on_a_checkpoint,
        a_revision_without_a_checkpoint,
        a_revision_of_a_local_checkpoint,
        hub_dataset_while_offline,
        hub_unreachable_for_push_to_hub,
    ],
)
def test_bad_input_is_reported_before_anything_is_written(bad_input, tmp_path):
    files_before = previous_run(tmp_path / "previous")
    arguments, message_parts = bad_input(tmp_path)

    with pytest.raises(FinetuneError) as error:
        run_main(*arguments, "--output_dir", tmp_path / "previous", "--overwrite_output_dir")

    for part in message_parts:
        assert part in str(error.value)
    assert snapshot(tmp_path / "previous") == files_before


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--preset", "gigantic"], "argument --preset: invalid choice: 'gigantic' (choose from"),
        (["--per_device_train_batch_size", "0"], "argument --per_device_train_batch_size: must be a positive integer"),
        (["--checkpointing_steps", "often"], "must be a positive number of steps or `epoch`"),
    ],
)
def test_bad_flag_values_are_refused_by_the_parser(arguments, message, tmp_path, capsys):
    files_before = previous_run(tmp_path / "previous")
    with pytest.raises(SystemExit) as exit_info:
        run_finetune.parse_args([*arguments, "--output_dir", str(tmp_path / "previous"), "--overwrite_output_dir"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert snapshot(tmp_path / "previous") == files_before


def test_output_dir_of_another_run_is_refused_with_the_ways_out(tmp_path, monkeypatch):
    files_before = previous_run(tmp_path / "previous")
    monkeypatch.setattr(sys, "argv", ["run_finetune.py", "--output_dir", str(tmp_path / "previous")])

    with fresh_accelerate_state(), pytest.raises(SystemExit) as exit_info:  # as `python run_finetune.py ...` does
        runpy.run_path(str(REPO_ROOT / "run_finetune.py"), run_name="__main__")

    message = str(exit_info.value.code)  # printed on stderr by the interpreter, without a traceback
    assert message.startswith("error: --output_dir") and "already holds the files of another run" in message
    for way_out in ("--resume_from_checkpoint latest", "--overwrite_output_dir", "another --output_dir"):
        assert way_out in message
    assert snapshot(tmp_path / "previous") == files_before

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
from vit_training.errors import TrainingError


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
    return ["--train_dir", str(tmp_path / "empty")], [
        "holds no images in class sub-folders (no class sub-folder)",
        "one sub-folder per class",
    ]


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
    return arguments, [
        "1 train image(s) cannot be decoded", "dog/broken.png", "Remove or replace them", "--on_bad_image skip"
    ]


def labels_that_do_not_match_the_head(tmp_path):
    save_tiny_checkpoint(tmp_path / "pretrained", labels=["a", "b", "c", "d", "e"])
    arguments = ["--model_name_or_path", str(tmp_path / "pretrained"), *folders(tmp_path)]
    return arguments, [
        "head predicts 5 classes (a, b, c, d, e) but the data has 2 (cat, dog)",
        "--ignore_mismatched_sizes",
    ]


def a_revision_of_a_local_checkpoint(tmp_path):
    save_tiny_checkpoint(tmp_path / "pretrained", labels=["cat", "dog"])
    arguments = ["--model_name_or_path", str(tmp_path / "pretrained"), "--model_revision", "v1.0", *folders(tmp_path)]
    return arguments, ["revision='v1.0' picks a version of a Hub repo", "is a local path", "Drop the revision"]


def hub_dataset_while_offline(tmp_path):
    return ["--dataset_name", "uoft-cs/cifar10"], ["'uoft-cs/cifar10'", "HF_HUB_OFFLINE=1", "--train_dir"]


def hub_unreachable_for_push_to_hub(tmp_path):
    arguments = ["--push_to_hub", "--hub_model_id", "me/digits", "--max_train_samples", "32"]
    return arguments, ["Cannot push to the Hub", "'me/digits'", "HF_HUB_OFFLINE", "drop --push_to_hub"]


def fp16_on_the_cpu(tmp_path):
    return ["--mixed_precision", "fp16", "--cpu"], ["fp16", "needs a GPU", "--mixed_precision bf16"]


def a_tracker_that_is_not_installed(tmp_path):
    from accelerate.tracking import get_available_trackers

    installed = {tracker.value for tracker in get_available_trackers()}
    missing = next(name for name in ("wandb", "mlflow", "aim", "clearml", "dvclive") if name not in installed)
    arguments = ["--with_tracking", "--report_to", missing, "--train_dir", str(tmp_path / "not-read")]
    return arguments, [f"--report_to {missing}: its package is not installed", f"pip install {missing}"]


def a_model_the_flags_cannot_build(tmp_path):
    # Refused before the data is read: the missing --train_dir would be reported otherwise.
    arguments = ["--image_size", "18", "--train_dir", str(tmp_path / "not-read")]
    return arguments, ["Invalid model configuration: image_size=18 is not divisible by patch_size=8"]


def heads_that_do_not_split_the_width(tmp_path):
    arguments = ["--num_attention_heads", "3", "--train_dir", str(tmp_path / "not-read")]
    return arguments, ["hidden_size=64 is not divisible by num_attention_heads=3", "choose a number of heads"]


def a_checkpoint_to_resume_that_is_not_one(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    arguments = ["--resume_from_checkpoint", str(tmp_path / "checkpoint-5"), "--train_dir", str(tmp_path / "not-read")]
    return arguments, ["checkpoint-5 cannot be resumed from", "no custom_checkpoint_0.pkl", "`latest`"]


def truncated_weights_to_fine_tune(tmp_path):
    save_tiny_checkpoint(tmp_path / "pretrained", labels=["cat", "dog"])
    weights = tmp_path / "pretrained" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    arguments = ["--model_name_or_path", str(tmp_path / "pretrained"), *folders(tmp_path)]
    return arguments, [f"{weights} is not a readable safetensors file", "truncated", "Download or save it again"]


@pytest.mark.parametrize(
    "bad_input",
    [
        no_label_column,
        no_image_column,
        empty_dataset,
        only_non_image_files,
        a_file_that_is_not_an_image,
        labels_that_do_not_match_the_head,
        a_revision_of_a_local_checkpoint,
        hub_dataset_while_offline,
        hub_unreachable_for_push_to_hub,
        fp16_on_the_cpu,
        a_tracker_that_is_not_installed,
        a_model_the_flags_cannot_build,
        heads_that_do_not_split_the_width,
        a_checkpoint_to_resume_that_is_not_one,
        truncated_weights_to_fine_tune,
    ],
)
def test_bad_input_is_reported_before_anything_is_written(bad_input, tmp_path):
    files_before = previous_run(tmp_path / "previous")
    arguments, message_parts = bad_input(tmp_path)

    with pytest.raises(TrainingError) as error:
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
        (["--seed", "-1"], "argument --seed: must be between 0 and 2**32 - 1"),
        (["--label_smoothing", "1"], "argument --label_smoothing: must be at least 0 and below 1, got 1.0"),
        (["--hidden_dropout_prob", "1"], "argument --hidden_dropout_prob: must be at least 0 and below 1"),
        (["--train_val_split", "1"], "argument --train_val_split: must be between 0 and 1 (both sides need images)"),
        (["--learning_rate", "inf"], "argument --learning_rate: must be a positive finite number, got inf"),
        (["--learning_rate", "nan"], "argument --learning_rate: must be a positive finite number, got nan"),
        (["--weight_decay", "-0.1"], "argument --weight_decay: must be 0 or a positive finite number"),
        (["--max_train_steps", "-5"], "argument --max_train_steps: must be a positive integer, got -5"),
        (["--dataloader_num_workers", "-1"], "argument --dataloader_num_workers: must be 0 or more"),
        (["--checkpoints_total_limit", "-1"], "argument --checkpoints_total_limit: must be 0 or more"),
        (["--report_to", "tensorbord"], "argument --report_to: invalid choice: 'tensorbord' (choose from 'all',"),
        (["--report_to", "tensorboard"], "--report_to is used only with --with_tracking, which is not given"),
        (["--model_revision", "v1.0"], "--model_revision is used only with --model_name_or_path, which is not given"),
        (["--hub_model_id", "me/model"], "--hub_model_id is used only with --push_to_hub, which is not given"),
        (["--dataset_config_name", "plain"], "--dataset_config_name is used only with --dataset_name"),
        (["--preset", "tiny", "--model_name_or_path", "x"], "--preset tiny picks the size of a new model"),
        (
            ["--model_name_or_path", "x", "--hidden_size", "64", "--pooling", "cls", "--image_size", "32"],
            "--hidden_size, --pooling set the architecture of a new model, but the weights of --model_name_or_path x "
            "fix it; drop --hidden_size, --pooling (a checkpoint takes only --attention_probs_dropout_prob, "
            "--drop_path_rate, --hidden_dropout_prob, --image_size), or drop --model_name_or_path",
        ),
        (["--output_dir", "{previous}/all_results.json"], "all_results.json cannot be written: {previous}/all_res"),
        (["--output_dir", "{previous}/model.safetensors/out"], "model.safetensors is a file, not a folder"),
    ],
)
def test_bad_flag_values_are_refused_by_the_parser(arguments, message, tmp_path, capsys):
    files_before = previous_run(tmp_path / "previous")
    arguments = [argument.format(previous=tmp_path / "previous") for argument in arguments]
    with pytest.raises(SystemExit) as exit_info:
        run_finetune.parse_args(["--output_dir", str(tmp_path / "previous"), "--overwrite_output_dir", *arguments])
    assert exit_info.value.code == 2
    assert message.format(previous=tmp_path / "previous") in capsys.readouterr().err
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

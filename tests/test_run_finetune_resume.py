"""A run killed part-way resumes from its checkpoints to exactly what an uninterrupted run ends with."""

import json
import re
import shutil

import pytest
import torch
from accelerate import Accelerator
from finetune_helpers import TINY_MODEL, fresh_accelerate_state, kill_at_checkpoint, run_main
from safetensors.torch import load_file

import run_finetune
from vit_training.checkpoints import find_checkpoint, list_checkpoints
from vit_training.errors import TrainingError
from vit_training.hardware import create_accelerator
from vit_training.outputs import prepare_output_dir

# 3 epochs of 12 steps, a checkpoint every 4 steps, dropout so that the random state matters too.
# The whole from-scratch recipe: RandAugment, erasing, Mixup/CutMix, EMA (in the checkpoints) and drop path.
RESUMABLE_RUN = [
    *TINY_MODEL, "--recipe", "from-scratch", "--auto_augment", "rand-m9-n2", "--random_erasing", 0.5,
    "--num_train_epochs", 3, "--max_train_samples", 96, "--max_eval_samples", 40,
    "--per_device_train_batch_size", 8, "--checkpointing_steps", 4, "--hidden_dropout_prob", 0.1,
]  # fmt: skip


def test_killed_run_resumes_to_the_same_weights_and_metrics(tmp_path):
    run_main(*RESUMABLE_RUN, "--output_dir", tmp_path / "reference")

    killed_dir = tmp_path / "killed"
    # Mid-way through the first epoch.
    kill_at_checkpoint(RESUMABLE_RUN, killed_dir, "checkpoint-4", tmp_path / "killed.log")

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
    assert resumed_results.pop("recipe") == reference_results.pop("recipe")
    # Metrics come from the same weights evaluated in two processes: equal within fp32 rounding.
    assert resumed_results == pytest.approx(reference_results, rel=1e-6, abs=1e-9)
    # The newest three (--checkpoints_total_limit's default), and the one the run resumed from.
    kept = [p.name for p in list_checkpoints(killed_dir)]
    assert kept[-3:] == ["checkpoint-28", "checkpoint-32", "checkpoint-36"] and len(kept) == 4


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

    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-4"]
    assert (output_dir / "tmp" / "checkpoint-8").is_dir()  # the unfinished save, never taken for a checkpoint
    assert find_checkpoint("latest", output_dir) == output_dir / "checkpoint-4"

    results = run_main(*RESUMABLE_RUN, "--output_dir", output_dir, "--resume_from_checkpoint", "latest")
    assert results["epoch"] == 3
    assert not (output_dir / "tmp").exists()  # the unfinished save was redone at step 8, then rotated out
    kept = ["checkpoint-4", "checkpoint-28", "checkpoint-32", "checkpoint-36"]  # resumed from, and the newest three
    assert [p.name for p in list_checkpoints(output_dir)] == kept


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
        accelerator = create_accelerator(folder, args.training.seed)
        prepare_output_dir(folder, checkpoint, args.output.overwrite_output_dir, accelerator)


def test_overwrite_deletes_the_previous_runs_outputs_and_checkpoints_only(tmp_path):
    fake_run_folder(tmp_path)
    prepare(tmp_path, "--overwrite_output_dir")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_resuming_from_an_older_checkpoint_drops_the_abandoned_newer_ones(tmp_path):
    fake_run_folder(tmp_path)
    prepare(tmp_path, "--resume_from_checkpoint", tmp_path / "checkpoint-4", checkpoint=tmp_path / "checkpoint-4")
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "notes.txt").exists()


def test_overwrite_while_resuming_from_another_folder_clears_this_one(tmp_path):
    fake_run_folder(tmp_path / "old")
    fake_run_folder(tmp_path / "new", steps=(50,))
    source = tmp_path / "old" / "checkpoint-4"
    prepare(tmp_path / "new", "--overwrite_output_dir", "--resume_from_checkpoint", source, checkpoint=source)
    assert list_checkpoints(tmp_path / "new") == []
    assert list_checkpoints(tmp_path / "old") == [tmp_path / "old" / f"checkpoint-{s}" for s in (4, 8, 12)]


# 2 epochs of 6 steps, a checkpoint every 2 steps: the default --checkpoints_total_limit keeps those of steps 8, 10, 12.
SHORT_RESUMABLE_RUN = {
    "--num_train_epochs": 2, "--max_train_samples": 48, "--max_eval_samples": 16, "--per_device_train_batch_size": 8,
    "--checkpointing_steps": 2, "--dataloader_num_workers": 0,
}  # fmt: skip


def short_run(output_dir, **changes) -> list[str]:
    flags = {**SHORT_RESUMABLE_RUN, **{f"--{name}": value for name, value in changes.items()}}
    return [*TINY_MODEL, *[str(item) for pair in flags.items() for item in pair], "--output_dir", str(output_dir)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run's folder, with its last three checkpoints."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    run_main(*short_run(output_dir))
    return output_dir


def copy_of(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_checkpoints_beyond_the_limit_are_deleted_but_never_the_one_resumed_from(finished_run, tmp_path):
    assert [p.name for p in list_checkpoints(finished_run)] == [f"checkpoint-{s}" for s in (8, 10, 12)]
    output_dir = copy_of(finished_run, tmp_path)

    run_main(*short_run(output_dir, checkpoints_total_limit=1), "--resume_from_checkpoint", output_dir / "checkpoint-8")

    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-8", "checkpoint-12"]
    assert_same_weights(output_dir, finished_run)


def test_latest_skips_a_damaged_newest_checkpoint_with_a_warning(finished_run, tmp_path, capsys):
    output_dir = copy_of(finished_run, tmp_path)
    truncate(output_dir / "checkpoint-12" / "model.safetensors")

    run_main(*short_run(output_dir), "--resume_from_checkpoint", "latest")

    log = capsys.readouterr().err
    assert (
        f"Skipping {output_dir / 'checkpoint-12'}, which cannot be resumed from: model.safetensors is truncated" in log
    )
    assert_same_weights(output_dir, finished_run)  # resumed from step 10, re-saved step 12


def test_resuming_for_more_epochs_recomputes_the_schedule_and_reports_it(finished_run, tmp_path, capsys):
    output_dir = copy_of(finished_run, tmp_path)
    results = run_main(*short_run(output_dir, num_train_epochs=3), "--resume_from_checkpoint", "latest")
    assert "the learning-rate schedule is recomputed for 18 steps from step 12 on" in capsys.readouterr().err
    assert results["epoch"] == 3
    recorded = json.loads((output_dir / "all_results.json").read_text())["schedule_recomputed"]
    assert recorded == [{"at_step": 12, "planned_steps": 18, "before": 12}]


def assert_same_weights(output_dir, reference_dir):
    weights, reference = load_file(output_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in reference.items())


@pytest.mark.parametrize(
    "changes, resume_from, damaged, message",
    [
        ({"per_device_train_batch_size": 16}, "latest", [], "--per_device_train_batch_size 8 (this run: 16)"),
        ({"gradient_accumulation_steps": 2}, "latest", [], "--gradient_accumulation_steps 1 (this run: 2)"),
        # The recipe's 1e-3 at a batch of 32, scaled to this run's 8 with the square root.
        ({"learning_rate": 0.01}, "latest", [], "--learning_rate 0.0005 (this run: 0.01)"),
        ({"max_train_samples": 40}, "latest", [], "training images 48 (this run: 40)"),
        # The digits' default recipe; `basic` has the same learning rate, so only the recipe tells them apart.
        ({"recipe": "basic"}, "latest", [], "--recipe randaugment (this run: basic)"),
        ({"num_train_epochs": 1}, "latest", [], "has trained 12 optimizer steps, more than the 6 this run asks for"),
        ({}, "checkpoint-10", ["checkpoint-10/optimizer.bin"], "checkpoint-10 cannot be resumed from: optimizer.bin"),
        (
            {},
            "latest",
            ["checkpoint-8/model.safetensors", "checkpoint-10/random_states_0.pkl", "checkpoint-12/scheduler.bin"],
            "None of the 3 checkpoints",
        ),
    ],
    ids=["batch-size", "accumulation", "learning-rate", "data", "recipe", "fewer-steps", "damaged-checkpoint",
         "all-damaged"],
)
def test_a_resume_that_cannot_continue_the_checkpoint_is_refused_with_the_reason(
    finished_run, tmp_path, changes, resume_from, damaged, message
):
    output_dir = copy_of(finished_run, tmp_path)
    for path in damaged:
        truncate(output_dir / path)
    files_before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    resume_from = resume_from if resume_from == "latest" else output_dir / resume_from

    with pytest.raises(TrainingError, match=re.escape(message)):
        run_main(*short_run(output_dir, **changes), "--resume_from_checkpoint", resume_from)
    assert {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == files_before

"""run_pretrain.py: MAE pre-training writes an encoder that fine-tuning starts from, resumes exactly, runs on several
processes, and refuses bad input before writing anything."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from finetune_helpers import TINY_MODEL, fresh_accelerate_state, kill_at_checkpoint, run_main, script_env
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import run_pretrain
from vit_training.errors import TrainingError

# The digits, 2 epochs of 4 steps of 16 images, a 2-block encoder and a 1-block decoder: seconds.
SHORT_PRETRAINING = [
    *TINY_MODEL,
    "--decoder_hidden_size", 16, "--decoder_num_layers", 1, "--decoder_num_heads", 2,
    "--num_train_epochs", 2, "--max_train_samples", 64, "--max_eval_samples", 16,
    "--per_device_train_batch_size", 16, "--reconstruction_images", 4,
]  # fmt: skip


def pretrain(*argv) -> dict:
    """`run_pretrain.main(argv)` in this process, with a fresh Accelerate state."""
    with fresh_accelerate_state():
        return run_pretrain.main([str(arg) for arg in argv])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pretrained") / "mae"
    epochs = []
    with fresh_accelerate_state():
        results = run_pretrain.main(
            [*map(str, SHORT_PRETRAINING), "--output_dir", str(output_dir)],
            on_event=lambda name, values: epochs.append(values) if name == "epoch" else None,
        )
    return output_dir, results, epochs


def test_the_default_run_writes_outputs_vit_custom_digits_mae():
    assert run_pretrain.parse_args([]).output.output_dir == "outputs/vit-custom-digits-mae"


def test_a_run_writes_the_encoder_curves_and_a_reconstruction_figure_per_epoch(pretrained):
    output_dir, results, epochs = pretrained
    for name in ("config.json", "model.safetensors", "modeling_vit_custom.py", "preprocessor_config.json",
                 "training_curves.png", "reconstructions-epoch-1.png", "reconstructions-epoch-2.png"):  # fmt: skip
        assert (output_dir / name).is_file(), name
    for epoch in (1, 2):
        with Image.open(output_dir / f"reconstructions-epoch-{epoch}.png") as figure:
            assert figure.width > figure.height  # 4 images side by side, 4 rows of panels each
    assert [record["step"] for record in epochs] == [4, 8]
    assert results["epoch"] == 2 and results["eval_samples"] == 16 and results["mask_ratio"] == 0.75
    assert json.loads((output_dir / "all_results.json").read_text()) == results
    assert np.isfinite(results["train_loss"]) and np.isfinite(results["eval_loss"])


def test_the_encoder_loads_as_a_classifier_with_only_a_new_head(pretrained):
    output_dir, _, _ = pretrained
    model, info = AutoModelForImageClassification.from_pretrained(
        output_dir, trust_remote_code=True, num_labels=10, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = load_file(output_dir / "model.safetensors")
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.vit.state_dict().items())


def test_fine_tuning_starts_from_the_pretrained_encoder(pretrained, tmp_path):
    pretrained_dir, _, _ = pretrained
    output_dir = tmp_path / "finetuned"
    results = run_main(
        "--model_name_or_path", pretrained_dir, "--num_train_epochs", 1, "--max_train_samples", 32,
        "--max_eval_samples", 16, "--output_dir", output_dir,
    )  # fmt: skip
    assert results["epoch"] == 1 and 0 <= results["test_accuracy"] <= 1
    config = json.loads((output_dir / "config.json").read_text())
    assert len(config["id2label"]) == 10 and config["hidden_size"] == 32


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    resumable = [*SHORT_PRETRAINING, "--checkpointing_steps", 2, "--hidden_dropout_prob", 0.1]
    pretrain(*resumable, "--output_dir", tmp_path / "reference")
    killed_dir = tmp_path / "killed"
    kill_at_checkpoint(resumable, killed_dir, "checkpoint-2", tmp_path / "killed.log", script="run_pretrain.py")
    pretrain(*resumable, "--output_dir", killed_dir, "--resume_from_checkpoint", "latest")

    reference = load_file(tmp_path / "reference" / "model.safetensors")
    resumed = load_file(killed_dir / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    results = [json.loads((folder / "all_results.json").read_text()) for folder in (tmp_path / "reference", killed_dir)]
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def launch_pretraining(launch: list, output_dir, *argv):
    """`accelerate launch <launch> run_pretrain.py SHORT_PRETRAINING argv` in fresh processes; its results."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", 1, "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", 0, REPO_ROOT / "run_pretrain.py",
               *SHORT_PRETRAINING, "--output_dir", output_dir, *argv]  # fmt: skip
    result = subprocess.run(
        list(map(str, command)), cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "all_results.json").read_text()), result.stderr


def test_two_processes_pretrain_data_parallel(tmp_path):
    output_dir = tmp_path / "out"
    results, _ = launch_pretraining(["--multi_gpu", "--num_processes", 2], output_dir, "--cpu")
    # 64 images in steps of 2 x 16: 2 steps per epoch; every validation image scored once.
    assert results["step"] == 4 and results["eval_samples"] == 16
    assert (output_dir / "reconstructions-epoch-2.png").is_file()
    _, info = AutoModelForImageClassification.from_pretrained(
        output_dir, trust_remote_code=True, num_labels=10, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}


def test_fsdp2_shards_on_two_processes_trains_as_data_parallel_and_resumes_from_its_sharded_checkpoint(tmp_path):
    """configs/8gpu_fsdp2.yaml (FSDP2 wrapping every ViTCustomLayer) on 2 processes: on the CPU (gloo) here, on
    the GPUs where there are two."""
    gpus = torch.cuda.device_count() >= 2
    device = [] if gpus else ["--cpu"]
    fsdp2 = ["--config_file", REPO_ROOT / "configs" / "8gpu_fsdp2.yaml", "--num_processes", 2]
    checkpointing = ["--checkpointing_steps", 2, "--checkpoints_total_limit", 0]
    results, log = launch_pretraining(fsdp2, tmp_path / "fsdp", *checkpointing, *device)
    assert "Distributed environment: DistributedType.FSDP" in log and results["step"] == 4
    # The checkpoint holds one shard of the weights per process, which no single process could write alone.
    shards = sorted(path.name for path in (tmp_path / "fsdp" / "checkpoint-2").rglob("*.distcp"))
    assert len(shards) >= 2, sorted(path.name for path in (tmp_path / "fsdp" / "checkpoint-2").rglob("*"))
    # Sharding changes where the weights live, not the arithmetic: the same run as plain data parallel.
    launch_pretraining(["--multi_gpu", "--num_processes", 2], tmp_path / "ddp", *device)
    sharded = load_file(tmp_path / "fsdp" / "model.safetensors")
    replicated = load_file(tmp_path / "ddp" / "model.safetensors")
    assert sharded.keys() == replicated.keys() and "embeddings.cls_token" in sharded
    for name, tensor in replicated.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # Resumed from the sharded checkpoint after step 2, the run ends at the same weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
    launch_pretraining(fsdp2, resumed, *checkpointing, *device, "--resume_from_checkpoint", resumed / "checkpoint-2")
    for name, tensor in load_file(resumed / "model.safetensors").items():
        torch.testing.assert_close(tensor, sharded[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_unlabelled_image_folder_pretrains(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(24):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    results = pretrain(
        *SHORT_PRETRAINING, "--train_dir", folder, "--train_val_split", 0.25, "--output_dir", tmp_path / "out"
    )
    assert results["train_samples"] == 18 and results["eval_samples"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mask_ratio", "1.0"], r"--mask_ratio 1.0 is outside \[0, 1\).*such as 0.75"),
        (["--mask_ratio", "-0.1"], r"--mask_ratio -0.1 is outside \[0, 1\)"),
    ],
)
def test_a_mask_ratio_outside_zero_to_one_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        run_pretrain.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, refused",
    [
        (["--mixup_alpha", "0.8"], "--mixup_alpha 0.8"),
        (["--mix_prob", "0.5"], "--mix_prob 0.5"),
        (["--label_smoothing", "0.1"], "--label_smoothing 0.1"),
        (["--recipe", "from-scratch"], "--mixup_alpha 0.8, --cutmix_alpha 1.0, --label_smoothing 0.1, --ema_decay"),
    ],
)
def test_classification_settings_are_refused_by_name_and_left_out_of_the_help(argv, refused, capsys):
    with pytest.raises(SystemExit):
        run_pretrain.parse_args(argv)
    assert refused in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_pretrain.parse_args(["--help"])
    shown = capsys.readouterr().out
    unused = r"^ +--(mixup_alpha|cutmix_alpha|mix_prob|mix_switch_prob|label_smoothing|ema_decay|layer_decay)\b"
    assert re.search(r"^ +--random_erasing\b", shown, re.M) and not re.search(unused, shown, re.M)
    run_pretrain.parse_args(["--recipe", "from-scratch", "--mixup_alpha", "0", "--cutmix_alpha", "0",
                             "--label_smoothing", "0", "--ema_decay", "none"])  # the rest of from-scratch pre-trains


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mask_ratio", "0.97"], r"mask_ratio=0.97 hides all 16 patches.*at most 0.9375"),
        (["--image_size", "18"], r"image_size=18 is not divisible by patch_size=8"),
    ],
)
def test_a_model_the_mask_or_patches_cannot_cover_is_refused_before_writing(argv, message, tmp_path):
    with pytest.raises(TrainingError, match=message):
        pretrain(*SHORT_PRETRAINING, *argv, "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_encoder_shape_is_refused(tmp_path):
    output_dir = tmp_path / "out"
    pretrain(*SHORT_PRETRAINING, "--num_train_epochs", 1, "--checkpointing_steps", "epoch", "--output_dir", output_dir)
    before = {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir()}
    wider = [*SHORT_PRETRAINING, "--hidden_size", 64, "--num_train_epochs", 1]
    shapes = r"checkpoint-4 holds a masked autoencoder of another shape.*encoder.embeddings.cls_token \(1, 1, 32\) "
    shapes += r"\(this run: \(1, 1, 64\)\).*Pass the model and decoder flags of the run that wrote it"
    with pytest.raises(TrainingError, match=shapes):
        pretrain(*wider, "--output_dir", output_dir, "--resume_from_checkpoint", "latest")
    assert {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir()} == before


def test_an_output_folder_of_another_run_is_not_overwritten(pretrained):
    output_dir, _, _ = pretrained
    before = {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir()}
    with pytest.raises(TrainingError, match=r"already holds the files of another run.*--overwrite_output_dir"):
        pretrain(*SHORT_PRETRAINING, "--output_dir", output_dir)
    assert {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir()} == before

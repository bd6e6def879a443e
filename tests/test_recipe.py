"""The training recipes: resolution, checks of their values, learning-rate scaling, layer decay, EMA, repeats."""

import copy
import json
import math
import re

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler
from transformers import get_scheduler

from conftest import tiny_config
from vit_training.errors import TrainingError
from modeling_vit_custom import ViTCustomForImageClassification, ViTCustomModel
from vit_training.ema import weight_average
from vit_training.param_groups import parameter_groups
from vit_training.recipes import (
    RECIPES,
    check_mixing,
    learning_rate,
    resolve_recipe,
    scaled_learning_rate,
)
from vit_training.repeated import RepeatedAugmentationSampler, repeated_order


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_resolves_to_json_with_flags_winning(name):
    settings = resolve_recipe(name, {"mixup_alpha": 0.3, "ema_decay": 0.99})
    assert settings["recipe"] == name and settings["mixup_alpha"] == 0.3 and settings["ema_decay"] == 0.99
    assert {key: value for key, value in settings.items() if key not in ("recipe", "mixup_alpha", "ema_decay")} == {
        key: value for key, value in RECIPES[name].items() if key not in ("mixup_alpha", "ema_decay")
    }
    assert json.loads(json.dumps(settings)) == settings


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"mixup_alpha": -1}, "--mixup_alpha -1: must be >= 0"),
        ({"cutmix_alpha": -0.5}, "--cutmix_alpha -0.5: must be >= 0"),
        ({"random_erasing": 1.5}, r"--random_erasing 1.5: must be a probability in \[0, 1\]"),
        ({"mix_prob": -0.1}, r"--mix_prob -0.1: must be a probability in \[0, 1\]"),
        ({"mix_switch_prob": 2}, r"--mix_switch_prob 2: must be a probability in \[0, 1\]"),
        ({"ema_decay": 1.0}, r"--ema_decay 1.0: must be in \(0, 1\)"),
        ({"ema_decay": 0}, r"--ema_decay 0: must be in \(0, 1\)"),
        ({"layer_decay": 1.2}, r"--layer_decay 1.2: must be in \(0, 1\]"),
        ({"lr_base_scale": "cubic"}, "--lr_base_scale cubic: must be `linear` or `sqrt`"),
        ({"auto_augment": "rand-9"}, "--auto_augment rand-9: must be `none`, `trivial` .* or `rand-m"),
        ({"crop_ratio": [4 / 3, 3 / 4]}, "--crop_ratio 1.33.* 0.75: must be MIN MAX with 0 < MIN <= MAX"),
    ],
)
def test_out_of_range_values_name_the_flag_and_range(setting, message):
    with pytest.raises(TrainingError, match=message):
        resolve_recipe("from-scratch", setting)


def test_unknown_recipe_lists_the_recipes():
    recipes = "basic, finetune, randaugment, pretrain, from-scratch"
    with pytest.raises(TrainingError, match=f"--recipe fast: unknown; choose one of {recipes}"):
        resolve_recipe("fast", {})


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_mixing_refused_for_multi_label_and_regression(problem_type):
    settings = resolve_recipe("from-scratch", {})
    with pytest.raises(TrainingError, match="--mixup_alpha 0.8: Mixup and CutMix mix one class per image"):
        check_mixing(settings, problem_type)
    check_mixing(resolve_recipe("from-scratch", {"mixup_alpha": 0, "cutmix_alpha": 0}), problem_type)
    check_mixing(settings, "single_label_classification")


def test_learning_rate_scales_with_the_global_batch():
    assert scaled_learning_rate(5e-4, 512, 1024, "linear") == pytest.approx(1e-3)
    assert scaled_learning_rate(1e-3, 128, 512, "sqrt") == pytest.approx(2e-3)
    settings = resolve_recipe("finetune", {})
    assert learning_rate(settings, 32) == pytest.approx(1e-3)  # today's rate at today's batch
    assert learning_rate(resolve_recipe("finetune", {"learning_rate": 3e-4}), 1024) == 3e-4


# ----------------------------------------------------------------------------------------------------------------------
# Layer decay


def test_layer_decay_scales_follow_the_formula_and_reach_the_scheduler():
    model = ViTCustomForImageClassification(tiny_config(num_hidden_layers=3))
    groups = parameter_groups(model, weight_decay=0.05, learning_rate=1e-3, layer_decay=0.5)
    layer_of = {}
    for name, parameter in model.named_parameters():
        if ".layers." in name:
            layer_of[id(parameter)] = int(name.split(".")[2]) + 1
        else:
            layer_of[id(parameter)] = 0 if ".embeddings." in name else 4
    for group in groups:
        (layer,) = {layer_of[id(parameter)] for parameter in group["params"]}
        assert group["lr_scale"] == 0.5 ** (3 + 1 - layer)
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))

    optimizer = torch.optim.AdamW(groups)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    optimizer.step()
    scheduler.step()  # half way through the warmup
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.5 * 1e-3 * group["lr_scale"])


def test_no_layer_decay_gives_one_learning_rate_to_every_group():
    model = ViTCustomForImageClassification(tiny_config())
    groups = parameter_groups(model, weight_decay=0.05, learning_rate=1e-3)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    assert all(group["lr"] == 1e-3 and "lr_scale" not in group for group in groups)


def test_layer_decay_keeps_the_no_decay_rule():
    model = ViTCustomModel(tiny_config())
    groups = parameter_groups(model, weight_decay=0.05, learning_rate=1e-3, layer_decay=0.75)
    undecayed = {id(p) for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    for name, parameter in model.named_parameters():
        expected = name.endswith(("bias", "cls_token", "position_embeddings")) or "layernorm" in name
        assert (id(parameter) in undecayed) == expected, name


def test_layer_decay_without_encoder_layers_is_refused():
    with pytest.raises(TrainingError, match="--layer_decay 0.75: the model has no encoder layers"):
        parameter_groups(torch.nn.Linear(3, 2), weight_decay=0.05, learning_rate=1e-3, layer_decay=0.75)


# ----------------------------------------------------------------------------------------------------------------------
# EMA


def test_ema_after_updates_equals_the_closed_form_and_round_trips():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = copy.deepcopy(model.state_dict())
    ema = weight_average(model, decay=0.9)
    steps = [torch.randn(2, 3) for _ in range(4)]
    for step in steps:
        with torch.no_grad():
            model[0].weight.add_(step)
        ema.update(model)
    expected = 0.9**4 * start["0.weight"]
    for index in range(4):  # the weights after update k are start + sum of the first k steps
        expected = expected + 0.1 * 0.9 ** (3 - index) * (start["0.weight"] + sum(steps[: index + 1]))
    torch.testing.assert_close(ema.module[0].weight, expected)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked  # an integer buffer: copied

    restored = weight_average(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    for name, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


# ----------------------------------------------------------------------------------------------------------------------
# Repeated augmentation


def shards(sampler, batch_size: int, num_processes: int) -> list[list[int]]:
    """What each process trains on, as Accelerate deals out the global batches."""
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    return [
        [index for batch in BatchSamplerShard(batches, num_processes, process) for index in batch]
        for process in range(num_processes)
    ]


@pytest.mark.parametrize("copies, num_processes", [(3, 4), (2, 2), (3, 2)])
def test_repeated_copies_land_on_different_processes(copies, num_processes):
    num_samples, batch_size = 100, 4
    sampler = RepeatedAugmentationSampler(num_samples, copies, num_processes, batch_size, seed=0)
    per_process = shards(sampler, batch_size, num_processes)
    seen = [index for indices in per_process for index in indices]
    assert len(seen) == len(set(seen)) == len(sampler)  # every virtual index once: copies are distinct samples
    assert len(sampler) == num_samples // (batch_size * num_processes) * batch_size * num_processes
    for indices in per_process:
        samples = [index % num_samples for index in indices]
        # A process holds at most ceil(copies / processes) copies of a sample.
        assert max(samples.count(sample) for sample in set(samples)) <= math.ceil(copies / num_processes)
    all_samples = [index % num_samples for index in seen]
    assert max(all_samples.count(sample) for sample in set(all_samples)) == copies


def test_repeated_order_is_seeded_by_epoch_and_one_copy_is_a_permutation():
    assert repeated_order(64, 3, 2, 4, seed=1, epoch=0) == repeated_order(64, 3, 2, 4, seed=1, epoch=0)
    assert repeated_order(64, 3, 2, 4, seed=1, epoch=0) != repeated_order(64, 3, 2, 4, seed=1, epoch=1)
    assert sorted(repeated_order(64, 1, 2, 4, seed=1, epoch=0)) == list(range(64))


# ----------------------------------------------------------------------------------------------------------------------
# The recipe in run_finetune.py


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mixup_alpha", "-1"], "--mixup_alpha -1.0: must be >= 0"),
        (["--random_erasing", "1.5"], r"--random_erasing 1.5: must be a probability in \[0, 1\]"),
        (["--ema_decay", "1"], r"--ema_decay 1.0: must be in \(0, 1\), or `none`"),
        (["--layer_decay", "0"], r"--layer_decay 0.0: must be in \(0, 1\], or `none`"),
        (["--auto_augment", "strong"], "--auto_augment strong: must be `none`, `trivial`"),
        (["--crop_ratio", "2", "1"], "--crop_ratio 2.0 1.0: must be MIN MAX with 0 < MIN <= MAX"),
        (["--crop_scale", "0.9", "0.5"], "--crop_scale 0.9 0.5: must be MIN MAX with 0 < MIN <= MAX <= 1"),
        (["--crop_scale", "0", "1"], "--crop_scale 0.0 1.0: must be MIN MAX with 0 < MIN <= MAX <= 1"),
        (["--crop_scale", "0.5", "1.5"], r"--crop_scale: .*1.5"),
        (["--crop_ratio", "0", "1"], "--crop_ratio: must be a positive finite number, got 0.0"),
    ],
)
def test_the_command_line_refuses_recipe_values_out_of_range(flags, message, capsys):
    import run_finetune

    with pytest.raises(SystemExit) as exit_info:
        run_finetune.parse_args(flags)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_default_recipe_follows_the_starting_point_and_flags_override_it():
    import run_finetune

    digits = run_finetune.parse_args([])
    assert digits.recipe.settings == {"recipe": "randaugment", **RECIPES["randaugment"]}
    assert digits.recipe.auto_augment == "rand-m9-n2" and digits.data.crop_scale == (0.7, 1.0)
    folder = run_finetune.parse_args(["--train_dir", "photos/train"])
    assert folder.recipe.settings == {"recipe": "basic", **RECIPES["basic"]}
    assert folder.data.crop_scale == (0.85, 1.0)
    tuned = run_finetune.parse_args(["--model_name_or_path", "some/vit", "--ema_decay", "0.99", "--layer_decay", "none"])
    assert tuned.recipe.settings["recipe"] == "finetune"
    assert tuned.recipe.settings["ema_decay"] == 0.99 and tuned.recipe.settings["layer_decay"] is None
    assert tuned.data.crop_scale == tuple(RECIPES["finetune"]["crop_scale"])


def test_recipe_settings_are_reported_and_the_average_weights_are_saved(tmp_path):
    from safetensors.torch import load_file

    from finetune_helpers import TINY_MODEL, run_main

    run_main(
        *TINY_MODEL, "--num_train_epochs", 1, "--max_train_samples", 32, "--max_eval_samples", 16,
        "--per_device_train_batch_size", 8, "--recipe", "from-scratch", "--mixup_alpha", 0.3,
        "--checkpointing_steps", "epoch", "--output_dir", tmp_path,
    )  # fmt: skip

    results = json.loads((tmp_path / "all_results.json").read_text())
    expected_rate = scaled_learning_rate(1e-3, 32, 8, "sqrt")  # the recipe's lr_base, scaled to the batch of 8
    expected = {"recipe": "from-scratch", **RECIPES["from-scratch"], "mixup_alpha": 0.3, "learning_rate": expected_rate}
    assert results["recipe"] == expected
    card = (tmp_path / "README.md").read_text()
    assert "Mixup 0.3" in card and "EMA, decay 0.999" in card
    # The saved model is the weight average kept in the checkpoint, not the last step's weights.
    checkpoint = next(tmp_path.glob("checkpoint-*"))
    average = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=True)
    saved, last = load_file(tmp_path / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(average[f"module.{name}"], tensor), name
    assert any(not torch.equal(last[name], tensor) for name, tensor in saved.items())

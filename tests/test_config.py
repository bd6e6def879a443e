"""ViTCustomConfig: presets, validation, serialisation."""

import pytest

from configuration_vit_custom import PRESETS, ViTCustomConfig
from modeling_vit_custom import ViTCustomForImageClassification


def test_model_type_is_our_own():
    assert ViTCustomConfig.model_type == "vit_custom"


def test_defaults_follow_the_paper():
    config = ViTCustomConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.layer_norm_eps == 1e-6
    assert config.pooling == "cls" and config.use_cls_token


@pytest.mark.parametrize(
    "preset, millions, patch_size",
    [("base", 86, 16), ("large", 307, 16), ("huge", 632, 14)],
)
def test_preset_parameter_counts_match_the_paper(preset, millions, patch_size):
    config = ViTCustomConfig.from_preset(preset, num_labels=1000)
    assert config.patch_size == patch_size
    # Count from shapes on the meta device: no memory for 632M parameters is needed.
    import torch

    with torch.device("meta"):
        model = ViTCustomForImageClassification(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - millions) / millions < 0.015, count


def test_presets_cover_the_known_sizes():
    assert set(PRESETS) == {"tiny", "small", "base", "large", "huge"}
    assert ViTCustomConfig.from_preset("small", pooling="mean").pooling == "mean"


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="Unknown preset 'gigantic'.*base"):
        ViTCustomConfig.from_preset("gigantic")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 100}, r"hidden_size=100 is not divisible by num_attention_heads=12"),
        ({"image_size": 225}, r"image_size=225 is not divisible by patch_size=16"),
        ({"image_size": (224, 200)}, r"image_size=\[224, 200\] is not divisible by patch_size=16"),
        ({"pooling": "max"}, r"pooling='max' is unknown; use one of \('cls', 'mean'\)"),
        ({"use_cls_token": False}, r"pooling='cls' needs a CLS token.*pooling='mean'"),
        ({"hidden_size": 0}, r"hidden_size=0 must be a positive integer"),
        ({"patch_size": -4}, r"patch_size=-4 must be a positive integer"),
        ({"num_hidden_layers": 0}, r"num_hidden_layers=0 must be a positive integer"),
        ({"hidden_dropout_prob": 1.0}, r"hidden_dropout_prob=1.0 must be in \[0, 1\)"),
        ({"attention_probs_dropout_prob": -0.1}, r"attention_probs_dropout_prob=-0.1 must be in \[0, 1\)"),
        ({"drop_path_rate": 1.5}, r"drop_path_rate=1.5 must be in \[0, 1\)"),
        ({"hidden_act": "gelu2"}, r"hidden_act='gelu2' is unknown; use the name of one of transformers' activations"),
        ({"num_labels": -3}, r"num_labels=-3 must be a number of classes, or 0 for no classifier"),
        ({"problem_type": "ranking"}, r"problem_type='ranking' is unknown; use one of \('single_label_classification'"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTCustomConfig(**overrides)


def test_mean_pooling_without_cls_token_is_valid():
    config = ViTCustomConfig(pooling="mean", use_cls_token=False)
    assert config.num_prefix_tokens == 0


def test_non_square_image_size_round_trips(tmp_path):
    config = ViTCustomConfig(image_size=(224, 160), pooling="mean", interpolate_pos_encoding=True, num_labels=7)
    assert config.grid_size == (14, 10)
    config.save_pretrained(tmp_path)
    reloaded = ViTCustomConfig.from_pretrained(tmp_path)
    assert reloaded.image_height_width == (224, 160)
    assert reloaded.pooling == "mean" and reloaded.interpolate_pos_encoding and reloaded.num_labels == 7
    assert reloaded.auto_map["AutoModelForImageClassification"].endswith("ViTCustomForImageClassification")

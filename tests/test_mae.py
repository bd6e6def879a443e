"""MAE pre-training: the encoder sees only the visible patches, and what it learns loads as a classifier's encoder."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from transformers import AutoModelForImageClassification

from conftest import tiny_config
from explain_figures import DPI, PANEL_INCHES
from modeling_vit_custom import ViTCustomForImageClassification, ViTCustomLayer, ViTCustomModel
from vit_training.mae import (
    MaskedAutoencoder,
    masking_generator,
    normalised_patches,
    patchify,
    random_masking,
    reconstruction_figure,
    unpatchify,
)


NUM_PATCHES = 16  # tiny_config: 16 px images, 4 px patches


def tiny_mae(mask_ratio: float = 0.75, **config) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder = ViTCustomModel(tiny_config(**config))
    return MaskedAutoencoder(
        encoder, mask_ratio, decoder_hidden_size=16, decoder_num_layers=1, decoder_num_heads=2
    ).eval()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_with_mask_ratio_zero_the_encoder_gives_the_classifiers_encoder_output(pixel_values, pooling):
    mae = tiny_mae(mask_ratio=0.0, pooling=pooling)
    classifier = ViTCustomForImageClassification(tiny_config(pooling=pooling)).eval()
    classifier.vit.load_state_dict(mae.encoder.state_dict())
    with torch.no_grad():
        encoded, ids_keep, mask = mae.encode(pixel_values, masking_generator(0, 0))
        expected = classifier.vit(pixel_values).last_hidden_state
    assert torch.equal(encoded, expected)
    assert not mask.any() and torch.equal(ids_keep, torch.arange(NUM_PATCHES).expand(3, -1))


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.3, 0.9])
@pytest.mark.parametrize("use_cls_token", [True, False])
def test_the_encoder_sees_the_visible_patches_plus_the_prefix(pixel_values, mask_ratio, use_cls_token):
    mae = tiny_mae(mask_ratio, use_cls_token=use_cls_token, pooling="cls" if use_cls_token else "mean")
    with torch.no_grad():
        output = mae(pixel_values, masking_generator(0, 1))
    num_visible = round((1 - mask_ratio) * NUM_PATCHES)
    assert output.last_hidden_state.shape == (3, int(use_cls_token) + num_visible, 32)
    assert output.mask.shape == (3, NUM_PATCHES)
    assert output.mask.sum(dim=1).tolist() == [NUM_PATCHES - num_visible] * 3
    assert output.reconstruction.shape == (3, NUM_PATCHES, 4 * 4 * 3)


def test_masks_are_drawn_again_from_the_same_seed_and_step():
    def mask(seed, step, rank=0):
        return random_masking(4, NUM_PATCHES, 0.75, masking_generator(seed, step, rank))[1]

    assert torch.equal(mask(0, 7), mask(0, 7))
    assert not torch.equal(mask(0, 7), mask(0, 8))
    assert not torch.equal(mask(0, 7), mask(1, 7))
    assert not torch.equal(mask(0, 7), mask(0, 7, rank=1))
    masks = mask(0, 7)
    assert not torch.equal(masks[0], masks[1])  # every image its own mask


def test_the_loss_is_the_error_on_the_hidden_patches_only(pixel_values):
    mae = tiny_mae()
    output = mae(pixel_values, masking_generator(0, 2))
    output.reconstruction.retain_grad()
    output.loss.backward()
    gradient = output.reconstruction.grad.abs().sum(dim=-1)
    assert (gradient[~output.mask] == 0).all() and (gradient[output.mask] > 0).all()
    errors = (output.reconstruction - normalised_patches(pixel_values, 4)).square().mean(dim=-1)
    torch.testing.assert_close(output.loss, errors[output.mask].mean())


def test_targets_are_each_patch_normalised(pixel_values):
    patches = patchify(pixel_values, 4)
    assert torch.equal(patches[1, 6].reshape(4, 4, 3).permute(2, 0, 1), pixel_values[1, :, 4:8, 8:12])
    assert torch.equal(unpatchify(patches, 4, (4, 4), 3), pixel_values)
    targets = normalised_patches(pixel_values, 4)
    torch.testing.assert_close(targets.mean(dim=-1), torch.zeros(3, NUM_PATCHES), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.std(dim=-1), torch.ones(3, NUM_PATCHES), atol=1e-4, rtol=0)


def test_the_decoder_has_the_requested_width_depth_and_heads():
    encoder = ViTCustomModel(tiny_config())
    mae = MaskedAutoencoder(encoder, decoder_hidden_size=24, decoder_num_layers=3, decoder_num_heads=3)
    layers = mae.decoder.layers
    assert len(layers) == 3 and all(isinstance(layer, ViTCustomLayer) for layer in layers)
    assert layers[0].attention.num_heads == 3 and layers[0].attention.qkv.in_features == 24
    assert mae.decoder.prediction.out_features == 4 * 4 * 3


def test_training_on_digits_lowers_the_loss():
    digits = load_digits()
    images = np.stack([np.asarray(Image.fromarray(image).resize((16, 16))) for image in digits.images[:64] / 16])
    pixel_values = (torch.tensor(images, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.5
    mae = tiny_mae().train()
    optimizer = torch.optim.AdamW(mae.parameters(), lr=3e-3)

    def held_out_loss() -> float:
        with torch.no_grad():
            return mae(pixel_values, masking_generator(1, 0)).loss.item()

    before = held_out_loss()
    for step in range(30):
        loss = mae(pixel_values, masking_generator(0, step)).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.8 * before


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_saved_encoder_loads_as_a_classifier_with_only_a_new_head(tmp_path, pixel_values, pooling):
    mae = tiny_mae(pooling=pooling)
    mae.encoder.save_pretrained(tmp_path)
    auto, info = AutoModelForImageClassification.from_pretrained(
        tmp_path, trust_remote_code=True, num_labels=10, output_loading_info=True
    )
    direct, direct_info = ViTCustomForImageClassification.from_pretrained(
        tmp_path, num_labels=10, output_loading_info=True
    )
    for model, loading in ((auto, info), (direct, direct_info)):
        assert set(loading["missing_keys"]) == {"classifier.weight", "classifier.bias"}
        assert not loading["unexpected_keys"] and not loading["mismatched_keys"]
        encoder = mae.encoder.state_dict()
        assert all(torch.equal(tensor, encoder[name]) for name, tensor in model.vit.state_dict().items())
    assert type(auto).__module__.startswith("transformers_modules.")


def test_a_mean_pooling_classifier_from_a_cls_encoder_reports_its_new_pooling_norm(tmp_path):
    tiny_mae(pooling="cls").encoder.save_pretrained(tmp_path)
    _, info = AutoModelForImageClassification.from_pretrained(
        tmp_path, trust_remote_code=True, pooling="mean", output_loading_info=True
    )
    assert set(info["missing_keys"]) == {
        "classifier.weight",
        "classifier.bias",
        "vit.pooler.layernorm.weight",
        "vit.pooler.layernorm.bias",
    }


@pytest.mark.parametrize("mask_ratio", [-0.1, 1.0, 1.5, "0.75", True])
def test_a_mask_ratio_outside_zero_to_one_is_refused(mask_ratio):
    with pytest.raises(ValueError, match=rf"mask_ratio={mask_ratio!r} must be a number in \[0, 1\)"):
        tiny_mae(mask_ratio)


def test_a_mask_ratio_that_hides_every_patch_is_refused():
    with pytest.raises(ValueError, match=r"mask_ratio=0.97 hides all 16 patches.*at most 0.9375"):
        tiny_mae(0.97)


def test_the_figure_shows_inputs_masks_and_reconstructions_for_every_image(tmp_path, pixel_values):
    mae = tiny_mae()
    with torch.no_grad():
        output = mae(pixel_values, masking_generator(0, 0))
        two_outputs = mae(pixel_values[:2], masking_generator(0, 0))
    figure = reconstruction_figure(pixel_values, output, 4, [0.5] * 3, [0.5] * 3, title="epoch 1")
    figure.savefig(tmp_path / "reconstructions.png", dpi=DPI)
    two_images = reconstruction_figure(pixel_values[:2], two_outputs, 4, [0.5] * 3, [0.5] * 3)

    with Image.open(tmp_path / "reconstructions.png") as png:
        width, height = png.size
    assert (width, height) == tuple(round(inches * DPI) for inches in figure.get_size_inches())
    assert len(figure.axes) == 4 * 3
    # One column of panels per image, four rows: input, masked input, reconstruction, reconstruction + visible.
    assert figure.get_size_inches()[0] - two_images.get_size_inches()[0] == pytest.approx(PANEL_INCHES)
    assert figure.get_size_inches()[1] == pytest.approx(4 * PANEL_INCHES + 0.4)

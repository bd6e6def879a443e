"""SimMIM pre-training: transformers' `run_mim.py` trains a vit-custom model through `AutoModelForMaskedImageModeling`.

The run_mim tests repeat that script's steps on a tiny model saved with its remote code: the config, image processor
and model loaded through the Auto classes with `trust_remote_code=True`, its image transforms, its mask generator
(masks drawn on a coarse grid, then spread over the model's patches) and its collate function, trained by `Trainer`.
"""

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.transforms import Compose, Lambda, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForMaskedImageModeling,
    Trainer,
    TrainingArguments,
    ViTForMaskedImageModeling,
    ViTImageProcessor,
)
from transformers.modeling_outputs import MaskedImageModelingOutput

from conftest import assert_same_outputs, tiny_config
from configuration_vit_custom import ViTCustomConfig
from modeling_vit_custom import ViTCustomForImageClassification, ViTCustomForMaskedImageModeling, ViTCustomModel


IMAGE_SIZE = 32  # the 8 px digits, upscaled
PATCH_SIZE = 4
MASK_PATCH_SIZE = 8  # run_mim.py's masking unit: 2x2 model patches
MASK_RATIO = 0.6


def hf_vit_twin(model: ViTCustomForMaskedImageModeling) -> ViTForMaskedImageModeling:
    """transformers' SimMIM ViT with the same weights, through the repository's ViT <-> vit-custom mapping."""
    from vit_loading.hf_vit import hf_vit_config_from_vit_custom, hf_vit_state_dict_from_vit_custom

    config = hf_vit_config_from_vit_custom(model.config)
    config.encoder_stride = model.config.patch_size
    twin = ViTForMaskedImageModeling(config)
    twin.load_state_dict(hf_vit_state_dict_from_vit_custom(model.state_dict()))
    return twin.eval()


def coarse_masks(generator: np.random.Generator, count: int) -> torch.Tensor:
    """run_mim.py's masks: ceil(ratio * cells) random cells of MASK_PATCH_SIZE px masked, flattened as 0/1 integers
    over the model's patch grid."""
    cells = IMAGE_SIZE // MASK_PATCH_SIZE
    scale = MASK_PATCH_SIZE // PATCH_SIZE
    masks = []
    for _ in range(count):
        cell_mask = np.zeros(cells * cells, dtype=int)
        cell_mask[generator.permutation(cells * cells)[: int(np.ceil(cells * cells * MASK_RATIO))]] = 1
        grid = cell_mask.reshape(cells, cells).repeat(scale, axis=0).repeat(scale, axis=1)
        masks.append(torch.tensor(grid.flatten()))
    return torch.stack(masks)


def save_model_folder(folder) -> ViTCustomForImageClassification:
    """A tiny vit-custom classifier and its image processor, saved with the remote code files."""
    torch.manual_seed(0)
    model = ViTCustomForImageClassification(
        tiny_config(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_labels=10)
    ).eval()
    model.save_pretrained(folder)
    ViTImageProcessor(size=IMAGE_SIZE, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return model


def load_as_run_mim_does(folder, **from_pretrained):
    """run_mim.py's model set-up from `--model_name_or_path folder --trust_remote_code`."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    # run_mim.py writes its --image_size, --patch_size and --encoder_stride (default: the config's) back.
    config.update(
        {"image_size": config.image_size, "patch_size": config.patch_size, "encoder_stride": config.encoder_stride}
    )
    image_processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForMaskedImageModeling.from_pretrained(
        folder, config=config, trust_remote_code=True, **from_pretrained
    )
    return model, image_processor


def digits_dataset(image_processor, seed: int = 0) -> Dataset:
    """sklearn's digits as PIL images, with run_mim.py's training transforms and masks applied on the fly."""
    digits = load_digits()
    images = [Image.fromarray((image * 255 / 16).astype(np.uint8)) for image in digits.images[:256]]
    transforms = Compose(
        [
            Lambda(lambda image: image.convert("RGB")),
            RandomResizedCrop(IMAGE_SIZE, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
            RandomHorizontalFlip(),
            ToTensor(),
            Normalize(mean=image_processor.image_mean, std=image_processor.image_std),
        ]
    )
    masks = np.random.default_rng(seed)

    def preprocess(batch):
        batch["pixel_values"] = [transforms(image) for image in batch["image"]]
        batch["mask"] = list(coarse_masks(masks, len(batch["image"])))
        return batch

    dataset = Dataset.from_dict({"image": images})
    dataset.set_transform(preprocess)
    return dataset


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "bool_masked_pos": torch.stack([example["mask"] for example in examples]),
    }


def test_run_mim_loads_the_remote_class_with_the_classifiers_encoder(tmp_path):
    classifier = save_model_folder(tmp_path / "model")
    (model, info), _ = load_as_run_mim_does(tmp_path / "model", output_loading_info=True)
    assert type(model).__name__ == "ViTCustomForMaskedImageModeling"
    assert type(model).__module__.startswith("transformers_modules.")
    assert set(info["missing_keys"]) == {"vit.embeddings.mask_token", "decoder.0.weight", "decoder.0.bias"}
    assert set(info["unexpected_keys"]) == {"classifier.weight", "classifier.bias"}
    encoder = classifier.vit.state_dict()
    for name, tensor in model.vit.state_dict().items():
        if name != "embeddings.mask_token":
            assert torch.equal(tensor, encoder[name]), name


def test_run_mim_builds_a_new_model_from_the_config(tmp_path):
    save_model_folder(tmp_path / "model")
    config = AutoConfig.from_pretrained(tmp_path / "model", trust_remote_code=True)
    model = AutoModelForMaskedImageModeling.from_config(config, trust_remote_code=True)
    assert type(model).__name__ == "ViTCustomForMaskedImageModeling"
    assert model.decoder[1].upscale_factor == PATCH_SIZE


def test_run_mim_training_on_digits_lowers_the_loss(tmp_path):
    save_model_folder(tmp_path / "model")
    model, image_processor = load_as_run_mim_does(tmp_path / "model")
    dataset = digits_dataset(image_processor)
    held_out = collate([dataset[index] for index in range(32)])  # fixed crops and masks, drawn once

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**held_out).loss.item()

    before = held_out_loss()
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=24,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        warmup_steps=2,
        logging_steps=1,
        remove_unused_columns=False,  # the transform reads the image column, which the model does not take
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        processing_class=image_processor,
        data_collator=collate,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = held_out_loss()

    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.isfinite(before) and after < 0.8 * before
    assert np.mean(losses[-6:]) < np.mean(losses[:6])


def test_simmim_matches_transformers_vit_with_the_same_weights():
    torch.manual_seed(0)
    model = ViTCustomForMaskedImageModeling(tiny_config()).eval()
    with torch.no_grad():
        model.vit.embeddings.mask_token.normal_()  # zero at initialisation: it would hide a misplaced mask token
    twin = hf_vit_twin(model)
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(3, 3, 16, 16, generator=generator)
    mask = torch.randint(0, 2, (3, 16), generator=generator)

    ours = model(pixel_values, bool_masked_pos=mask)
    theirs = twin(pixel_values, bool_masked_pos=mask.bool())

    assert isinstance(ours, MaskedImageModelingOutput)
    assert ours.reconstruction.shape == pixel_values.shape
    assert_same_outputs(ours.reconstruction, theirs.reconstruction)
    assert_same_outputs(ours.loss, theirs.loss)


def test_loss_counts_only_the_masked_pixels(pixel_values):
    model = ViTCustomForMaskedImageModeling(tiny_config()).eval()
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :4] = True  # the top row of patches: pixel rows 0-3
    output = model(pixel_values, bool_masked_pos=mask)
    top_rows = (pixel_values - output.reconstruction).abs()[:, :, :4]
    torch.testing.assert_close(output.loss, top_rows.mean(), rtol=1e-4, atol=0)
    assert model(pixel_values).loss is None


def test_without_a_mask_the_encoder_is_the_plain_model(pixel_values):
    model = ViTCustomForMaskedImageModeling(tiny_config()).eval()
    plain = ViTCustomModel(tiny_config()).eval()
    plain.load_state_dict(model.vit.state_dict(), strict=False)
    hidden = model(pixel_values, output_hidden_states=True).hidden_states
    expected = plain(pixel_values, output_hidden_states=True).hidden_states
    for ours, theirs in zip(hidden, expected, strict=True):
        assert torch.equal(ours, theirs)


def test_encoder_stride_other_than_the_patch_size_is_refused():
    with pytest.raises(ValueError, match=r"encoder_stride=16 must equal patch_size=4.*encoder_stride=4"):
        tiny_config(encoder_stride=16)
    config = tiny_config()
    config.update({"encoder_stride": 8})  # as run_mim.py's --encoder_stride does, past the config's checks
    with pytest.raises(ValueError, match=r"encoder_stride=8 must equal patch_size=4"):
        ViTCustomForMaskedImageModeling(config)
    assert ViTCustomConfig().encoder_stride is None


def test_a_mask_that_does_not_cover_the_patch_grid_is_a_clear_error(pixel_values):
    model = ViTCustomForMaskedImageModeling(tiny_config())
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*4x4 patches of 4 px.*\(3, 16\)"):
        model(pixel_values, bool_masked_pos=torch.ones(3, 4, dtype=torch.bool))


def test_a_mask_for_a_model_without_a_mask_token_is_a_clear_error(pixel_values):
    with pytest.raises(ValueError, match="without a mask token.*ViTCustomForMaskedImageModeling"):
        ViTCustomModel(tiny_config())(pixel_values, bool_masked_pos=torch.ones(3, 16, dtype=torch.bool))

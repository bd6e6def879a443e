"""Images in: folder listing, mode conversion, bad files, and the in-memory path's batch augmentation."""

import io
import json
import re

import numpy as np
import pytest
import torch
from finetune_helpers import TINY_MODEL, make_image_folder, run_main
from PIL import Image
from torchvision.transforms.v2 import functional as F

from vit_training import arguments, augment, hardware
from vit_training import images as image_data
from vit_training.checkpoints import PROGRESS_FILE
from vit_training.data import load_image_dataset, load_image_folders
from vit_training.errors import TrainingError


def test_listing_takes_classes_from_the_first_level_and_images_from_any_depth(tmp_path):
    make_image_folder(tmp_path / "train", ["cat", "dog"], images_per_class=2, size=8)
    (tmp_path / "train" / "dog" / "puppies").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "dog" / "puppies" / "p.jpg")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "empty").mkdir()
    paths, classes, others, empty = image_data.list_image_folder(tmp_path / "train")
    assert [(p.split("/train/")[1], c) for p, c in zip(paths, classes)] == [
        ("cat/0.png", "cat"), ("cat/1.png", "cat"), ("dog/0.png", "dog"), ("dog/1.png", "dog"),
        ("dog/puppies/p.jpg", "dog"),
    ]  # fmt: skip
    assert others == ["dog/notes.txt"] and empty == ["empty"]


def test_image_folders_load_with_the_training_classes_and_refuse_an_unknown_validation_class(tmp_path):
    make_image_folder(tmp_path / "train", ["cat", "dog"], images_per_class=2, size=8)
    make_image_folder(tmp_path / "val", ["dog"], images_per_class=1, size=8)
    dataset = load_image_folders(train=tmp_path / "train", validation=tmp_path / "val")
    assert dataset["train"].features["label"].names == ["cat", "dog"]
    assert dataset["train"]["label"] == [0, 0, 1, 1] and dataset["validation"]["label"] == [1]
    assert dataset["validation"][0]["image"].size == (8, 8)

    make_image_folder(tmp_path / "val", ["bird"], images_per_class=1, size=8)
    with pytest.raises(TrainingError, match=r"class folder\(s\) bird that --train_dir lacks"):
        load_image_folders(train=tmp_path / "train", validation=tmp_path / "val")
    (tmp_path / "train" / "fish").mkdir()
    with pytest.raises(TrainingError, match=r"class folder\(s\) fish hold no images"):
        load_image_folders(train=tmp_path / "train")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_grey_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    image = image_data.open_image({"bytes": png_bytes(Image.fromarray(ramp)), "path": "ramp.png"})
    assert image.mode.startswith("I")
    for mode in ("L", "RGB"):
        converted = np.asarray(image_data.to_mode(image, mode), dtype=np.float64)
        expected = np.round(ramp.astype(np.float64) * 255 / 65535)
        np.testing.assert_array_equal(converted if mode == "L" else converted[..., 0], expected)


def test_transparent_and_palette_images_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    rgb = np.asarray(image_data.to_mode(rgba, "RGB"))
    assert tuple(rgb[0, 0]) == (0, 0, 255) and tuple(rgb[1, 1]) == (255, 255, 255)
    palette = rgba.convert("P")
    palette.info["transparency"] = palette.getpixel((1, 1))
    assert tuple(np.asarray(image_data.to_mode(palette, "RGB"))[1, 1]) == (255, 255, 255)
    half = Image.new("LA", (2, 2), (0, 128))  # black at half opacity, on white: mid grey
    assert abs(int(np.asarray(image_data.to_mode(half, "L"))[0, 0]) - 127) <= 1
    colour = Image.new("RGB", (2, 2), (200, 100, 50))
    assert np.asarray(image_data.to_mode(colour, "L"))[0, 0] == np.asarray(colour.convert("L"))[0, 0]  # ITU-R 601
    assert (np.asarray(image_data.to_mode(Image.new("L", (2, 2), 77), "RGB")) == 77).all()


def test_a_truncated_file_is_named():
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    with pytest.raises(image_data.BadImageError, match="shot.png"):
        image_data.open_image({"bytes": data[: len(data) // 2], "path": "shot.png"})


def test_batch_crops_match_torchvision_resized_crop_inside_the_box():
    images = torch.rand(3, 2, 12, 10) * 255
    boxes = torch.tensor([[0, 0, 10, 12, 0], [2, 3, 6, 4, 0], [1, 2, 8, 8, 1]], dtype=torch.float64)
    crops = augment.resized_crops(images, boxes, (12, 10))
    for image, box, crop in zip(images, boxes.int().tolist(), crops, strict=True):
        left, top, width, height, mirror = box
        expected = F.resized_crop(image, top, left, height, width, [12, 10], antialias=False)
        expected = F.horizontal_flip(expected) if mirror else expected
        # Enlarged boxes differ on their edges only (see resized_crops); a box the image's size is exact everywhere.
        inner = (slice(None), slice(2, -2), slice(2, -2)) if (width, height) != (10, 12) else slice(None)
        torch.testing.assert_close(crop[inner], expected[inner], rtol=1e-5, atol=1e-3)


def test_batch_augmentation_draws_crops_like_random_resized_crop_and_depends_only_on_seed_epoch_and_sample():
    augmentation = augment.Augmentation((16, 16), (0.35, 1.0), True, seed=3)
    batch_augment = augment.BatchAugment(augmentation, [0.5], [0.5], num_samples=5000)
    boxes = batch_augment.crop_boxes(batch_augment.epoch_table(), (20, 30))
    area = boxes[:, 2] * boxes[:, 3] / 600
    assert area.min() >= 0.35 * 0.85 and area.max() <= 1.0 + 1e-9  # clamped to the image: a little below the range
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 30 + 1e-9).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 20 + 1e-9).all()
    assert 0.45 < boxes[:, 4].mean() < 0.55

    images = torch.randint(0, 256, (5000, 1, 20, 30), dtype=torch.uint8)
    dataset = image_data.InMemoryImages(images, torch.zeros(5000, dtype=torch.long))
    alone = batch_augment(dataset.__getitems__([7]))["pixel_values"]
    batched = batch_augment(dataset.__getitems__([3, 7, 11]))
    torch.testing.assert_close(batched["pixel_values"][1:2], alone, rtol=0, atol=0)
    augmentation.epoch = 1
    assert not torch.equal(batch_augment(dataset.__getitems__([7]))["pixel_values"], alone)


def test_crop_ratio_bounds_the_crops_aspect_and_a_full_square_crop_leaves_the_image_as_it_is():
    narrow = augment.Augmentation((20, 20), (0.3, 0.6), False, seed=3, crop_ratio=(0.5, 0.8))
    batch_augment = augment.BatchAugment(narrow, [0.5], [0.5], num_samples=2000)
    boxes = batch_augment.crop_boxes(batch_augment.epoch_table(), (20, 20))
    ratio = boxes[:, 2] / boxes[:, 3]  # never clamped: at most 60% of the area, at most 0.8 wide for 1 high
    assert ratio.min() >= 0.5 - 1e-9 and ratio.max() <= 0.8 + 1e-9
    assert ratio.min() < 0.52 and ratio.max() > 0.78
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8))
    one_image = narrow.torchvision()(image)
    assert one_image.shape == (1, 20, 20) and not torch.equal(one_image, F.pil_to_tensor(image))

    # --crop_scale 1 1 --crop_ratio 1 1: no crop, on both paths.
    off = augment.Augmentation((20, 20), (1.0, 1.0), False, seed=3, crop_ratio=(1.0, 1.0))
    images = torch.randint(0, 256, (4, 1, 20, 20), dtype=torch.uint8)
    batch = augment.BatchAugment(off, [0.0], [1.0], num_samples=4)(
        image_data.InMemoryImages(images, torch.zeros(4, dtype=torch.long)).__getitems__([0, 1, 2, 3])
    )
    torch.testing.assert_close(batch["pixel_values"], images.float() / 255, rtol=0, atol=1e-6)
    assert torch.equal(off.torchvision()(image), F.pil_to_tensor(image))


def test_in_memory_and_worker_runs_report_where_the_images_went(tmp_path):
    make_image_folder(tmp_path / "data" / "train", ["a", "b"], images_per_class=12, size=12)
    make_image_folder(tmp_path / "data" / "val", ["a", "b"], images_per_class=3, size=12, seed=1)
    # Mixed modes among them: grey, palette, RGBA, 16-bit grey.
    Image.new("L", (12, 12), 90).save(tmp_path / "data" / "train" / "a" / "grey.png")
    Image.new("RGB", (12, 12), (250, 10, 10)).convert("P").save(tmp_path / "data" / "train" / "a" / "palette.png")
    Image.new("RGBA", (12, 12), (0, 0, 250, 128)).save(tmp_path / "data" / "train" / "b" / "alpha.png")
    Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(tmp_path / "data" / "train" / "b" / "deep.png")
    broken = tmp_path / "data" / "train" / "b" / "broken.png"
    broken.write_bytes(png_bytes(Image.new("RGB", (12, 12)))[:40])
    common = [*TINY_MODEL, "--image_size", 12, "--patch_size", 4, "--train_dir", tmp_path / "data" / "train",
              "--validation_dir", tmp_path / "data" / "val", "--num_train_epochs", 2,
              "--per_device_train_batch_size", 8]

    with pytest.raises(TrainingError, match="broken.png.*--on_bad_image skip"):
        run_main(*common, "--output_dir", tmp_path / "stopped")
    for loading in ("on", "off"):
        output_dir = tmp_path / loading
        results = run_main(*common, "--images_in_memory", loading, "--on_bad_image", "skip", "--output_dir", output_dir)
        # 29 images, one broken: the broken one is counted once per epoch.
        assert results["skipped_images"] == 1 and results["train_samples"] == 29
        assert json.loads((output_dir / "all_results.json").read_text())["seconds_to_first_step"] > 0


def test_a_bad_image_met_by_a_loader_worker_stops_with_its_name_and_keeps_the_steps_done(tmp_path):
    make_image_folder(tmp_path / "train", ["a", "b"], images_per_class=16, size=8)
    (tmp_path / "train" / "b" / "z-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    output_dir = tmp_path / "out"
    arguments = [*TINY_MODEL, "--image_size", 8, "--patch_size", 4, "--train_dir", tmp_path / "train",
                 "--images_in_memory", "off", "--dataloader_num_workers", 1, "--per_device_train_batch_size", 4,
                 "--train_val_split", 0.1, "--output_dir", output_dir]  # fmt: skip
    with pytest.raises(TrainingError) as error:
        run_main(*arguments)
    message = str(error.value)
    assert "z-broken.png" in message and "Traceback" not in message and "--on_bad_image skip" in message
    if "steps done are saved" in message:  # unless the bad image was in the very first batch
        assert list(output_dir.glob("checkpoint-*")) and "--resume_from_checkpoint latest" in message


def test_verify_images_names_every_bad_file_before_training(tmp_path):
    make_image_folder(tmp_path / "train", ["a", "b"], images_per_class=3, size=8)
    for name in ("x.png", "y.jpg"):
        (tmp_path / "train" / "a" / name).write_text("no image")
    with pytest.raises(TrainingError, match=r"2 image\(s\) cannot be decoded: ") as error:
        run_main(*TINY_MODEL, "--train_dir", tmp_path / "train", "--verify_images", "--output_dir", tmp_path / "out")
    assert "a/x.png" in str(error.value) and "a/y.jpg" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_threads_follow_the_cores_for_large_layers_stay_single_for_small_ones_and_are_timed_between(
    monkeypatch, tmp_path
):
    from accelerate import Accelerator
    from finetune_helpers import fresh_accelerate_state

    from configuration_vit_custom import ViTCustomConfig

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tiny = ViTCustomConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32)  # fmt: skip
    digits = ViTCustomConfig(**arguments.DIGITS_MODEL)
    fashion = ViTCustomConfig(image_size=28, patch_size=4, hidden_size=192, num_hidden_layers=6,
                              num_attention_heads=3, intermediate_size=768, num_channels=1)  # fmt: skip
    # The recipe benchmark's model: 1.3x as fast on two threads on the slower of the machines measured.
    small_fashion = ViTCustomConfig(image_size=28, patch_size=7, hidden_size=96, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=384, num_channels=1)  # fmt: skip
    with fresh_accelerate_state():
        accelerator = Accelerator(cpu=True)
        assert "too few" in hardware.set_threads(None, accelerator, 2, tiny, batch=8)
        assert torch.get_num_threads() == 1
        for config, batch in ((fashion, 128), (small_fashion, 64)):  # no trial: many multiply-adds per core
            torch.set_num_threads(1)
            assert "per layer and core" in hardware.set_threads(None, accelerator, 2, config, batch)
            assert torch.get_num_threads() == 2
        # The digits model lies between: a few steps on 1 and 2 threads decide, and leave the random stream alone.
        random_state = torch.get_rng_state()
        reason = hardware.set_threads(None, accelerator, 2, digits, batch=32)
        assert torch.equal(torch.get_rng_state(), random_state)
        one, two = (float(ms) for ms in re.findall(r"([\d.]+) ms", reason))
        assert torch.get_num_threads() == (2 if one >= hardware.MIN_THREAD_SPEEDUP * two else 1), reason
        # A resumed run keeps the threads of the run it continues, which its checkpoint records.
        checkpoint = tmp_path / "checkpoint-4"
        checkpoint.mkdir()
        torch.save({"threads": 2, "compiled": False}, checkpoint / PROGRESS_FILE)
        torch.set_num_threads(1)
        assert "continues" in hardware.set_threads(None, accelerator, 2, tiny, batch=8, checkpoint=checkpoint)
        assert torch.get_num_threads() == 2
        # --num_threads (applied already) and $OMP_NUM_THREADS win.
        assert hardware.set_threads(3, accelerator, 2, fashion, batch=128) == "--num_threads 3"
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert hardware.set_threads(None, accelerator, 2, fashion, batch=128) == "OMP_NUM_THREADS=1"
        assert torch.get_num_threads() == 1


def test_a_checkpoint_records_the_threads_its_run_trained_on(tmp_path):
    run_main(*TINY_MODEL, "--num_train_epochs", 1, "--max_train_samples", 32, "--max_eval_samples", 16,
             "--per_device_train_batch_size", 16, "--checkpointing_steps", 2, "--num_threads", 2,
             "--output_dir", tmp_path / "run")  # fmt: skip
    assert torch.load(tmp_path / "run" / "checkpoint-2" / PROGRESS_FILE, weights_only=True)["threads"] == 2
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["train_threads"] == 2


def test_a_local_dataset_folder_with_split_sub_folders_is_listed_like_image_folders(tmp_path):
    make_image_folder(tmp_path / "fashion" / "train", ["coat", "shirt"], images_per_class=4, size=8)
    make_image_folder(tmp_path / "fashion" / "val", ["coat", "shirt"], images_per_class=2, size=8, seed=1)
    make_image_folder(tmp_path / "fashion" / "test", ["shirt"], images_per_class=3, size=8, seed=2)
    dataset = load_image_dataset(dataset_name=str(tmp_path / "fashion"))
    assert {name: len(split) for name, split in dataset.items()} == {"train": 8, "validation": 4, "test": 3}
    assert dataset["test"]["label"] == [1, 1, 1]

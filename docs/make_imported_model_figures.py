#!/usr/bin/env python
"""Draw the README's figures of an imported model, offline: a timm ViT fitted here, explained on real photos.

No pretrained ViT can be downloaded on this project's machines, so a small timm `VisionTransformer` (64 px, 8 px
patches, 4 blocks of width 96, 3 heads) is fitted for 300 steps (minutes on 2 CPU cores) to tell six of
scikit-image's sample photos apart from random crops of them. It is saved the way timm saves to the Hub, then
`explain.py` imports it through `vit_loading.load_model` and explains it on the full photos:

    python docs/make_imported_model_figures.py docs/explain/timm
"""

import argparse
import sys
import tempfile
from pathlib import Path

import skimage.data
import timm
import torch
from PIL import Image
from timm.models._hub import save_for_hf
from torchvision.transforms import v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import explain  # noqa: E402  (after the repository is on the path)


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
IMAGE_SIZE = 64


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="Where to write the figures.")
    parser.add_argument("--steps", type=int, default=300, help="Training steps of the timm model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialisation and the crops.")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as workdir:
        photo_files = save_photos(Path(workdir) / "photos")
        model = fit_timm_vit([Image.open(path) for path in photo_files], args.steps)
        save_for_hf(
            model,
            Path(workdir) / "timm-vit",
            model_config={"label_names": list(PHOTOS)},
            safe_serialization=True,
        )
        explain.main(
            [str(Path(workdir) / "timm-vit"), "--images", *map(str, photo_files), "--output_dir", str(args.output_dir)]
        )


def save_photos(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for name in PHOTOS:
        paths.append(folder / f"{name}.png")
        Image.fromarray(getattr(skimage.data, name)()).save(paths[-1])
    return paths


def fit_timm_vit(photos: list[Image.Image], steps: int) -> torch.nn.Module:
    """A timm ViT that tells which photo a random crop (10% to 100% of it, maybe flipped) comes from."""
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE_SIZE, patch_size=8, embed_dim=96, depth=4,
        num_heads=3, num_classes=len(photos),
    )  # fmt: skip
    crop = T.Compose(
        [
            T.RandomResizedCrop(IMAGE_SIZE, scale=(0.1, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=[0.5] * 3, std=[0.5] * 3),  # timm's vit_tiny_patch16_224 preprocessing, saved with it
        ]
    )
    photos = [photo.convert("RGB") for photo in photos]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        labels = torch.randint(len(photos), (48,))
        batch = torch.stack([crop(photos[label]) for label in labels.tolist()])
        loss = torch.nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    return model.eval()


if __name__ == "__main__":
    main()

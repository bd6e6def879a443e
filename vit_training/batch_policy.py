"""torchvision's TrivialAugmentWide, RandAugment and random erasing over a whole batch of small images at once.

torchvision applies a policy to one image per call: about 0.3 ms of overhead an image, more than a small ViT's
training step spends on it. Here every image still draws its own ops, magnitudes, signs and erased rectangle, but each
op runs once over all the images that drew it, with a magnitude per image, as torchvision's kernels compute it (the
ops are torchvision's, from its policy's `_AUGMENTATION_SPACE`; tests/test_batch_policy.py compares the two).

The draws are uniforms given by the caller, one row per image (`BatchPolicy.columns` of them), so that they can come
from a table seeded by (seed, epoch) and indexed by sample, like the crops of `augment.BatchAugment`.
"""

import math

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

# Draws per op: which op, its magnitude bin, its sign. Random erasing: whether, area, aspect ratio, top, left.
OP_COLUMNS, ERASE_COLUMNS = 3, 5
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class BatchPolicy:
    """`policy` (a torchvision `TrivialAugmentWide` or `RandAugment`, or None), then random erasing with probability
    `erasing.p` (a torchvision `RandomErasing`: its scale, ratio and fill value), of `(N, C, H, W)` float images in
    [0, 1] of size `image_size`."""

    def __init__(self, policy: T.TrivialAugmentWide | T.RandAugment | None, erasing: T.RandomErasing,
                 image_size: tuple[int, int]):  # fmt: skip
        self.erasing, self.image_size = erasing, tuple(image_size)
        space = policy._AUGMENTATION_SPACE if policy is not None else {}
        self.names = list(space)
        self.num_ops = 0 if policy is None else getattr(policy, "num_ops", 1)
        self.num_bins = 0 if policy is None else policy.num_magnitude_bins
        self.fixed_bin = getattr(policy, "magnitude", None)  # RandAugment's one magnitude; TrivialAugmentWide draws
        # (op, bin) -> magnitude, 0 for the ops without one; whether each op's magnitude takes a random sign.
        self._table = torch.zeros(len(self.names), max(self.num_bins, 1), dtype=torch.float64)
        for index, (bins, _) in enumerate(space.values()):
            magnitudes = bins(self.num_bins, *image_size)
            if magnitudes is not None:
                self._table[index] = magnitudes.double()
        self._signed = torch.tensor([signed for _, signed in space.values()], dtype=torch.bool)

    @property
    def columns(self) -> int:
        return OP_COLUMNS * self.num_ops + ERASE_COLUMNS

    def ops(self, draws: torch.Tensor) -> list[list[tuple[str, float]]]:
        """Per op slot, each image's (op name, signed magnitude), as torchvision would pick them from these draws."""
        slots = []
        for slot in range(self.num_ops):
            which, level, sign = draws[:, OP_COLUMNS * slot : OP_COLUMNS * (slot + 1)].unbind(1)
            indices = (which * len(self.names)).long().clamp(max=len(self.names) - 1)
            if self.fixed_bin is None:
                levels = (level * self.num_bins).long().clamp(max=self.num_bins - 1)
            else:
                levels = torch.full_like(indices, self.fixed_bin)
            magnitudes = self._table[indices, levels]
            magnitudes = torch.where(self._signed[indices] & (sign <= 0.5), -magnitudes, magnitudes)
            slots.append([(self.names[i], m) for i, m in zip(indices.tolist(), magnitudes.tolist(), strict=True)])
        return slots

    def erase_boxes(self, draws: torch.Tensor) -> torch.Tensor:
        """`(N, 5)` long: 1 to erase, then top, left, height and width of the rectangle. torchvision's draw, except
        that a rectangle too large for the image is clamped to it instead of drawn again."""
        height, width = self.image_size
        apply, area, ratio, top, left = draws[:, -ERASE_COLUMNS:].unbind(1)
        low, high = self.erasing.scale
        area = height * width * (low + (high - low) * area)
        log_low, log_high = math.log(self.erasing.ratio[0]), math.log(self.erasing.ratio[1])
        aspect = torch.exp(log_low + (log_high - log_low) * ratio)
        box_height = torch.sqrt(area * aspect).round().long().clamp(1, height - 1)
        box_width = torch.sqrt(area / aspect).round().long().clamp(1, width - 1)
        top = (top * (height - box_height + 1)).long().clamp(max=height - box_height)
        left = (left * (width - box_width + 1)).long().clamp(max=width - box_width)
        return torch.stack([(apply < self.erasing.p).long(), top, left, box_height, box_width], dim=1)

    def __call__(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The images augmented, each by its row of `draws` (`(N, columns)` uniforms in [0, 1))."""
        images = images.clone()
        for slot in self.ops(draws):
            # The geometric ops all sample through a matrix: one grid_sample for all of them.
            names = ["affine" if name in GEOMETRIC else name for name, _ in slot]
            magnitudes = torch.tensor([magnitude for _, magnitude in slot], dtype=torch.float64)
            for name in [name for name in dict.fromkeys(names) if name != "Identity"]:
                chosen = [index for index, other in enumerate(names) if other == name]
                if name == "affine":
                    matrices = [_inverse_matrix(*slot[index], images.shape[-2:]) for index in chosen]
                    images[chosen] = _affine(images[chosen], matrices)
                else:
                    images[chosen] = apply_op(name, images[chosen], magnitudes[chosen])
        if self.erasing.p > 0:
            images = erase(images, self.erase_boxes(draws), self.erasing.value)
        return images


def apply_op(name: str, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """torchvision's `_apply_image_or_video_transform(image, name, magnitude)` (nearest sampling, zero fill) of
    `(N, C, H, W)` float images in [0, 1], image i with `magnitudes[i]`."""
    if name == "Identity":
        return images
    if name in GEOMETRIC:
        return _affine(images, [_inverse_matrix(name, float(m), images.shape[-2:]) for m in magnitudes])
    factor = (1.0 + magnitudes).to(images.dtype).view(-1, 1, 1, 1)
    if name == "Brightness":
        return images.mul(factor).clamp_(0, 1)
    if name == "Color":
        if images.shape[1] == 1:  # as PIL, no saturation to change in grey
            return images
        return _blend(images, F.rgb_to_grayscale(images, num_output_channels=1), factor)
    if name == "Contrast":
        grey = F.rgb_to_grayscale(images, num_output_channels=1) if images.shape[1] == 3 else images
        return _blend(images, grey.mean(dim=(-3, -2, -1), keepdim=True), factor)
    if name == "Sharpness":
        return _sharpen(images, factor)
    if name == "Posterize":
        levels = (2.0 ** magnitudes.int()).to(images.dtype).view(-1, 1, 1, 1)
        return images.mul(levels).floor_().clamp_(torch.zeros_like(levels), levels - 1).div_(levels)
    if name == "Solarize":
        threshold = magnitudes.to(images.dtype).view(-1, 1, 1, 1)  # the magnitude of the float bound 1
        return torch.where(images >= threshold, 1.0 - images, images)
    if name == "AutoContrast":
        return F.autocontrast(images)
    if name == "Equalize":
        return F.equalize(images)
    if name == "Invert":
        return F.invert(images)
    raise ValueError(f"no batched version of the augmentation op {name!r}")


def _inverse_matrix(name: str, magnitude: float, size: torch.Size) -> list[float]:
    """The inverse affine matrix torchvision's `F.affine` / `F.rotate` samples with for this op."""
    height, width = size
    if name in ("ShearX", "ShearY"):  # sheared about the top-left corner
        shear = math.degrees(math.atan(magnitude))
        shears = [shear, 0.0] if name == "ShearX" else [0.0, shear]
        return _get_inverse_affine_matrix([-width * 0.5, -height * 0.5], 0.0, [0.0, 0.0], 1.0, shears)
    if name in ("TranslateX", "TranslateY"):  # whole pixels
        shift = [float(int(magnitude)), 0.0] if name == "TranslateX" else [0.0, float(int(magnitude))]
        return _get_inverse_affine_matrix([0.0, 0.0], 0.0, shift, 1.0, [0.0, 0.0])
    return _get_inverse_affine_matrix([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], 1.0, [0.0, 0.0])


def _affine(images: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    """Each image sampled (nearest, zeros outside) through its inverse matrix, with torchvision's pixel grid."""
    height, width = images.shape[-2:]
    theta = torch.tensor(matrices, dtype=images.dtype).view(-1, 2, 3)
    base = torch.ones(1, height, width, 3, dtype=images.dtype)
    base[..., 0] = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width)
    base[..., 1] = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height).unsqueeze(-1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=images.dtype)
    grid = torch.matmul(base.view(1, height * width, 3), scaled).view(-1, height, width, 2)
    return torch.nn.functional.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor + other * (1.0 - factor)).clamp_(0, 1)


def _sharpen(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `adjust_sharpness`: the inner pixels blended with a 3x3 smoothing (5 in the middle, 1 around)."""
    channels, height, width = images.shape[-3:]
    if height <= 2 or width <= 2:
        return images
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=images.dtype) / 13.0
    blurred = torch.nn.functional.conv2d(images, kernel.expand(channels, 1, 3, 3), groups=channels)
    output = images.clone()
    inner = output[..., 1:-1, 1:-1]
    inner.add_((blurred - inner) * (1.0 - factor))
    return output.clamp_(0, 1)


def erase(images: torch.Tensor, boxes: torch.Tensor, value: list[float]) -> torch.Tensor:
    """Fill each image's box (erase, top, left, height, width) with `value` (one per channel) where erase is 1."""
    height, width = images.shape[-2:]
    erase_it, top, left, box_height, box_width = (column.view(-1, 1, 1) for column in boxes.unbind(1))
    rows = torch.arange(height).view(1, -1, 1)
    columns = torch.arange(width).view(1, 1, -1)
    inside = (erase_it == 1) & (rows >= top) & (rows < top + box_height) & (columns >= left)
    inside &= columns < left + box_width
    fill = torch.tensor(value, dtype=images.dtype).view(1, -1, 1, 1).expand_as(images)
    return torch.where(inside.unsqueeze(1), fill, images)

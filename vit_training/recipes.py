"""Named training recipes: the settings each one sets, their checks, and the learning rate scaled with the batch.

A recipe is a plain dict of setting name -> value, named as the script's flags. `resolve_recipe` lays the flags a
user passed over a recipe; the result is every setting of the run, for all_results.json and the model card.
"""

import math
import re
from dataclasses import dataclass, field

from vit_training.errors import TrainingError
from vit_training.flag_types import flag, positive_float, positive_int, rate_or_none

POLICIES = "`none`, `trivial` (TrivialAugmentWide) or `rand-m<magnitude>-n<ops>` (RandAugment, e.g. rand-m9-n2)"

# Plain training: mild crops (and flips, except for the digits), label smoothing, one learning rate scaled with the
# batch. The default for a new model of your own data; the other recipes are told as changes to it.
BASIC = {
    "auto_augment": "none",
    "random_erasing": 0.0,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "mix_prob": 1.0,
    "mix_switch_prob": 0.5,
    "label_smoothing": 0.1,
    "ema_decay": None,
    "layer_decay": None,
    "learning_rate": None,
    "lr_base": 1e-3,
    "lr_base_size": 32,
    "lr_base_scale": "sqrt",
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "drop_path_rate": None,
    "crop_scale": [0.85, 1.0],
    "crop_ratio": [3 / 4, 4 / 3],
    "repeated_augmentation": 1,
}
RECIPES = {
    "basic": BASIC,
    # Fine-tuning a pretrained checkpoint: a learning rate that decays from the head down to the embeddings, so the
    # pretrained lower layers move least.
    "finetune": {**BASIC, "layer_decay": 0.75},
    # A few thousand images seen tens of times each, as the built-in digits (1,293 images, 40 epochs; the default
    # there): `basic` fits them, and RandAugment (Cubuk et al. 2020) at DeiT's and timm's magnitude 9 with 2 ops, and
    # crops down to 70% of the image, show each digit another way every epoch. With the digits model at 32 px, seeds
    # 1-10 make 17 test errors in all, against 27 for the previous default (`basic` at 16 px; benchmarks/README.md),
    # for about a third more training time.
    "randaugment": {**BASIC, "auto_augment": "rand-m9-n2", "crop_scale": [0.7, 1.0]},
    # Masked-image pre-training (run_pretrain.py): the images are the task; no labels to smooth.
    "pretrain": {**BASIC, "label_smoothing": 0.0},
    # Training from scratch on a small dataset for long: DeiT's regularisation (Touvron et al. 2021), as the
    # small-data ViT papers use it (Lee et al. 2021; Hassani et al. 2021) over hundreds of epochs, made milder: half
    # the batches mixed, crops that keep most of a small image, an EMA horizon of about 1,000 steps. TrivialAugmentWide
    # replaces RandAugment: as strong, with no magnitude to tune. Over a few tens of epochs it regularises more than
    # it helps (benchmarks/README.md has the measurements), so it is not the default.
    "from-scratch": {
        **BASIC,
        "auto_augment": "trivial",
        "random_erasing": 0.25,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "mix_prob": 0.5,
        "ema_decay": 0.999,
        "drop_path_rate": 0.1,
        "repeated_augmentation": 3,
    },
}


def resolve_recipe(name: str, explicit: dict) -> dict:
    """Every setting of recipe `name`, with the values in `explicit` (the flags the user passed) winning; checked."""
    if name not in RECIPES:
        raise TrainingError(f"--recipe {name}: unknown; choose one of {', '.join(RECIPES)}.")
    settings = {"recipe": name, **RECIPES[name], **explicit}
    check_settings(settings)
    return settings


def check_settings(settings: dict):
    """Raise a `TrainingError` naming the first setting outside its valid range."""
    for name in ("mixup_alpha", "cutmix_alpha"):
        _check(settings, name, lambda value: value >= 0, "must be >= 0 (0 turns it off)")
    for name in ("random_erasing", "mix_prob", "mix_switch_prob"):
        _check(settings, name, lambda value: 0 <= value <= 1, "must be a probability in [0, 1]")
    _check(settings, "label_smoothing", lambda value: 0 <= value < 1, "must be in [0, 1)")
    _check(settings, "ema_decay", lambda value: value is None or 0 < value < 1, "must be in (0, 1), or `none` (off)")
    _check(settings, "layer_decay", lambda value: value is None or 0 < value <= 1, "must be in (0, 1], or `none` (off)")
    _check(settings, "lr_base", lambda value: value > 0, "must be > 0")
    _check(settings, "lr_base_size", lambda value: value >= 1, "must be a batch size >= 1")
    _check(settings, "lr_base_scale", lambda value: value in ("linear", "sqrt"), "must be `linear` or `sqrt`")
    _check(settings, "crop_scale", lambda value: 0 < value[0] <= value[1] <= 1,
           "must be MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the image's area)")  # fmt: skip
    _check(settings, "crop_ratio", lambda value: 0 < value[0] <= value[1], "must be MIN MAX with 0 < MIN <= MAX")
    _check(settings, "repeated_augmentation", lambda value: value >= 1, "must be a number of copies >= 1")
    policy_parameters(settings["auto_augment"])


def policy_parameters(name: str) -> tuple[int, int] | None:
    """`--auto_augment name` checked: None for `none` and `trivial`, RandAugment's (magnitude, ops) for `rand-...`."""
    if name in ("none", "trivial"):
        return None
    match = re.fullmatch(r"rand-m(\d+)-n(\d+)", name)
    if match and int(match[1]) <= 30 and int(match[2]) >= 1:
        return int(match[1]), int(match[2])
    raise TrainingError(f"--auto_augment {name}: must be {POLICIES}, with a magnitude in [0, 30] and at least 1 op.")


def _check(settings: dict, name: str, valid, requirement: str):
    value = settings[name]
    if not valid(value):
        shown = " ".join(str(item) for item in value) if isinstance(value, (list, tuple)) else value
        raise TrainingError(f"--{name} {shown}: {requirement}.")


def check_layer_decay(layer_decay: float | None, num_hidden_layers: int):
    """Layer decay needs encoder layers to decay over."""
    if layer_decay is not None and num_hidden_layers < 1:
        raise TrainingError(
            f"--layer_decay {layer_decay}: the model has no encoder layers to decay the learning rate over; leave "
            "--layer_decay unset."
        )


def check_mixing(settings: dict, problem_type: str):
    """Mixup and CutMix mix single-label classes: refuse them for multi-label classification or regression."""
    if problem_type != "single_label_classification" and settings["mix_prob"] > 0:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if settings[name] > 0:
                raise TrainingError(
                    f"--{name} {settings[name]}: Mixup and CutMix mix one class per image, but this is "
                    f"{problem_type.replace('_', ' ')}; pass --mixup_alpha 0 --cutmix_alpha 0."
                )


def scaled_learning_rate(lr_base: float, lr_base_size: int, global_batch: int, scale: str) -> float:
    """`lr_base` (the learning rate at a global batch of `lr_base_size`) scaled to `global_batch`: in proportion
    (`linear`, as DeiT with SGD-like optimisers) or with its square root (`sqrt`, timm's rule for Adam-like ones)."""
    ratio = global_batch / lr_base_size
    return lr_base * (ratio if scale == "linear" else math.sqrt(ratio))


def learning_rate(settings: dict, global_batch: int) -> float:
    """The run's peak learning rate: `learning_rate` if set, else `lr_base` scaled to `global_batch`."""
    if settings["learning_rate"] is not None:
        return settings["learning_rate"]
    return scaled_learning_rate(settings["lr_base"], settings["lr_base_size"], global_batch, settings["lr_base_scale"])


@dataclass
class RecipeArguments:
    """recipe (a named set of augmentation and optimisation settings; every flag here, and --learning_rate,
    --weight_decay, --warmup_steps, --label_smoothing, --crop_scale, --crop_ratio and --drop_path_rate, overrides its
    value)"""

    recipe: str | None = flag(
        choices=tuple(RECIPES),
        help="`basic`: mild crops, label smoothing. `finetune`: `basic` with layer-wise learning-rate decay, for a "
        "pretrained checkpoint. `randaugment`: `basic` with RandAugment (m9, n2) and wider crops, for a few thousand "
        "images over tens of epochs. `from-scratch`: the small-data recipe for long runs (TrivialAugmentWide, random "
        "erasing, Mixup/CutMix, EMA, drop path). `pretrain`: `basic` without label smoothing, for run_pretrain.py. "
        "Default: run_pretrain.py's `pretrain`; run_finetune.py's `finetune` with --model_name_or_path, "
        "`randaugment` for the built-in digits, else `basic`. vit_training/recipes.py lists their values.",
        resumed=True,
    )
    auto_augment: str | None = flag(
        help="Per-image augmentation policy: `none`, `trivial` (TrivialAugmentWide) or `rand-m<M>-n<N>` "
        "(RandAugment, magnitude M in [0, 30], N ops).",
        recipe=True,
    )
    random_erasing: float | None = flag(
        type=float, help="Probability of erasing a random rectangle of each training image, in [0, 1].", recipe=True
    )
    mixup_alpha: float | None = flag(type=float, help="Mixup's Beta(alpha, alpha); 0 turns Mixup off.", recipe=True)
    cutmix_alpha: float | None = flag(type=float, help="CutMix's Beta(alpha, alpha); 0 turns CutMix off.", recipe=True)
    mix_prob: float | None = flag(
        type=float, help="Probability that a batch is mixed (Mixup or CutMix), in [0, 1].", recipe=True
    )
    mix_switch_prob: float | None = flag(
        type=float, help="With both on, the probability that a mixed batch uses CutMix, in [0, 1].", recipe=True
    )
    ema_decay: float | str | None = flag(
        type=rate_or_none,
        help="Keep an exponential moving average of the weights with this decay, in (0, 1), and evaluate and save it "
        "instead of the last weights; `none`: off.",
        recipe=True,
    )
    layer_decay: float | str | None = flag(
        type=rate_or_none,
        help="Layer-wise learning-rate decay, in (0, 1]: block i of L trains at lr x decay**(L + 1 - i), the "
        "embeddings at lr x decay**(L + 1); `none`: off.",
        recipe=True,
    )
    lr_base: float | None = flag(
        type=positive_float, help="The peak learning rate at a global batch of --lr_base_size.", recipe=True
    )
    lr_base_size: int | None = flag(
        type=positive_int, help="The global batch (images per optimizer step) --lr_base is for.", recipe=True
    )
    lr_base_scale: str | None = flag(
        choices=("linear", "sqrt"),
        help="How the learning rate follows the global batch: in proportion, or with its square root (for Adam).",
        recipe=True,
    )
    repeated_augmentation: int | None = flag(
        type=positive_int,
        help="With several processes: copies of each image per epoch, each augmented its own way and trained on "
        "by another process (DeiT's repeated augmentation); 1 turns it off.",
        recipe=True,
    )
    # Every setting of the recipe as this run uses it, the flags given included (set by `parse_args`).
    settings: dict = field(default_factory=dict)

"""The command line of a training script as grouped dataclasses, their validators, and the new-model flags derived
from `ViTCustomConfig`'s fields.

Each field's metadata holds its flag's help and argparse options; `needs` names a field of the same group without
which the flag would be ignored, and `resumed` marks what a resumed run must repeat. A JSON or YAML file of
`{flag: value}` may stand first on the command line; the flags after it override its values.

Nothing here imports torch or transformers: `--help` and a mistyped flag are answered before the libraries load.
"""

import argparse
import ast
import json
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from vit_loading import unwritable_folder_reason
from vit_training.errors import TrainingError
from vit_training.flag_types import (
    flag,
    checkpointing_interval, fraction, non_negative_float, non_negative_int, positive_float, positive_int, probability,
    rate_or_none, seed, split_fraction, warmup, worker_count,
)
from vit_training.recipes import RecipeArguments, resolve_recipe

CONFIG_SOURCE = Path(__file__).resolve().parent.parent / "configuration_vit_custom.py"
# Accelerate's trackers (accelerate.utils.LoggerType), written out because importing Accelerate takes seconds; a test
# checks that they agree.
TRACKERS = ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")
# The schedules that need nothing but the step counts (not reduce_lr_on_plateau, which needs metrics).
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


# ----------------------------------------------------------------------------------------------------------------------
# Fields


# ----------------------------------------------------------------------------------------------------------------------
# The model's config fields

# The model trained when neither --model_name_or_path nor --preset is given: a 4-block ViT for the 8x8 digits, which
# are upscaled to 32 px and cut into 8x8 patches (16 tokens, each covering 2x2 original pixels). At 32 px rather than
# 16 the augmentation's crops, rotations and shears resample on a finer grid: with the `randaugment` recipe, seeds 1-10
# make 17 test errors in all at 32 px against 26 at 16 px; a forward and backward pass takes as long at either size
# (28 ms at batch 32 on 2 cores of a 2 GHz Xeon; benchmarks/README.md).
DIGITS_MODEL = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "pooling": "mean",
}


# Fields of ViTCustomConfig that are no flags: a switch of the loaded model, and the masked-image decoder's stride.
NOT_FLAGS = {"interpolate_pos_encoding", "encoder_stride"}
# The fields a checkpoint's weights leave free: a new resolution (its position embeddings are resampled to it) and the
# regularisation. The converter refuses to change the others, which the weights fix.
CHECKPOINT_FIELDS = {"image_size", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"}
# Channels the images are converted to: grey or RGB.
CHANNELS = (1, 3)


def config_flags() -> dict[str, dict]:
    """The flag options of every field of `ViTCustomConfig`, from its annotations, defaults and docstring.

    Read from configuration_vit_custom.py's source: importing it imports torch, seconds before --help could answer.
    """
    tree = ast.parse(CONFIG_SOURCE.read_text())
    constants = {
        node.targets[0].id: node.value for node in tree.body if isinstance(node, ast.Assign) and len(node.targets) == 1
    }
    config = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ViTCustomConfig")
    docs = dict(re.findall(r"^ {4}(\w+) \(.*?\): (.*(?:\n {8}.*)*)", ast.get_docstring(config), re.MULTILINE))
    options = {}
    for node in config.body:
        if not isinstance(node, ast.AnnAssign) or node.target.id in NOT_FLAGS:
            continue
        name, kind = node.target.id, ast.unparse(node.annotation).split(" |")[0]
        help = " ".join(docs[name].split()) + ("" if name in CHECKPOINT_FIELDS else " (new models only)")
        if kind == "bool":
            options[name] = {"action": argparse.BooleanOptionalAction, "help": help}
            continue
        kinds = {"int": positive_int, "float": probability if name.endswith(("_prob", "_rate")) else positive_float}
        options[name] = {"type": kinds.get(kind, str), "help": help}
        if f"{name.upper()}_MODES" in constants:  # pooling: POOLING_MODES
            options[name]["choices"] = ast.literal_eval(constants[f"{name.upper()}_MODES"])
    options["num_channels"]["choices"] = CHANNELS
    return options


def preset_names() -> tuple[str, ...]:
    """The names of configuration_vit_custom.PRESETS, read from its source (see `config_flags`)."""
    tree = ast.parse(CONFIG_SOURCE.read_text())
    presets = next(node.value for node in tree.body if isinstance(node, ast.AnnAssign) and node.target.id == "PRESETS")
    return tuple(ast.literal_eval(presets))


# ----------------------------------------------------------------------------------------------------------------------
# The groups


@dataclass
class DataArguments:
    """data (default: the scikit-learn digits, split 80/20 into train and test)"""

    dataset_name: str | None = flag(help="A dataset on the Hugging Face Hub, e.g. `uoft-cs/cifar10`.")
    dataset_config_name: str | None = flag(
        help="The configuration of --dataset_name, if it has several.", needs="dataset_name"
    )
    train_dir: Path | None = flag(
        type=Path,
        help="A folder of training images, one sub-folder per class (`train_dir/<label>/<image>`), read with "
        "`datasets`' imagefolder.",
    )
    validation_dir: Path | None = flag(type=Path, help="A folder of validation images, laid out as --train_dir.")
    test_dir: Path | None = flag(type=Path, help="A folder of test images, laid out as --train_dir.")
    image_column_name: str = flag("image", help="The dataset column that holds the images.")
    label_column_name: str = flag("label", help="The dataset column that holds the classes.")
    train_val_split: float = flag(
        0.1,
        type=split_fraction,
        help="Fraction of the training images held out for validation when the data has no validation split.",
    )
    max_train_samples: int | None = flag(type=positive_int, help="Train on at most this many images.")
    max_eval_samples: int | None = flag(
        type=positive_int, help="Evaluate (validation and test) on at most this many images."
    )
    crop_scale: tuple[float, float] | None = flag(
        type=fraction,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="Area range of the random resized crop of training images, as fractions of the image. Default: the "
        "--recipe's.",
        recipe=True,
    )
    crop_ratio: tuple[float, float] | None = flag(
        type=positive_float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="Aspect ratio (width / height) range of the random resized crop, log-uniform. `--crop_scale 1 1 "
        "--crop_ratio 1 1` turns the crop off. Default: the --recipe's (3/4 to 4/3).",
        recipe=True,
    )
    horizontal_flip: bool | None = flag(
        action=argparse.BooleanOptionalAction,
        help="Mirror training images at random. Default: on, except for the digits, which a mirror turns into "
        "other symbols.",
    )
    streaming: bool = flag(
        False,
        action="store_true",
        help="Stream the training images instead of loading them, for data that does not fit in memory or on disk: "
        "--train_dir is then a folder (or a glob) of Parquet files or WebDataset tar shards, or --dataset_name a Hub "
        "dataset read shard by shard. The validation (required) and test splits are read as usual. Epochs are "
        "passes over all shards; resuming continues each process's stream where it stopped.",
    )
    shuffle_buffer_size: int = flag(
        1000,
        type=positive_int,
        help="With --streaming: images that each loader worker reads ahead and shuffles together (kept encoded in "
        "memory); the order of the shards is shuffled every epoch too.",
    )
    images_in_memory: str = flag(
        "auto",
        choices=("auto", "on", "off"),
        help="Decode every image once into memory as uint8 tensors and augment whole batches with tensor operations "
        "in the training process (no loader workers). `auto`: when the training images share one size, at most "
        "twice the model's input, and all splits fit in a quarter of the free memory. Otherwise images are decoded "
        "and augmented one by one in loader worker processes, every epoch.",
    )
    verify_images: bool = flag(
        False,
        action="store_true",
        help="Decode every image before training (in parallel) and stop with the list of files that fail. Without "
        "it, a bad file is met when it is first loaded; see --on_bad_image.",
    )
    on_bad_image: str = flag(
        "stop",
        choices=("stop", "skip"),
        help="An image that cannot be decoded (or, in a stream, has an unknown class): `stop` names it and stops, "
        "after saving a checkpoint of the steps done (unless several processes load images themselves); `skip` "
        "leaves it out and counts it (`skipped_images` in all_results.json).",
    )
    dataloader_num_workers: int | str = flag(
        "auto",
        type=worker_count,
        help="Worker processes per training process that decode and augment images while the model trains; 0 does "
        "it in the training process. `auto`: none for images held in memory (a batch is augmented at once); for the "
        "others, on the CPU one per 4 cores (at least one), beside a GPU every core but one, at most 4.",
    )

    def check(self):
        if self.dataset_name and (self.train_dir or self.validation_dir or self.test_dir):
            raise ValueError("pass either --dataset_name or image folders (--train_dir, ...), not both")
        if (self.validation_dir or self.test_dir) and not self.train_dir:
            raise ValueError("--validation_dir and --test_dir need a --train_dir")
        if self.streaming and not (self.train_dir or self.dataset_name):
            raise ValueError(
                "--streaming needs shards to stream: --train_dir (a folder or glob of shards) or --dataset_name"
            )
        if self.streaming and self.train_dir and not self.validation_dir:
            raise ValueError(
                "--streaming needs a --validation_dir of shards to evaluate on (and to read the classes from)"
            )
        if self.streaming and self.max_train_samples:
            raise ValueError("--max_train_samples does not apply to --streaming; bound the run with --max_train_steps")
        if self.horizontal_flip is None:
            self.horizontal_flip = not self.builtin_digits  # a mirror turns some digits into others

    @property
    def builtin_digits(self) -> bool:
        """Whether the data is scikit-learn's digits: neither --dataset_name nor --train_dir is given."""
        return not (self.dataset_name or self.train_dir)

    def short_name(self) -> str:
        """`digits`, the name of a Hub dataset without its owner, or the name of the folder above --train_dir."""
        if self.dataset_name:
            return self.dataset_name.split("/")[-1]
        if self.train_dir:
            train_dir = self.train_dir.resolve()
            return train_dir.parent.name if train_dir.name in ("train", "training") else train_dir.name
        return "digits"


@dataclass
class ModelArguments:
    """model (default: a 4-block ViT for the 8x8 digits, trained from scratch)"""

    model_name_or_path: str | None = flag(
        help="A checkpoint to fine-tune: a vit_custom, transformers ViT or timm folder, or a Hub repo (read by "
        "convert_checkpoint.py). Without it, a new model is trained from scratch.",
    )
    model_revision: str | None = flag(
        help="Branch, tag or commit of a Hub repo --model_name_or_path (default: main); a commit sha pins the weights.",
        needs="model_name_or_path",
    )
    preset: str | None = flag(
        choices=preset_names(), help="Size of a new model (ViT/DeiT sizes); the config flags override single values."
    )
    ignore_mismatched_sizes: bool = flag(
        False,
        action="store_true",
        help="Replace the checkpoint's classification head with a new one when its classes differ from the data's.",
        needs="model_name_or_path",
    )
    # The config flags given (see `config_flags`): field name -> value.
    config: dict = field(default_factory=dict)

    def new_config(self, labels: list[str]):
        """The `ViTCustomConfig` of a new model for `labels`: the --preset (default: the digits model) with the config
        flags' values."""
        from configuration_vit_custom import PRESETS, ViTCustomConfig
        from vit_loading import label_fields

        base = PRESETS[self.preset] if self.preset else DIGITS_MODEL
        try:
            return ViTCustomConfig(**{**base, **self.config, **label_fields(labels)})
        except ValueError as error:  # the config names the bad value and its fix
            raise TrainingError(f"Invalid model configuration: {error}") from error

    def check(self):
        fixed = [f"--{name}" for name in self.config if name not in CHECKPOINT_FIELDS]
        if fixed and self.model_name_or_path:
            raise ValueError(
                f"{', '.join(fixed)} set the architecture of a new model, but the weights of --model_name_or_path "
                f"{self.model_name_or_path} fix it; drop {', '.join(fixed)} (a checkpoint takes only "
                f"{', '.join('--' + name for name in sorted(CHECKPOINT_FIELDS))}), or drop --model_name_or_path"
            )
        if self.preset and self.model_name_or_path:
            raise ValueError(
                f"--preset {self.preset} picks the size of a new model, but --model_name_or_path fixes it: drop one"
            )


@dataclass
class TrainingArguments:
    """training"""

    num_train_epochs: int = flag(40, type=positive_int, help="Passes over the training data.")
    max_train_steps: int | None = flag(
        type=positive_int, help="Stop after this many optimizer steps; overrides the epochs."
    )
    per_device_train_batch_size: int = flag(
        32, type=positive_int, help="Training images per device and step.", resumed=True
    )
    per_device_eval_batch_size: int = flag(128, type=positive_int, help="Evaluation images per device and step.")
    gradient_accumulation_steps: int = flag(
        1,
        type=positive_int,
        help="Batches per optimizer step; the update equals one on all their images together, also for a short "
        "last batch or a short last window of an epoch.",
        resumed=True,
    )
    learning_rate: float | None = flag(
        type=positive_float,
        help="Peak learning rate of AdamW. Default: the --recipe's --lr_base scaled to the global batch.",
        resumed=True,
        recipe=True,
    )
    weight_decay: float | None = flag(
        type=non_negative_float,
        help="AdamW weight decay; biases, norms, the CLS token and position embeddings are never decayed. Default: "
        "the --recipe's.",
        resumed=True,
        recipe=True,
    )
    lr_scheduler_type: str = flag(
        "cosine",
        choices=SCHEDULES,
        help="How the learning rate decays after the warmup (`transformers.get_scheduler`).",
        resumed=True,
    )
    warmup_steps: float | None = flag(
        type=warmup,
        help="Linear warmup: a number of optimizer steps, or a fraction in [0, 1) of all steps. Default: the "
        "--recipe's.",
        resumed=True,
        recipe=True,
    )
    max_grad_norm: float = flag(1.0, type=non_negative_float, help="Clip gradients to this norm; 0 disables.")
    label_smoothing: float | None = flag(
        type=probability, help="Label smoothing of the training loss, in [0, 1). Default: the --recipe's.", recipe=True
    )
    skip_nonfinite_steps: bool = flag(
        False,
        action="store_true",
        help="Skip an optimizer step whose loss is NaN or infinite, and count it in all_results.json, instead of "
        "stopping the run there.",
    )
    seed: int = flag(
        42, type=seed, help="Seed of the weights, data order and augmentation, in [0, 2**32).", resumed=True
    )
    mixed_precision: str | None = flag(
        choices=("no", "fp16", "bf16"),
        help="Mixed precision (passed to Accelerate; default: `accelerate config` or the launcher's choice). fp16 "
        "needs a GPU; the CPU runs bf16.",
    )
    torch_compile: str = flag(
        "auto",
        nargs="?",
        const="on",
        choices=("auto", "on", "off"),
        help="Compile the model with torch.compile (inductor). `auto`: when the run is long enough for the speed-up "
        "to repay the compile time: eager steps are timed before training, and a resumed run keeps the choice of "
        "the run it continues. A bare --torch_compile means `on`.",
    )
    cpu: bool = flag(False, action="store_true", help="Train on the CPU even when an accelerator is present.")
    num_threads: int | None = flag(
        type=positive_int,
        help="PyTorch threads per process. Default on the CPU: $OMP_NUM_THREADS if set (torchrun and `accelerate "
        "launch` set 1 for several processes), else the machine's cores divided among its training processes, or one "
        "for a model whose layers are too small to share; between the two a few timed steps decide. A resumed run "
        "keeps the threads of the run it continues.",
    )


@dataclass
class CheckpointArguments:
    """checkpoints"""

    checkpointing_steps: int | str | None = flag(
        type=checkpointing_interval,
        help="Save a resumable checkpoint every N optimizer steps, or after every epoch with `epoch`.",
    )
    checkpoints_total_limit: int = flag(
        3,
        type=non_negative_int,
        help="Keep the newest N checkpoints of --output_dir, deleting older ones after each save (never the one the "
        "run resumed from); 0 keeps them all.",
    )
    resume_from_checkpoint: str | None = flag(
        help="Continue from a `checkpoint-N` folder, or from the newest complete one in --output_dir with `latest`. "
        "The run must repeat the batch size, accumulation, process count, data and optimizer flags of the run that "
        "wrote it; it may train for more or fewer steps (the schedule is then recomputed and reported).",
    )


@dataclass
class OutputArguments:
    """output"""

    output_dir: str | None = flag(
        help="Where the model, metrics, model card and checkpoints go. Default: outputs/vit-custom-<dataset>."
    )
    overwrite_output_dir: bool = flag(
        False,
        action="store_true",
        help="Replace the results of another run in --output_dir (its checkpoints are deleted).",
    )
    with_tracking: bool = flag(
        False, action="store_true", help="Log metrics with an experiment tracker (see --report_to)."
    )
    report_to: str | None = flag(
        choices=TRACKERS,
        help="Tracker for --with_tracking (default: tensorboard, logging in <output_dir>/runs), or `all` the "
        "installed ones.",
        needs="with_tracking",
    )
    license: str = flag(
        "apache-2.0", help="License of the trained model, for the model card (a Hub identifier)."
    )
    push_to_hub: bool = flag(False, action="store_true", help="Upload the output folder to the Hugging Face Hub.")
    hub_model_id: str | None = flag(
        help="The Hub repo to push to, `user/name`. Default: the --output_dir folder name, in the token's namespace.",
        needs="push_to_hub",
    )
    hub_token: str | None = flag(help="Hub token; default: the one saved by `hf auth login`.", needs="push_to_hub")
    hub_revision: str | None = flag(
        help="Branch of the Hub repo to push to (created if needed); default: main.", needs="push_to_hub"
    )
    hub_private_repo: bool = flag(
        False, action="store_true", help="Create the Hub repo as private if it does not exist.", needs="push_to_hub"
    )

    def check(self):
        reason = unwritable_folder_reason(Path(self.output_dir))
        if reason:
            raise ValueError(
                f"--output_dir {self.output_dir} cannot be written: {reason}. Pass a folder path you can write to"
            )
        if self.report_to is None:
            self.report_to = "tensorboard"

    @property
    def tracker(self) -> str | None:
        """The tracker to log to, None without --with_tracking."""
        return self.report_to if self.with_tracking else None


GROUPS = {
    "data": DataArguments,
    "model": ModelArguments,
    "training": TrainingArguments,
    "recipe": RecipeArguments,
    "checkpoints": CheckpointArguments,
    "output": OutputArguments,
}


@dataclass
class Arguments:
    """The arguments of run_finetune.py, by group."""

    data: DataArguments
    model: ModelArguments
    training: TrainingArguments
    recipe: RecipeArguments
    checkpoints: CheckpointArguments
    output: OutputArguments

    # Flags of the shared groups that this script refuses when given (`check_recipe`), and leaves out of its help.
    unused_flags: ClassVar[tuple[str, ...]] = ()

    def resumed_settings(self) -> dict:
        """`{"--flag": value}` of the flags a resumed run must repeat: a checkpoint's place in the data and its
        optimizer and learning-rate state count in the steps, images and values of the run that wrote it."""
        return {
            f"--{item.name}": getattr(group, item.name)
            for group in vars(self).values()
            for item in fields(group)
            if item.metadata.get("resumed")
        }

    def default_output_dir(self) -> str:
        """The --output_dir when none is given: outputs/vit-custom-<dataset>."""
        return f"outputs/vit-custom-{self.data.short_name()}"

    def flat(self) -> dict:
        """Every argument by name, the config flags given included."""
        values = {name: value for group in vars(self).values() for name, value in vars(group).items()}
        return {**values, **values.pop("config"), **values.pop("settings")}

    def default_recipe(self) -> str:
        """The --recipe when none is given: `finetune` for a checkpoint, `randaugment` for a new model of the built-in
        digits, `basic` for a new model of other data."""
        if self.model.model_name_or_path:
            return "finetune"
        return "randaugment" if self.data.builtin_digits else "basic"

    def apply_recipe(self):
        """Lay the flags given over the --recipe's values, check them, and set every recipe-controlled field."""
        if self.recipe.recipe is None:
            self.recipe.recipe = self.default_recipe()
        explicit = {}
        for group in vars(self).values():
            for item in fields(group):
                value = getattr(group, item.name)
                if item.metadata.get("recipe") and value is not None:
                    off = item.metadata.get("type") is rate_or_none and value == "none"
                    explicit[item.name] = None if off else value
        if "drop_path_rate" in self.model.config:
            explicit["drop_path_rate"] = self.model.config["drop_path_rate"]
        settings = resolve_recipe(self.recipe.recipe, explicit)
        for group in vars(self).values():
            for item in fields(group):
                if item.metadata.get("recipe"):
                    setattr(group, item.name, settings[item.name])
        self.data.crop_scale = tuple(settings["crop_scale"])
        self.data.crop_ratio = tuple(settings["crop_ratio"])
        if settings["drop_path_rate"] is not None:
            self.model.config["drop_path_rate"] = settings["drop_path_rate"]
        self.recipe.settings, self.recipe.explicit = settings, explicit
        self.check_recipe()

    def check_recipe(self):
        """Refuse recipe settings the script does not use (a subclass's check; run_finetune uses them all)."""


# ----------------------------------------------------------------------------------------------------------------------
# Parsing


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every flag that has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser(
    description: str, groups: dict[str, type] = GROUPS, unused: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """The parser of the flags of `groups`; those named in `unused` are parsed (to be refused by name) but not shown."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    for name, group_type in groups.items():
        group = parser.add_argument_group(group_type.__doc__)
        for item in fields(group_type):
            if item.metadata:
                options = {k: v for k, v in item.metadata.items() if k not in ("needs", "resumed", "recipe")}
                if item.name in unused:
                    options["help"] = argparse.SUPPRESS
                add_flag(group, item.name, f"{name}.{item.name}", default=item.default, **options)
        if group_type is ModelArguments:
            for field_name, options in config_flags().items():
                add_flag(group, field_name, f"config.{field_name}", **options)
    return parser


def add_flag(group, name: str, dest: str, **options):
    """`--name`, stored as `dest` (`group.field`), shown in the help as NAME."""
    if "action" not in options and "choices" not in options:
        options.setdefault("metavar", name.upper())
    group.add_argument(f"--{name}", dest=dest, **options)


def parse_args(argv: list[str] | None, description: str, arguments: type[Arguments] = Arguments) -> Arguments:
    """The arguments of `argv` (default: the command line), checked; a bad value exits with a usage error.

    `arguments`: the script's `Arguments` class; a subclass may add groups (its fields) and its default output folder.
    """
    group_types = {item.name: item.type for item in fields(arguments)}
    parser = build_parser(description, group_types, arguments.unused_flags)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and Path(argv[0]).suffix in (".json", ".yaml", ".yml"):
        argv = file_arguments(Path(argv[0]), parser) + argv[1:]
    namespace = vars(parser.parse_args(argv))
    values = {name: {} for name in [*group_types, "config"]}
    for dest, value in namespace.items():
        group, name = dest.split(".")
        values[group][name] = value
    config = {name: value for name, value in values.pop("config").items() if value is not None}
    groups = {name: group_types[name](**group_values) for name, group_values in values.items()}
    groups["model"].config = config
    args = arguments(**groups)
    if args.output.output_dir is None:
        args.output.output_dir = args.default_output_dir()
    try:
        args.apply_recipe()
        for group in vars(args).values():
            for item in fields(group):
                needed = item.metadata.get("needs")
                if needed and getattr(group, item.name) and not getattr(group, needed):
                    raise ValueError(
                        f"--{item.name} is used only with --{needed}, which is not given: add --{needed}, or drop "
                        f"--{item.name}"
                    )
        for group in vars(args).values():
            if hasattr(group, "check"):
                group.check()
    except (ValueError, TrainingError) as error:
        parser.error(str(error))
    return args


def file_arguments(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The flags of a JSON or YAML file of `{flag: value}`, as command-line words."""
    import yaml

    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.error(f"cannot read the arguments file {path}: {error}")
    if not isinstance(values, dict):
        parser.error(f"the arguments file {path} holds {type(values).__name__}, not a mapping of flags to values")
    negatable = {
        option for action in parser._actions if isinstance(action, argparse.BooleanOptionalAction)
        for option in action.option_strings
    }  # fmt: skip
    words = []
    for name, value in values.items():
        if value is True or (value is False and f"--no-{name}" in negatable):
            words.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, (list, tuple)):
            words += [f"--{name}", *map(str, value)]
        elif value is not None and value is not False:
            words += [f"--{name}", str(value)]
    return words

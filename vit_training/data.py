"""Datasets in: the scikit-learn digits, a Hub dataset or image folders, as checked `train`, `validation` and (when
the data has one) `test` splits with a `ClassLabel` label column."""

import logging
import math
import os
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset
from PIL import Image

from vit_loading import shorten
from vit_training import images as image_files
from vit_training.augment import SAMPLE_INDEX
from vit_training.errors import TrainingError

logger = logging.getLogger(__name__)

# The digits' train/test split is fixed, so that runs with different seeds are scored on the same images.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
# How model cards name the digits.
DIGITS_DATASET_ID = "sklearn-digits"


def load_image_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: Path | None = None,
    validation_dir: Path | None = None,
    test_dir: Path | None = None,
    image_column: str = "image",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    labelled: bool = True,
) -> DatasetDict:
    """The images of a Hub dataset (or a local folder of split folders), of image folders, or by default the digits, as
    `train`, `validation` and, when the data has one, `test` splits, with checked columns.

    A `validation_fraction` of the training images is held out (stratified) when the data has no validation split;
    `max_train_samples` and `max_eval_samples` keep a random subset of the splits.

    Without `labelled` (for pre-training), the data needs no labels: image folders may hold their images loosely, and
    every image gets the label 0 of a single class, `image`, in the label column.
    """
    read_folders = load_image_folders if labelled else load_unlabelled_folders
    if dataset_name and split_folders(Path(dataset_name)):
        dataset = read_folders(**split_folders(Path(dataset_name)))
    elif dataset_name:
        dataset = load_hub_dataset(dataset_name, dataset_config_name)
    elif train_dir:
        dataset = read_folders(train=train_dir, validation=validation_dir, test=test_dir)
    else:
        dataset = load_digits_dataset()
    if "train" not in dataset:
        raise TrainingError(f"The dataset has no `train` split, only {sorted(dataset)}; it needs one to train on.")
    check_columns(dataset, image_column, label_column if labelled else None)
    dataset = encode_labels(dataset, label_column) if labelled else one_class(dataset, label_column)
    dataset = DatasetDict({name: split for name, split in dataset.items() if name in ("train", "validation", "test")})
    if "validation" not in dataset:
        dataset = carve_validation_split(dataset, validation_fraction, label_column, seed)
    if max_train_samples is not None:
        dataset["train"] = subsample(dataset["train"], max_train_samples, seed)
    if max_eval_samples is not None:
        for name in ("validation", "test"):
            if name in dataset:
                dataset[name] = subsample(dataset[name], max_eval_samples, seed)
    for name, split in dataset.items():
        if len(split) == 0:
            raise TrainingError(f"The {name} split is empty: it has no images. Check the data you passed.")
    return dataset


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 8x8 handwritten digits as grayscale images, split 80/20 (stratified) into train and test."""
    from sklearn.datasets import load_digits  # only the digits need scikit-learn, which takes long to import

    digits = load_digits()
    # The pixel values are ink counts from 0 to 16.
    images = [Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)) for image in digits.images]
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    dataset = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return dataset.train_test_split(test_size=DIGITS_TEST_FRACTION, stratify_by_column="label", seed=DIGITS_SPLIT_SEED)


def load_hub_dataset(name: str, config_name: str | None) -> DatasetDict:
    try:
        return load_dataset(name, config_name)
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
        fix = (
            "HF_HUB_OFFLINE=1 is set (the Makefile sets it): unset it to download, "
            if offline
            else "Check the name and your connection (or `hf auth login` for a private dataset), "
        )
        raise TrainingError(
            f"Could not load the dataset {name!r} from the Hugging Face Hub: {error}. {fix}"
            "or train on local images with --train_dir (and --validation_dir)."
        ) from error


def load_image_folders(**folders: Path | None) -> DatasetDict:
    """Read `<folder>/<class>/.../<image>` folders: the classes are the training folder's sub-folders.

    One pass over the files, O(n), opening none of them: images are decoded (and bad ones met) during training, or
    all at once by `--verify_images` or the in-memory path. A folder with a metadata file (`metadata.csv`, ...),
    which carries labels or other columns, is read by `datasets`' imagefolder instead.
    """
    listings = {}
    for split, folder in folders.items():
        if folder is None:
            continue
        flag = f"--{split}_dir {folder}"
        if not folder.is_dir():
            raise TrainingError(f"{flag} is not a folder. Pass a folder with one sub-folder of images per class.")
        if any((folder / name).is_file() for name in image_files.METADATA_FILES):
            return load_dataset("imagefolder", data_dir=None, data_files=metadata_data_files(folders))
        paths, classes, others, empty = image_files.list_image_folder(folder)
        loose = [n for n in others if "/" not in n and Path(n).suffix.lower() in image_files.IMAGE_EXTENSIONS]
        if not paths:
            found = f"only {len(others)} other file(s): {shorten(others, limit=3)}" if others else "no class sub-folder"
            raise TrainingError(
                f"{flag} holds no images in class sub-folders ({found}). Put the images in one sub-folder per class "
                f"({folder}/<label>/<image>.png), in a format Pillow reads (.png, .jpg, ...)."
            )
        if loose:
            raise TrainingError(
                f"{flag} holds {len(loose)} image(s) outside any class sub-folder ({shorten(loose, limit=3)}); their "
                f"class is unknown. Move them into {folder}/<label>/, or delete them."
            )
        if empty and split == "train":
            raise TrainingError(
                f"{flag}: the class folder(s) {shorten(empty)} hold no images, so the model would have classes it "
                "never sees. Add images to them, or remove the empty folders."
            )
        if others:
            logger.warning(f"{flag}: ignoring {len(others)} file(s) that are not images: {shorten(others)}")
        listings[split] = (paths, classes)
    names = sorted(set(listings["train"][1]))
    for split, (_, classes) in listings.items():
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise TrainingError(
                f"--{split}_dir {folders[split]} has class folder(s) {shorten(unknown)} that --train_dir lacks: the "
                "model could never predict them. Add training images for them, or remove them from that folder."
            )
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=names)})
    index = {name: i for i, name in enumerate(names)}
    return DatasetDict(
        {
            split: Dataset.from_dict({"image": paths, "label": [index[c] for c in classes]}, features=features)
            for split, (paths, classes) in listings.items()
        }
    )


def load_unlabelled_folders(**folders: Path | None) -> DatasetDict:
    """Read every image below each folder, loose or in sub-folders, without labels (see `one_class`)."""
    splits = {}
    for split, folder in folders.items():
        if folder is None:
            continue
        if not folder.is_dir() or any((folder / name).is_file() for name in image_files.METADATA_FILES):
            return load_image_folders(**folders)  # it names a missing folder; imagefolder reads metadata files
        paths, _, others, _ = image_files.list_image_folder(folder)
        paths += [str(folder / name) for name in others if Path(name).suffix.lower() in image_files.IMAGE_EXTENSIONS]
        if not paths:
            raise TrainingError(
                f"--{split}_dir {folder} holds no images. Pass a folder of images in a format Pillow reads (.png, "
                ".jpg, ...), loose or in sub-folders."
            )
        splits[split] = Dataset.from_dict({"image": sorted(paths)}, features=Features({"image": datasets.Image()}))
    return DatasetDict(splits)


def one_class(dataset: DatasetDict, label_column: str) -> DatasetDict:
    """`dataset` with its labels, if any, replaced by 0, of a single class `image`: for training without labels,
    through loaders that carry a label with every image."""
    feature = ClassLabel(names=["image"])
    return DatasetDict({
        name: split.remove_columns([c for c in split.column_names if c == label_column])
        .add_column(label_column, np.zeros(len(split), dtype=np.int64), feature=feature)
        for name, split in dataset.items()
    })  # fmt: skip


def split_folders(folder: Path) -> dict[str, Path]:
    """A local dataset folder's `train`, `validation` (or `val`, `valid`, `dev`) and `test` sub-folders, when it has a
    `train` one holding class folders, to be listed as --train_dir and friends are; else nothing."""
    if not (folder / "train").is_dir() or any((folder / name).is_file() for name in image_files.METADATA_FILES):
        return {}
    splits = {"train": folder / "train"}
    for split, names in (("validation", ("validation", "val", "valid", "dev")), ("test", ("test",))):
        found = [folder / name for name in names if (folder / name).is_dir()]
        if found:
            splits[split] = found[0]
    return splits


def metadata_data_files(folders: dict[str, Path | None]) -> dict[str, list[str]]:
    """Every file of each folder, for imagefolder, which pairs the images with the metadata files' rows."""
    return {
        split: [str(path) for path in sorted(folder.rglob("*")) if path.is_file() and not path.name.startswith(".")]
        for split, folder in folders.items()
        if folder is not None
    }


def check_columns(dataset: DatasetDict, image_column: str, label_column: str | None):
    """The image column holds images, and the label column (unless None) exists."""
    features = dataset["train"].features
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if image_column not in features:
        hint = f"the image columns are {image_columns}" if image_columns else f"the columns are {list(features)}"
        raise TrainingError(
            f"The dataset has no image column {image_column!r}; {hint}. Pass --image_column_name with the column "
            "that holds the images."
        )
    if not isinstance(features[image_column], datasets.Image):
        raise TrainingError(
            f"Column {image_column!r} holds {features[image_column]}, not images; pass --image_column_name with the "
            f"column that holds the images ({image_columns or 'none found'})."
        )
    if label_column is not None and label_column not in features:
        candidates = [name for name in features if name != image_column]
        raise TrainingError(
            f"The dataset has no label column {label_column!r}; its other columns are {candidates}. Pass "
            "--label_column_name with the column that holds the classes, or, for image folders, put each class's "
            "images in a sub-folder named after the class."
        )


def encode_labels(dataset: DatasetDict, label_column: str) -> DatasetDict:
    """Make the label column a `ClassLabel`, the same for every split, if it holds plain names or indices."""
    feature = dataset["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return dataset
    values = set(dataset["train"][label_column])
    if isinstance(feature, datasets.Value) and feature.dtype == "string":
        names = sorted(values)
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith("int") and min(values) >= 0:
        names = [str(i) for i in range(max(values) + 1)]
    else:
        raise TrainingError(
            f"Column {label_column!r} holds {feature}; a label column holds class names or class indices. Pass "
            "--label_column_name with the column that holds the classes."
        )
    try:
        return dataset.cast_column(label_column, ClassLabel(names=names))
    except ValueError as error:
        raise TrainingError(f"Some evaluation images have a class the training images lack: {error}") from error


def carve_validation_split(dataset: DatasetDict, fraction: float, label_column: str, seed: int) -> DatasetDict:
    """Hold out a stratified `fraction` of the training images for validation (unstratified for rare classes)."""
    train = dataset["train"]
    try:
        try:
            split = stratified_split(train, fraction, label_column, seed)
        except ValueError:  # a class with a single image cannot be stratified
            split = train.train_test_split(test_size=fraction, seed=seed)
    except ValueError as error:
        raise TrainingError(
            f"Could not hold out {fraction:.0%} of the {len(train)} training images for validation: {error}. Pass "
            "a --validation_dir, or a larger --train_val_split."
        ) from error
    return DatasetDict({**dataset, "train": split["train"], "validation": split["test"]})


def column(split: Dataset, name: str) -> np.ndarray:
    """One column as an array, read at once (`split[name]` is read row by row when listed; benchmarks/README.md)."""
    return split.with_format("numpy", columns=[name])[:][name]


def stratified_split(split: Dataset, test_fraction: float, label_column: str, seed: int) -> DatasetDict:
    """`split.train_test_split(test_size=test_fraction, stratify_by_column=label_column, seed=seed)`: the same
    indices, drawn by the same `datasets` function, but with the labels read as one column (datasets 5 reads them
    row by row there, which takes seconds for a large dataset)."""
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    labels = column(split, label_column)
    num_test = math.ceil(test_fraction * len(labels))
    if not 0 < num_test < len(labels):
        raise ValueError(f"a fraction of {test_fraction} leaves no image on one side")
    try:
        train_indices, test_indices = next(stratified_shuffle_split_generate_indices(
            labels, len(labels) - num_test, num_test, rng=np.random.default_rng(seed)
        ))  # fmt: skip
    except Exception as error:  # datasets raises a bare Exception for a class of one image
        raise ValueError(str(error)) from error
    return DatasetDict({"train": split.select(train_indices), "test": split.select(test_indices)})


def subsample(split: Dataset, max_samples: int, seed: int) -> Dataset:
    return split.shuffle(seed=seed).select(range(min(max_samples, len(split))))


def number_samples(split: Dataset) -> Dataset:
    return split.add_column(SAMPLE_INDEX, np.arange(len(split)))


def describe_dataset(dataset_name: str | None, train_dir: Path | None) -> tuple[str, str]:
    """An identifier and a human description of the training data, for the model card."""
    if dataset_name:
        return dataset_name, dataset_name
    if train_dir:
        return "imagefolder", f"local images ({Path(train_dir).name})"
    return DIGITS_DATASET_ID, "scikit-learn's handwritten digits (8x8 grayscale, 10 classes)"

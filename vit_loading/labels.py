"""Class names as config fields: `id2label` and `label2id`, checked."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from vit_loading.folders import shorten


def label_fields(labels: Sequence[str]) -> dict:
    """`id2label` and `label2id` of class names given in the order of the classifier's outputs."""
    return {"id2label": dict(enumerate(labels)), "label2id": {label: index for index, label in enumerate(labels)}}


def label_overrides(num_labels: int | None = None, labels: Sequence[str] | None = None) -> dict:
    """Config overrides for a number of classes or their names: `num_labels`, or `id2label` and `label2id`.

    Raises:
        ValueError: a negative number, a name given twice, or a number that disagrees with the names.
    """
    if num_labels is not None and num_labels < 0:
        raise ValueError(f"num_labels={num_labels}: pass the number of classes, or 0 for a model without a classifier.")
    duplicates = sorted(label for label, count in Counter(labels or []).items() if count > 1)
    if duplicates:
        raise ValueError(f"The labels name {shorten(duplicates)} more than once; give every class one distinct name.")
    if labels is None:
        return {} if num_labels is None else {"num_labels": num_labels}
    if num_labels is not None and num_labels != len(labels):
        raise ValueError(f"num_labels={num_labels} but {len(labels)} labels were given; give one or make them agree.")
    return label_fields(labels)

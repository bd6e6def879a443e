"""Accuracy and top-5 accuracy as an `evaluate` metric that loads from this folder, without the Hub.

`evaluate.load("accuracy")` downloads its script from the Hub; `evaluate.load("metrics/accuracy")` reads this file.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The fraction of samples whose predicted class is the reference class. Given the scores of every class (logits or
probabilities) instead of predicted classes, it also reports top-5 accuracy, the fraction of samples whose reference
is among the five highest-scoring classes, when there are more than five classes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]` or `list[list[float]]`): the predicted class of every sample, or the score of every
        class for every sample, shape `(num_samples, num_classes)`.
    references (`list[int]`): the true class of every sample.

Returns:
    accuracy (`float`): fraction of correct top-1 predictions, in [0, 1].
    top5_accuracy (`float`): only for class scores with more than 5 classes; fraction of samples whose reference is
        among the 5 highest scores.

Examples:
    >>> accuracy = evaluate.load("metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""

TOP_K = 5


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # `evaluate` picks the first of these formats that the inputs fit: predicted classes or class scores.
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
                ),
            ],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise ValueError("accuracy needs at least one sample; the evaluation set is empty.")
        if predictions.ndim == 1:
            return {"accuracy": float(np.mean(predictions == references))}
        results = {"accuracy": float(np.mean(predictions.argmax(axis=-1) == references))}
        if predictions.shape[-1] > TOP_K:
            top_k = np.argsort(-predictions, axis=-1, kind="stable")[:, :TOP_K]
            results[f"top{TOP_K}_accuracy"] = float(np.mean((top_k == references[:, None]).any(axis=-1)))
        return results

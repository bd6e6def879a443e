"""The repository's `evaluate` metric (metrics/accuracy), loaded by path and offline, against scikit-learn."""

import evaluate
import numpy as np
import pytest
from conftest import REPO_ROOT
from sklearn.metrics import accuracy_score, top_k_accuracy_score


@pytest.fixture(scope="module")
def accuracy() -> evaluate.EvaluationModule:
    return evaluate.load(str(REPO_ROOT / "metrics" / "accuracy"), keep_in_memory=True)


def test_predicted_classes_give_accuracy_like_the_hub_metric(accuracy):
    predictions, references = [0, 2, 1, 3, 3], [0, 1, 1, 3, 2]
    assert accuracy.compute(predictions=predictions, references=references) == {
        "accuracy": accuracy_score(references, predictions)
    }


def test_class_scores_give_top1_and_top5_accuracy_added_in_batches(accuracy):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 10)).astype(np.float32)
    references = rng.integers(0, 10, size=50)
    for start in range(0, 50, 16):
        accuracy.add_batch(predictions=scores[start : start + 16], references=references[start : start + 16])
    results = accuracy.compute()
    assert results["accuracy"] == pytest.approx(accuracy_score(references, scores.argmax(axis=1)))
    assert results["top5_accuracy"] == pytest.approx(top_k_accuracy_score(references, scores, k=5, labels=range(10)))


def test_top5_is_left_out_for_five_classes_or_fewer(accuracy):
    scores = np.eye(5, dtype=np.float32)
    assert accuracy.compute(predictions=scores, references=[0, 1, 2, 3, 0]) == {"accuracy": 0.8}

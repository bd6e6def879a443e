"""Losses for the three problem types, and their exactness under gradient accumulation with transformers.Trainer."""

import copy

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import tiny_config
from modeling_vit_custom import ViTCustomForImageClassification


class TensorPairs(Dataset):
    def __init__(self, pixel_values, labels):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


class GradientRecorder(TrainerCallback):
    """Keeps a copy of every gradient just before the optimizer step."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def labels_for(problem_type: str, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    if problem_type == "single_label_classification":
        labels = torch.randint(0, 5, (8,), generator=generator)
        # Unequal numbers of counted labels per micro-batch: a mean of means would be wrong.
        labels[:3] = -100
        return labels, 5
    if problem_type == "multi_label_classification":
        return torch.randint(0, 2, (8, 5), generator=generator).float(), 5
    return torch.randn(8, generator=generator), 1


def train_one_step(model, dataset, batch_size, accumulation, output_dir):
    recorder = GradientRecorder()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, recorder.gradients


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification", "regression"])
def test_gradient_accumulation_matches_one_large_batch(problem_type, tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels, num_labels = labels_for(problem_type, generator)
    dataset = TensorPairs(torch.randn(8, 3, 16, 16, generator=generator), labels)
    torch.manual_seed(0)
    model = ViTCustomForImageClassification(tiny_config(num_labels=num_labels, problem_type=problem_type))

    big_loss, big_gradients = train_one_step(copy.deepcopy(model), dataset, 8, 1, tmp_path / "one")
    accumulated_loss, accumulated_gradients = train_one_step(copy.deepcopy(model), dataset, 4, 2, tmp_path / "two")

    # The reference: the model's own loss on the whole batch, averaged over every counted label entry.
    with torch.no_grad():
        full_batch_loss = model(dataset.pixel_values, labels=labels).loss.item()
    assert big_loss == pytest.approx(full_batch_loss, rel=1e-4)
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-4)
    for name, gradient in big_gradients.items():
        torch.testing.assert_close(accumulated_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_losses_match_torch_reductions():
    torch.manual_seed(0)
    pixel_values = torch.randn(4, 3, 16, 16)
    model = ViTCustomForImageClassification(tiny_config(num_labels=3)).eval()
    logits = model(pixel_values).logits
    labels = torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(
        model(pixel_values, labels=labels).loss, torch.nn.functional.cross_entropy(logits, labels)
    )
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(model(pixel_values, labels=labels.int()).loss, model(pixel_values, labels=labels).loss)

    multi = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    model.config.problem_type = None
    torch.testing.assert_close(
        model(pixel_values, labels=multi).loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, multi)
    )
    assert model.config.problem_type == "multi_label_classification"

    regressor = ViTCustomForImageClassification(tiny_config(num_labels=1)).eval()
    targets = torch.randn(4)
    predictions = regressor(pixel_values).logits
    assert regressor.config.problem_type is None
    torch.testing.assert_close(
        regressor(pixel_values, labels=targets).loss, torch.nn.functional.mse_loss(predictions.squeeze(-1), targets)
    )
    assert regressor.config.problem_type == "regression"


def test_unknown_problem_type_is_a_clear_error():
    model = ViTCustomForImageClassification(tiny_config(num_labels=3))
    model.config.problem_type = "ranking"
    with pytest.raises(ValueError, match="problem_type='ranking' is unknown"):
        model(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]))

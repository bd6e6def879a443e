"""An exponential moving average of the model's weights, kept by timm's `ModelEmaV3`.

`ema.update(model, step)` after each optimizer step (the decay warms up with the step: the average starts as a copy
and reaches `decay` after a few hundred steps, so a short run's average is not held back by the initial weights); `ema.module` is the averaged model, to evaluate and save. The
average is an `nn.Module`, so `accelerator.register_for_checkpointing(ema)` puts it in every checkpoint and a
resumed run continues it exactly.
"""

from timm.utils import ModelEmaV3
from torch import nn


def weight_average(model: nn.Module, decay: float) -> ModelEmaV3:
    """An average of `model`'s parameters and floating-point buffers (integer buffers are copied) updated as
    `average = decay * average + (1 - decay) * weights`, on the model's device and in its dtype.

    `model` is the unwrapped model (not its DistributedDataParallel or compiled wrapper), on its training device.
    """
    return ModelEmaV3(model, decay=decay, use_warmup=True, stochastic_rounding=False)

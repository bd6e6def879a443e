"""Repeated augmentation (DeiT): each sample of an epoch appears as several copies, each on another process and
augmented differently, which makes a distributed batch more varied than the same number of distinct images.

Copy `c` of sample `s` of `num_samples` has the virtual index `c * num_samples + s`: the training dataset is the
split repeated `copies` times (copy `c` is rows `c * num_samples ...`), and the virtual index is the sample part of
the copy's augmentation seed, so copies differ and copy 0 is augmented as without repeats.
"""

import torch
from torch.utils.data import Sampler


def repeated_order(
    num_samples: int, copies: int, num_processes: int, batch_size: int, seed: int, epoch: int
) -> list[int]:
    """One epoch of virtual indices, in the order whose global batches Accelerate deals out as process `p` taking
    batches `p, p + num_processes, ...`.

    As DeiT's sampler: a permutation of the samples, each repeated `copies` times in a row, with position `j` going
    to process `j % num_processes`, so consecutive copies land on different processes. The epoch keeps the length of
    one without repeats (`num_samples`, rounded down to whole rounds of `num_processes` batches; at least one round
    if the copies fill one).
    """
    generator = torch.Generator().manual_seed(hash((seed, epoch)) % 2**63)
    permutation = torch.randperm(num_samples, generator=generator)
    repeated = (torch.arange(copies)[None, :] * num_samples + permutation[:, None]).flatten()
    rounds = _rounds(num_samples, copies, batch_size * num_processes)
    positions = repeated[: rounds * batch_size * num_processes].view(rounds, batch_size, num_processes)
    return positions.transpose(1, 2).flatten().tolist()


class RepeatedAugmentationSampler(Sampler[int]):
    """The `repeated_order` of each epoch; Accelerate's `set_epoch` on the loader sets the epoch."""

    def __init__(self, num_samples: int, copies: int, num_processes: int, batch_size: int, seed: int):
        self.arguments = (num_samples, copies, num_processes, batch_size, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        return iter(repeated_order(*self.arguments, self.epoch))

    def __len__(self) -> int:
        num_samples, copies, num_processes, batch_size, _ = self.arguments
        return _rounds(num_samples, copies, batch_size * num_processes) * batch_size * num_processes


def _rounds(num_samples: int, copies: int, per_round: int) -> int:
    return max(num_samples // per_round, min(1, copies * num_samples // per_round))

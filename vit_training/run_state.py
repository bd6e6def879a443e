"""How far a training run got: the small state object the loop updates and every checkpoint saves."""

from dataclasses import asdict, dataclass, field


@dataclass
class TrainingProgress:
    """How far training got; saved in every checkpoint so that a resumed run continues exactly where it stopped."""

    epoch: int = 0
    batches_seen: int = 0  # batches of `epoch` already trained on (by each process)
    completed_steps: int = 0  # optimizer updates so far
    loss_sum: float = 0.0  # training loss summed over the images of `epoch` (by each process)
    samples_seen: int = 0  # images of `epoch` already trained on (by each process)
    skipped_images: int = 0  # images of `epoch` that could not be decoded, with --on_bad_image skip (by each process)
    history: list[dict] = field(default_factory=list)  # the metrics of every finished epoch
    compiled: bool = False  # whether the model runs under torch.compile: a resumed run keeps it, for the same sums
    threads: int = 0  # the CPU threads training runs on: a resumed run keeps them too (0: not recorded)
    settings: dict = field(default_factory=dict)  # what the counts above are in (the flags, processes and images)
    planned_steps: int = 0  # the optimizer steps of the whole run, which the learning-rate schedule spans
    schedule_changes: list[dict] = field(default_factory=list)  # resumes with another number of steps
    skipped_steps: int = 0  # steps skipped for a non-finite loss (--skip_nonfinite_steps)

    def __post_init__(self):
        # What a checkpoint saves as `loss_sum`; see `share_loss_sum`.
        self._saved_loss_sum: float | None = None

    def finish_epoch(self, record: dict):
        self.history.append(record)
        self.epoch, self.batches_seen, self.loss_sum, self.samples_seen = self.epoch + 1, 0, 0.0, 0
        self.skipped_images = 0

    def share_loss_sum(self, mean_over_processes: float):
        """Save `mean_over_processes` as the loss sum in the next checkpoint: every process holds a partial sum over
        as many images, and their mean resumes to the same epoch loss on every process."""
        self._saved_loss_sum = mean_over_processes

    def state_dict(self) -> dict:
        state = asdict(self)
        if self._saved_loss_sum is not None:
            state["loss_sum"] = self._saved_loss_sum
        return state

    def load_state_dict(self, state: dict):
        for name, value in state.items():
            setattr(self, name, value)

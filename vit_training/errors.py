"""The error a training script reports as one message, without a traceback: a light module, imported at once."""


class TrainingError(Exception):
    """A problem with the inputs, with a message that names it and its fix."""


class DivergedError(TrainingError):
    """Training diverged: a loss or a weight is NaN or infinite. The message says what and where."""

"""The error that run_finetune.py reports as one message, without a traceback: a light module, imported at once."""


class FinetuneError(Exception):
    """A problem with the inputs, with a message that names it and its fix."""

"""The flags of the training scripts: `flag`, a dataclass field that is a flag, and the value types, each of which
turns the text of a flag into its value or says what is wrong with it (argparse shows the message as a usage error)."""

import argparse
import math
from dataclasses import field


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def worker_count(text: str) -> int | str:
    return text if text == "auto" else non_negative_int(text)


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1 (the seeds NumPy accepts), got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive finite number, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {value}")
    return value


def split_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (both sides need images), got {value}")
    return value


def warmup(text: str) -> int | float:
    value = float(text)
    if value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a whole number of steps or a fraction in [0, 1), got {text}")
    return value if value < 1 else int(value)


def rate_or_none(text: str) -> float | str:
    """A number, or `none` (turns the setting off, whatever the recipe says); the recipe checks the range."""
    if text.lower() in ("none", "off"):
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or `none`, got {text!r}") from None


def checkpointing_interval(text: str) -> int | str:
    if text == "epoch":
        return text
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of steps or `epoch`, got {text!r}")
    return int(text)


def flag(default=None, help: str = "", **options) -> field:
    """A dataclass field that is a flag: its default, help and argparse options (and `needs`, `resumed`)."""
    return field(default=default, metadata={"help": help, **options})

"""Errors a user sees. Each says what is wrong, where, and what to do about it."""

from __future__ import annotations

from typing import Any


class LoraTrainerError(Exception):
    """Base of every error meant for the user (the CLI prints it without a traceback)."""


class ConfigError(LoraTrainerError, ValueError):
    """An option has a value that is not allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"Invalid value for '{field}': {_shown(value)}. Allowed: {allowed}.")


_SHOWN_CHARS = 80


def _shown(value: Any) -> str:
    """The value as the message shows it: a 30 MB name must not come back as a 30 MB error line."""
    text = repr(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:_SHOWN_CHARS]}... ({size})"


class DatasetError(LoraTrainerError):
    """The dataset folder cannot be used as it is."""

    def __init__(self, path: Any, problem: str, fix: str):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        # no fix: a list of problems that each carry their own (see dataset.layout)
        super().__init__(f"{self.path}: {problem}. {fix}" if fix else f"{self.path}: {problem}")


class NotEnoughSpace(LoraTrainerError):
    """The run would need more memory or disk than the machine has free."""


class ModelLoadError(LoraTrainerError):
    """The base model cannot be loaded."""


class MissingPackageError(LoraTrainerError, ImportError):
    """An optional package is needed for the chosen option."""

    def __init__(self, package: str, needed_for: str, pip_name: str | None = None):
        self.package = package
        self.pip_name = pip_name or package
        super().__init__(
            f"{needed_for} needs the package '{package}', which is not installed. "
            f"Install it with: pip install {self.pip_name}"
        )


class TrainingStopped(LoraTrainerError):
    """Raised inside the loop when a stop was requested."""

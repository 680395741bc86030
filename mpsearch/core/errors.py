"""One family of errors for everything a user can get wrong.

Every error raised on user input is an :class:`MpsearchError`. Its message is one line that
says what was wrong, where (file, node, input name, YAML key path) and what to do about it.
The CLI maps the family to exit code 2 and prints the message without a traceback (unless
``--debug``); any other exception is a bug in mpsearch, and :class:`InternalError` is the one
mpsearch raises itself when a check of its own output fails (exit code 1, "this is a bug").
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "InternalError",
    "ExportError",
    "InfeasibleBudgetError",
    "ModelError",
    "MpsearchError",
    "ProfileError",
    "UsageError",
]


class MpsearchError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""

    def __init__(self, problem: str, *, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.problem.split())
        if self.fix:
            text = f"{text}; {' '.join(self.fix.split())}"
        return text


class ModelError(MpsearchError):
    """The ONNX model cannot be read, checked or handled."""


class DataError(MpsearchError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""


class ProfileError(MpsearchError):
    """A hardware profile is invalid."""


class InfeasibleBudgetError(MpsearchError):
    """No plan can meet the budget."""


class ExportError(MpsearchError):
    """A quantized model or a side file cannot be written."""


class InternalError(Exception):
    """mpsearch broke its own contract (a model it wrote fails the checker): a bug to report,
    never the user's input. Deliberately not an :class:`MpsearchError`."""

    def __init__(self, problem: str) -> None:
        self.problem = " ".join(problem.split())
        super().__init__(self.problem)


class UsageError(MpsearchError):
    """Command-line arguments or API arguments that do not make sense together."""

"""Exceptions with an exit code, so that the CLI can map every failure to a documented status."""

from __future__ import annotations


class CausalizeError(Exception):
    """Base class. `code` is the CLI exit status; `kind` a stable machine-readable name."""

    code = 3
    kind = "internal-error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(CausalizeError):
    """Bad arguments: a pipeline that does not parse, an output path that would lose data."""

    code = 2
    kind = "usage-error"


class ConversionError(CausalizeError):
    """The model cannot be converted: no plan, a pass that matched nothing, a bad checkpoint."""

    code = 4
    kind = "conversion-error"


class CheckpointError(ConversionError):
    kind = "bad-checkpoint"


class NoPlanError(ConversionError):
    kind = "no-plan"


class PassError(ConversionError):
    kind = "pass-error"


class PickleRefused(CheckpointError):
    kind = "pickle-refused"

"""Exceptions raised by the defense library.

Every error message is safe to log and to return to a caller: no message built here may contain key
material (keys.py holds secrets in objects whose repr and str hide them).
"""

from __future__ import annotations


class DistillGuardError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(DistillGuardError, ValueError):
    """A configuration file or value is invalid; the message names the field (``path``)."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        self.detail = message
        super().__init__(f"{path}: {message}" if path else message)


class KeyFileError(DistillGuardError):
    """The key file is missing, unreadable, too permissive or malformed."""


class InvalidInput(DistillGuardError, ValueError):
    """A request or response handed to a defense is malformed (gRPC INVALID_ARGUMENT)."""


class DefenseFailure(DistillGuardError):
    """A fail-closed defense raised: the request must be refused with an error status."""

    def __init__(self, defense: str, stage: str, cause: BaseException) -> None:
        self.defense = defense
        self.stage = stage
        # only the exception type travels: a defense's message could carry request content
        super().__init__(f"defense {defense!r} failed during {stage} ({type(cause).__name__}); policy is fail_closed")

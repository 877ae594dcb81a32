"""Typed errors raised by the library; the CLI turns each into one ``Error: ...`` line and exit 1."""

from __future__ import annotations


class ValleError(Exception):
    """Base class: a failure the user can act on, described in one line."""


class InputError(ValleError):
    """A missing, empty, unreadable or malformed input."""


class AudioError(InputError):
    """An audio file that cannot be used (corrupt, empty, too short, NaN/inf samples)."""


class FormatError(InputError):
    """A valle artifact that is truncated, foreign, or of an unsupported format version."""


class CodecError(ValleError):
    """A codec that cannot be built or loaded (unknown name, weights not available offline)."""


class CodecMismatchError(CodecError):
    """Codes made by one codec handed to another."""


class TextError(InputError):
    """Text that cannot be phonemized or tokenized (empty, unknown symbols)."""


class PartialFailure(ValleError):
    """Some items of a batch failed; the others were written. ``failures`` maps item -> reason."""

    def __init__(self, message: str, failures: dict[str, str]):
        super().__init__(message)
        self.failures = failures

"""User-facing exceptions.

Every error that a user can cause with a bad input, config or file derives from
:class:`OceandaError`. The command line prints its message (no traceback) and exits
with status 2; library callers can catch it.
"""

from __future__ import annotations


class OceandaError(Exception):
    """Base class of errors caused by a user's input, config or files."""


class ConfigError(OceandaError, ValueError):
    """A config value is missing, of the wrong type or out of range (names the key)."""


class InputError(OceandaError, ValueError):
    """An input dataset or file is missing, malformed or inconsistent (names it)."""


class NumericalError(OceandaError, ArithmeticError):
    """A numerical operation failed on valid-looking input, e.g. a matrix that is not
    symmetric positive definite (names the batch element)."""

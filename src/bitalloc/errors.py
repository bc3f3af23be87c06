"""Exceptions a user can cause.  The CLI prints ``error: <message>`` for these and exits non-zero."""
from __future__ import annotations


class BitallocError(Exception):
    """Base of every error caused by input (files, options, budgets), never by a bug."""


class InputError(BitallocError, ValueError):
    """A malformed, hostile or unsupported input file, text or option."""


class BudgetError(BitallocError, ValueError):
    """A budget that cannot be parsed or cannot be met."""


class NumericsError(BitallocError, ValueError):
    """NaN/Inf found in weights, activations or statistics (the message names the tensor)."""


def output_exists(path: object) -> InputError:
    """The error refusing to replace an existing output (every command words it the same way)."""
    return InputError(f"output {path} already exists (use --overwrite to replace it)")

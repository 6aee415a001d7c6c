"""Errors a stage reports as bad input (exit status 2, never retried)."""


class DataError(ValueError):
    """Input data is unusable; the message lists each offending file:line."""

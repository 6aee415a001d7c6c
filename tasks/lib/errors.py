"""Errors a stage reports as bad input: one clear message, exit status 2, never retried."""


class BadInput(ValueError):
    """The stage's input (data, a setting, a model it was pointed at) cannot be used; retrying cannot help."""

    kind = "bad input"


class SettingError(BadInput):
    """A params.yaml setting names something that cannot be used (a model, a judge function)."""

    kind = "invalid params"


class DataError(BadInput):
    """Input data is unusable; the message lists each offending file:line."""

    kind = "bad data"


class QualityGateFailed(BadInput):
    """A trained round failed a check the params make fatal (`dpo.guard.fail_run`)."""

    kind = "failed quality check"

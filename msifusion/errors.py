"""Exception types shared by all stages."""


class MsifusionError(Exception):
    """Base class of the errors msifusion raises on purpose."""


class InputError(MsifusionError, ValueError):
    """Bad user input: the message names the file (and key, row or spectrum) and the problem."""


class QualityError(MsifusionError):
    """A stage ran but its result is below the configured quality bar (e.g. failed registration)."""

"""User-facing errors.

Anything raised as a :class:`MedgptError` is a problem with the user's input (a flag, a config
file, a data file, a checkpoint): entry points print its message on one line and exit 2 instead
of showing a stack trace.
"""


class MedgptError(Exception):
    """A problem the user can fix; the message names what is wrong and what is allowed."""


class ConfigError(MedgptError):
    """A bad configuration key or value."""


class DataError(MedgptError):
    """A corpus, dataset folder or token shard that cannot be used."""


class TokenizerError(MedgptError):
    """The offline GPT-2 vocabulary files are missing or altered."""


class WeightsError(MedgptError):
    """Model weights that cannot be loaded into the GPT module."""


class CheckpointError(MedgptError):
    """A checkpoint folder that is missing, incomplete or corrupt."""

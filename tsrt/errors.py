"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class TsrtError(Exception):
    """Base class: the message says what is wrong and what to do about it."""

    exit_code = 2


class InputError(TsrtError):
    """The image given to tsrt cannot be used (unreadable, wrong shape, bad values)."""


class ModelError(TsrtError):
    """A model folder, graph or recorded plan is missing, incomplete or inconsistent."""

    exit_code = 3


class ProviderError(TsrtError):
    """A requested execution provider (CUDA, TensorRT) is not available on this machine."""

    exit_code = 4


class OutputError(TsrtError):
    """The output cannot be written where it was asked to go."""

    exit_code = 5

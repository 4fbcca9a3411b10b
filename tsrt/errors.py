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


def missing_extra(
    feature: str, needs: str, extra: str, note: str = "", *, kind: type[TsrtError] = TsrtError
) -> TsrtError:
    """The one wording every "install the X extra" message uses, so users see the same instruction everywhere."""
    return kind(f"{feature} needs {needs}, which is not installed: pip install 'tsrt[{extra}]'{note}.")


def is_missing(error: ModuleNotFoundError, modules: str | tuple[str, ...]) -> bool:
    """Whether `error` is about one of `modules` itself (not a broken install of something it imports)."""
    wanted = (modules,) if isinstance(modules, str) else modules
    return (error.name or "").split(".")[0] in {name.split(".")[0] for name in wanted}


def require_module(module: str, feature: str, extra: str, note: str = "", *, called: str | None = None) -> object:
    """Import an optional dependency, or fail with the one line that says which extra to install.

    `called` is the library's name as people write it (Ray), when it differs from the module's (ray).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if not is_missing(error, module):
            raise
        raise missing_extra(feature, called or module, extra, note) from None

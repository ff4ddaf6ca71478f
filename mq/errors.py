"""Errors that end a run with one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A user-facing configuration or input problem; its message is one line."""


def find_config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc``: Hydra's ``instantiate`` wraps constructor errors."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message for one-line reports (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

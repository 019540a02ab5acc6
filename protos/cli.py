"""What every lorafleet command line shares: flags that default to `LORAFLEET_*` environment
variables, and structured logging. Torch-free; used by `lorafleet-router`, `lorafleet-shard`
and `lorafleet`, so it sits in `protos/`, the one package all of them import.

Flags: Kubernetes ConfigMaps set the variables, people type the flags; a bad value of either ends
in the same usage error (exit status 2, the variable or flag named, no traceback). `--help` shows
every flag's default and variable.

Logs: JSON lines for machines, colored lines on a terminal. Request-scoped fields (request_id,
adapter_id, shard) are bound with `structlog.contextvars`, so every line logged while a request is
handled carries them.
"""

from __future__ import annotations

import argparse
import enum
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

ENV_PREFIX = "LORAFLEET_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose `add_env` flags read a variable of `env` when not given."""

    def __init__(self, *, env: Mapping[str, str], **kw: Any) -> None:
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kw)
        self._env = env
        self._env_flags: list[tuple[argparse.Action, str]] = []

    def add_env(self, flag: str, help: str, default: Any = None, **kw: Any) -> argparse.Action:
        """A flag defaulting to its variable (`--max-queue`: LORAFLEET_MAX_QUEUE), then to
        `default`. `help` must say what a None default means; any other default is appended to
        it, with the variable's name."""
        env_name = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
        shown = "" if default is None else f"default: {'off' if default is False else default}; "
        text = f"{help} ({shown}env {env_name})".replace("%", "%%")
        action = self.add_argument(flag, default=default, help=text, **kw)
        self._env_flags.append((action, env_name))
        return action

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Flags win over variables (an empty variable counts as unset), which win over defaults.
        (Subcommands' parsers are called here, not through parse_args.)"""
        namespace = namespace or argparse.Namespace()
        for action, name in self._env_flags:
            text = self._env.get(name, "")
            if text.strip():
                setattr(namespace, action.dest, self._convert(action, name, text.strip()))
        return super().parse_known_args(args, namespace)

    def _convert(self, action: argparse.Action, name: str, text: str) -> Any:
        if action.nargs == 0:  # a switch (store_true)
            if text.lower() not in (*TRUE, *FALSE):
                self.error(f"{name}={text!r}: expected one of {', '.join(TRUE + FALSE)}")
            return text.lower() in TRUE
        convert: Callable[[str], Any] = action.type or str  # type: ignore[assignment]
        try:
            value = convert(text)
        except argparse.ArgumentTypeError as err:
            self.error(f"{name}={text!r}: {err}")
        except (TypeError, ValueError):
            self.error(f"{name}={text!r}: expected {_KINDS.get(convert, 'a valid value')}")
        if action.choices is not None and value not in action.choices:
            self.error(f"{name}={text!r}: choose from {', '.join(map(str, action.choices))}")
        return value

    def flag_and_env(self, dest: str) -> str:
        """`--flag (LORAFLEET_FLAG)` of a flag, for messages about a value from either."""
        for action, name in self._env_flags:
            if action.dest == dest:
                return f"{action.option_strings[0]} ({name})"
        raise KeyError(dest)


_KINDS: dict[object, str] = {int: "an integer", float: "a number"}


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A flag type: an integer within [low, high] (either end open when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        _check_range(value, low, high)
        return value

    return parse


def float_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> Callable[[str], float]:
    """A flag type: a number within [low, high], or (low, high] with `low_open`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if low_open and low is not None and not value > low:
            raise argparse.ArgumentTypeError(f"must be > {low}, got {value:g}")
        _check_range(value, low, high)
        return value

    return parse


def _check_range(value: float, low: float | None, high: float | None) -> None:
    if value != value:  # NaN
        raise argparse.ArgumentTypeError("must be a number, got nan")
    if low is not None and value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value:g}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"must be <= {high}, got {value:g}")


class LogFormat(enum.Enum):
    """How log lines are written; AUTO picks CONSOLE on a terminal and JSON otherwise."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


def configure_logging(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Sets up structlog for the process; AUTO means console on a TTY, JSON otherwise."""
    if log_format is LogFormat.AUTO:
        log_format = LogFormat.CONSOLE if sys.stderr.isatty() else LogFormat.JSON
    # The console renderer prints exceptions itself; JSON needs them flattened to a string.
    tail: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer()]
        if log_format is LogFormat.CONSOLE
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

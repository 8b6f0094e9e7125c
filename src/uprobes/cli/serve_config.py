"""``uprobes serve --config FILE``: the exporter's probes and options from a TOML file, as configuration
management ships it. Its keys are the command line's options (``probes`` for the PROBE words): the file's values
are the parser's defaults, so an option given on the command line wins; the probes of both run; the file's
target (``pid``, ``command``, ``match``) is used where the command line gives none.

    listen = ":9930"
    engine = "kernel"
    probes = ["uprobe:libc:malloc size=%di:u64"]
    latency = ["uprobe:libc:free"]
    by = ["$comm"]
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, field

from ..errors import UprobesError
from ..probes.resolve import RETURN_MODES
from .serving import listen_address, otlp_url
from .tracing import positive

__all__ = ["ServeConfig", "config_of", "load_config"]

_TEXTS = "a list of strings"
_FLAG = "true or false"


def _one_of(*choices: str):
    def choose(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, not {text!r}")
        return text
    return choose


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"expected a process id, not {text!r}")
    return int(text)


# key -> (the attribute it sets, how a value becomes it: _TEXTS, _FLAG, or the option's own type)
_KEYS = {
    "probes": ("probes", _TEXTS), "latency": ("latency", _TEXTS), "by": ("by", _TEXTS), "hist": ("hist", _TEXTS),
    "command": ("command", _TEXTS), "match": ("match", _TEXTS), "no_follow": ("no_follow", _FLAG), "trap": ("trap", _FLAG),
    "listen": ("listen", listen_address), "otlp": ("otlp", otlp_url),
    "otlp_interval": ("otlp_interval", positive(float, "otlp_interval", "a number of seconds", 86400)),
    "max_series": ("max_series", positive(int, "max_series", "a number of keys")),
    "duration": ("duration", positive(float, "duration", "a number of seconds")),
    "engine": ("engine", _one_of("auto", "kernel", "ptrace")), "return_mode": ("return_mode", _one_of(*RETURN_MODES)),
    "pid": ("pid", _pid),
}


@dataclass
class ServeConfig:
    """What a file gives: option values (``defaults`` of the command line's parser, so its own win), probes and
    functions to add to its own, and a target for when it gives none."""

    defaults: dict = field(default_factory=dict)
    probes: list[str] = field(default_factory=list)
    latency: list[str] = field(default_factory=list)
    pid: int | None = None
    command: list[str] | None = None
    match: list[str] | None = None

    def complete(self, args: argparse.Namespace) -> None:
        """Add the file's probes to ``args``, and its target where the command line gives none."""
        args.words = [*self.probes, *args.words]
        args.latency = [*self.latency, *(args.latency or [])] or None
        if not args.pids and not args.command_line and not args.dash_command and not args.match:
            args.pids = [self.pid] if self.pid is not None else []
            args.dash_command = self.command or []
            args.match = self.match


def config_of(argv: list[str]) -> ServeConfig | None:
    """The file of ``uprobes serve --config FILE ...`` (None for other command lines)."""
    if argv[:1] != ["serve"]:
        return None
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    path = finder.parse_known_args(argv[1:])[0].config
    return load_config(path) if path is not None else None


def load_config(path: str) -> ServeConfig:
    """The file at ``path``; a problem is one error naming the file, the line and the key."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        raise UprobesError(f"cannot read {path}: {exc.strerror}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UprobesError(f"{path}: {exc} (TOML)") from None
    config = ServeConfig()
    for key, value in values.items():
        where = f"{path}:{_line_of(text, key)}"
        if key not in _KEYS:
            raise UprobesError(f"{where}: unknown key '{key}'; the keys are {', '.join(_KEYS)}")
        attribute, kind = _KEYS[key]
        try:
            converted = _converted(key, value, kind)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise UprobesError(f"{where}: {key}: {exc}") from None
        if attribute in ("probes", "latency", "pid", "command", "match"):
            setattr(config, attribute, converted)
        else:
            config.defaults[attribute] = converted
    return config


def _converted(key: str, value, kind):
    """``value`` as the option makes it; ValueError (or argparse's error) where it is not what it should be."""
    if kind == _TEXTS:
        if isinstance(value, str) and key in ("by", "hist", "command", "match"):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
            raise ValueError(f"expected {kind} (at least one), not {value!r}")
        return ",".join(value) if key in ("by", "hist") else value
    if kind == _FLAG:
        if not isinstance(value, bool):
            raise ValueError(f"expected {kind}, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a string or a number, not {value!r}")
    return kind(str(value))


def _line_of(text: str, key: str) -> int:
    """The line that sets ``key`` (1 where it cannot be found)."""
    match = re.search(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=", text, re.M)
    return text.count("\n", 0, match.start()) + 1 if match else 1

"""Configuration knobs: each one defined once, as a dataclass field with its help and its check.

A knob is a config field made by `knob(...)`: its default, its help, how it is checked (a named
check or the choices) and, if it differs from `--field-name`, its command-line flag. The
command line (fslora_min/cli.py) is generated from these fields, and each config's
`__post_init__` calls `check_knobs(self)`, the one place a knob's value is checked. A bad
value raises a ConfigError that names the field; the command line reports it under the flag.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


class ConfigError(ValueError):
    """A bad configuration value; `field` names it (the CLI turns it into its flag)."""

    def __init__(self, config: object, field: str, problem: str) -> None:
        self.config, self.field, self.problem = type(config), field, problem
        super().__init__(f"{field}: {problem}")


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# name -> (test, what the error says the value must be)
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive integer": (lambda v: _integer(v) and v >= 1, "must be a positive integer"),
    "non-negative integer": (lambda v: _integer(v) and v >= 0,
                             "must be a non-negative integer"),
    "positive": (lambda v: _number(v) and math.isfinite(v) and v > 0,
                 "must be positive and finite"),
    "non-negative": (lambda v: _number(v) and math.isfinite(v) and v >= 0,
                     "must be >= 0 and finite"),
    "probability": (lambda v: _number(v) and 0.0 <= v < 1.0, "must be in [0, 1)"),
}


def knob(default: Any = dataclasses.MISSING, help: str = "", *, check: str | None = None,
         choices: tuple | None = None, flag: str | None = None, aliases: tuple[str, ...] = (),
         parse: Callable[[str], Any] | None = None, default_text: str | None = None,
         default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help, its check and its flag (default: --field-name).

    `parse` reads one command-line word (default: the field's type); `default_text` is what
    --help shows as the default when the value alone would mislead (e.g. "all N").
    """
    if check is not None and check not in CHECKS:
        raise ValueError(f"unknown check {check!r}: use one of {tuple(CHECKS)}")
    metadata = {"help": help, "check": check, "choices": choices, "flag": flag,
                "aliases": aliases, "parse": parse, "default_text": default_text}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata=metadata)


def knobs(cls: type) -> list[dataclasses.Field]:
    """The fields of a config class that are knobs (made by `knob`), in order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def check_knobs(config: object) -> None:
    """Raise ConfigError for the first knob of `config` whose value fails its check or choices.

    None or () passes for a knob whose default it is (it means "not set": e.g. all N, every
    table); a list or tuple value is checked entry by entry.
    """
    for f in knobs(type(config)):
        value = getattr(config, f.name)
        if value in (None, ()) and value == f.default:
            continue
        check, choices = f.metadata["check"], f.metadata["choices"]
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if check is not None and not CHECKS[check][0](v):
                raise ConfigError(config, f.name, f"{CHECKS[check][1]}, got {v!r}")
            if choices is not None and v not in choices:
                raise ConfigError(config, f.name, f"must be one of {choices}, got {v!r}")
        if isinstance(value, (list, tuple)) and not value:
            raise ConfigError(config, f.name, "must not be empty")

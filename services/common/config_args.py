"""A service's settings dataclass from command-line flags, each defaulting to an environment variable.

Every field `some_name` becomes `--some-name`, defaulting to `$<PREFIX>SOME_NAME` and then to the
dataclass default; a bool field is a switch pair `--some-name` / `--no-some-name` (its variable is true for
1 / true / yes).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields
from enum import Enum
from typing import TypeVar

T = TypeVar("T")


def config_from_args(cls: type[T], description: str, env_prefix: str, argv: list[str] | None = None) -> T:
    p = argparse.ArgumentParser(description=description)
    # the fields' declared defaults, not a default instance's values: __post_init__ may derive a value from
    # others (a 0 meaning "from max_tokens_cap"), and the derivation must see the flags given
    for name, default in ((f.name, f.default if f.default is not MISSING else f.default_factory())
                          for f in fields(cls) if f.init):
        env = os.environ.get(env_prefix + name.upper())
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):         # --name / --no-name; a field that defaults to True stays True
            value = env.lower() in ("1", "true", "yes") if env is not None else default
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(default, Enum):       # one of its values (the usage line lists them)
            kind = type(default)
            p.add_argument(flag, type=kind, choices=list(kind), default=kind(env) if env is not None else default)
        else:
            p.add_argument(flag, type=type(default), default=type(default)(env) if env is not None else default)
    return cls(**vars(p.parse_args(argv)))

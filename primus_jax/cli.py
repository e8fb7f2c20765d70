"""Command-line parsing shared by `primus_jax.main` and `primus_jax.compile`.

Each command defines its absl flags in a `define_flags()` that only `run_command` calls, so importing
a command's module (tests, another command, a notebook) defines no flags: both commands take
`--config`, and absl refuses a flag defined twice in one process.
"""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad override is one sentence on stderr and exit status 2.

    An unknown field (`--config.train.nonexistent=1`) or a value of the wrong type
    (`--config.objective.alpha=abc`) would otherwise end in a traceback or absl's FATAL line.
    """
    try:
        return flags.FLAGS(argv)
    except AttributeError as err:  # ml_collections: the override names no field of the config
        field = str(err).strip("\"'")
        named = [a.split("=")[0] for a in argv if a.startswith("--config.") and
                 a.split("=")[0].split(".")[-1] == field]
        print(f"error: {named[0] if named else field}: the config has no such field", file=sys.stderr)
    except flags.Error as err:
        # config_flags embeds the config file's traceback: keep the flag and the final error line.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_command(main: Callable[[list[str]], None], define_flags: Callable[[], None]) -> None:
    """Defines the command's flags, then runs `main` under absl with `parse_flags`."""
    define_flags()
    app.run(main, flags_parser=parse_flags)

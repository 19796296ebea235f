"""Command-line helpers shared by `clip_jax.train` and `clip_jax.evaluate`: one-line errors."""

from __future__ import annotations

import sys
from typing import Callable, Mapping

from absl import flags


def flag_error_line(error: flags.Error) -> str:
    """One line for an absl flag error. A config file that raises while building its config
    (e.g. an unknown variant, `configs/clip.py:huge`) comes wrapped with a traceback: keep the
    flag and the exception's own message (the traceback's last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "bad flag"
    cause = lines[-1].split(": ", 1)[-1]  # "ValueError: unknown config variant ..."
    flag = lines[0].split(": ", 1)[0]  # "flag --config=configs/clip.py:huge"
    return f"{flag}: {cause}"


def one_line(error: BaseException, limit: int = 600) -> str:
    """The message of `error` on one line (whitespace runs collapsed), at most `limit` chars."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def renamed_key_error(argv: list[str], message: str, renamed: Mapping[str, str]) -> str | None:
    """ "unknown key config.OLD; it is now config.NEW" for the first `--config.OLD[=...]` flag
    in `argv` whose dotted key (after the config flag's name) `renamed` maps to a new key and
    whose last part the override error `message` names; None when there is none."""
    for arg in argv[1:]:
        if not arg.startswith("-"):
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        flag, _, key = name.partition(".")
        if key in renamed and key.rsplit(".", 1)[-1] in message:
            return f"unknown key {name}; it is now {flag}.{renamed[key]}"
    return None


def flags_parser(
    program: str, renamed: Mapping[str, str] | None = None
) -> Callable[[list[str]], list[str]]:
    """An `app.run(flags_parser=...)` that reports bad flags and bad config overrides (unknown
    key, wrong type, a config file that raises) as `<program>: error: ...` and exit status 1,
    instead of a traceback. `renamed`: {old dotted config key: new one}, so that an override
    of a key that was replaced names its replacement."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(f"{program}: error: {flag_error_line(e)}\nTry --help.")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            message = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'").strip("'\"")
            message = renamed_key_error(argv, message, renamed or {}) or message
            sys.exit(f"{program}: error: bad config override: {message}")

    return parse

"""Command-line helpers shared by `clip_jax.train` and `clip_jax.evaluate`: one-line errors."""

from __future__ import annotations

import sys
from typing import Callable

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


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
    """An `app.run(flags_parser=...)` that reports bad flags and bad config overrides (unknown
    key, wrong type, a config file that raises) as `<program>: error: ...` and exit status 1,
    instead of a traceback."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(f"{program}: error: {flag_error_line(e)}\nTry --help.")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            message = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'").strip("'\"")
            sys.exit(f"{program}: error: bad config override: {message}")

    return parse

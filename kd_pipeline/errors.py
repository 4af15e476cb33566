"""One base class for every error the user can fix, and the one way every command line reports it.

``UserError`` is bad input: a wrong config key or value, a missing or damaged file (shards, manifest, tokenizer,
checkpoint, model folder, evaluation set), an empty input. Its message names the key or file and says what to do.
The project's specific errors derive from it (and keep their older base classes, so existing ``except ValueError``
still works): ``ConfigError``, ``CheckpointError``, ``ManifestError``, ``LoaderStateError``, ``ModelError``,
``TokenizerError``, ``ExportError``, ``ConversionError``, ``RunInputError``, ``EvalImageError``, and data_prep's
``InputError`` and ``ManifestError``.

Every CLI (``train``, ``eval``, ``export``, ``plan``, ``convert``, ``data_prep``) wraps its ``main`` in
``user_errors_exit``: a ``UserError`` becomes exactly one line ``error: <message>`` on stderr and exit status 2,
without a traceback. Anything else is a bug and keeps its traceback (exit 1).

Only the standard library is imported here: data_prep and the CLIs import this before torch.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
"""Exit status of every CLI for bad input (README's contract; launchers treat it as "fix the input, do not retry")."""


class UserError(Exception):
    """Input the user can fix; the message names the key or file and what to do."""


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


def report_user_error(error: BaseException) -> int:
    """Print ``error: <message>`` as one line on stderr; returns ``EXIT_USER_ERROR``."""
    print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def user_errors_exit(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a CLI ``main``: a ``UserError`` escaping it is reported by ``report_user_error`` (exit 2)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as error:
            return report_user_error(error)

    return wrapped

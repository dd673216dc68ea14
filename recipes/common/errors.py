"""User errors: one clear message and a non-zero exit, without a traceback of our code; bugs keep their traceback.

Every error a user can fix (config, data, model/tokenizer, paths, reward models, thresholds, ...) derives from
`UserError`, and every entry point ends with `run_cli(main)`, which turns a `UserError` into `error: <message>` on
stderr and exit code 2. Any other exception is a bug and propagates unchanged, traceback included.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT_CODE = 2  # argparse's code for a bad command line: the same kind of mistake


class UserError(ValueError):
    """Something the user can fix; the message says what, where and how. A ValueError, so existing callers that
    catch ValueError keep working."""


def demo_hint(path: str | os.PathLike) -> str:
    """The fix to append to a "not found" message: a path under outputs/demo is missing because the demo was not
    built yet, whichever recipe, evaluation or script looked for it."""
    return " Build the demo first: `python scripts/prepare_demo.py`." if "outputs/demo" in str(path) else ""


def run_cli(main: Callable[[], Any]) -> None:
    """Run an entry point's `main()` and exit with its int result (0 for anything else), or with 2 after printing
    `error: <message>` for a `UserError`."""
    try:
        result = main()
    except UserError as err:
        report_user_error(err)
        sys.exit(USER_ERROR_EXIT_CODE)
    sys.exit(result if isinstance(result, int) else 0)


def report_user_error(err: UserError) -> None:
    """Print the message on the first process of each machine only (under DDP every rank usually hits the same
    error); every process also hands it to torchrun's failure summary, so an error on another rank is not lost."""
    message = f"error: {err}"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    # torch.distributed.elastic (behind `accelerate launch` with several processes) prints each failed rank's
    # error file in its summary; without one it shows only a link to its docs. A string message is a format it reads.
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as out:
                json.dump({"message": message, "timestamp": int(time.time())}, out)
        except OSError:
            pass  # the summary then shows torch's default line; the message was printed above

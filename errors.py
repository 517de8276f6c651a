"""The one exception type for bad user input, and the wrapper that turns it into one line and an exit code."""
import os
import sys
from typing import Callable


class InputError(Exception):
    """Something the user gave (a path, a flag, a file) is wrong; the message says what and what to do."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a command's main(); bad input becomes one 'error: ...' line on stderr and exit status 2.

    Under torchrun every rank exits non-zero but only rank 0 prints, so the user reads the message once.
    """
    try:
        main()
    except InputError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

"""What every command line of the engine shares: absl flags, quiet logs, and a user's mistake
(`UserError`) reported as one `error: ...` line with exit status 1 instead of a traceback."""

import sys
import warnings
from typing import Callable

from absl import app, logging

from pallas_kernels.errors import UserError


def main(run: Callable[[], None]) -> None:
    """`app.run` a flag-driven `run()`."""

    def entry(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.WARNING)
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        try:
            run()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(entry)

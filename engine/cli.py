"""What every command line of the engine shares: absl flags, quiet logs, a user's mistake
(`UserError`) reported as one `error: ...` line with exit status 1 instead of a traceback, Ctrl-C
as one `interrupted` line with exit status 130, and reading a text file the user names."""

import os
import signal
import sys
import warnings
from typing import Callable

from absl import app, logging

from pallas_kernels.errors import UserError

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


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
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting is moot
            print("interrupted", file=sys.stderr)
            # Not sys.exit: interrupted inside an XLA compile, the interpreter's shutdown crashes
            # (segmentation fault) while XLA's threads still run. Files were closed on the way
            # out of `run`; only the standard streams need flushing.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED)

    app.run(entry)


def read_text(path: str, encoding: str = "utf-8", flag: str | None = None) -> str:
    """The text of a file the user named (with `--flag`), or a UserError saying which file could
    not be read and why: missing, unreadable, or bytes that are not `encoding` text."""
    named = f"--{flag} {path}" if flag else path
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except LookupError:
        raise UserError(f"unknown --encoding {encoding!r}; try utf-8, latin-1 or cp1252") from None
    except OSError as e:
        raise UserError(f"{named}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        hint = "; pass --encoding if the file uses another one" if flag else ""
        raise UserError(f"{named}: not {encoding} text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start}){hint}") from None

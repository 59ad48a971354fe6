"""`reasonmaxxer` command line: a thin layer over the library.

Precedence: flags > defaults. Bad input prints one line on stderr and exits with status 2
(no traceback); set REASONMAXXER_DEBUG=1 to see tracebacks.

Modules: `parser` builds the parser (one function per subcommand), `options` holds the shared
flag groups and turns parsed flags into the library's objects, `commands_eval`,
`commands_train` and `commands_analysis` hold the `cmd_*` functions the subcommands run.
"""

from __future__ import annotations

import os
import sys

from ..errors import ReasonMaxxerError, out_of_memory_error
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv=None) -> int:
    """Parse `argv` (default: sys.argv) and run its subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        try:
            args.fn(args)
        except Exception as e:  # an out-of-memory anywhere: one line naming the knob
            err = out_of_memory_error(args.cmd, e)
            if err is None:
                raise
            raise err from e
    except ReasonMaxxerError as e:
        if os.environ.get("REASONMAXXER_DEBUG"):
            raise
        print(f"reasonmaxxer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "reasonmaxxer: interrupted (finished shards are kept; re-run the same command to resume)", file=sys.stderr
        )
        return 130
    return 0

"""Command line: ``freezekern analyze | finetune | compare | profile | export | verify | bench | env``.

Every argument, output path and data source is checked before a model is
loaded; user errors (bad values, missing or unreadable files, data that is
not text) end with one line and exit status 2, anything else is reported as
a bug with a pointer to ``-v`` for the traceback (exit status 1).
"""

from __future__ import annotations

import logging
import sys

from freezekern.cli.args import build_parser
from freezekern.cli.commands import (
    cmd_analyze,
    cmd_bench,
    cmd_compare,
    cmd_env,
    cmd_export,
    cmd_finetune,
    cmd_profile,
    cmd_verify,
)

USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)
COMMANDS = {"analyze": cmd_analyze, "finetune": cmd_finetune, "compare": cmd_compare, "profile": cmd_profile,
            "export": cmd_export, "verify": cmd_verify, "bench": cmd_bench, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("freezekern: interrupted; files already written are complete, nothing half-written", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"freezekern: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: say so, and how to see the traceback
        if args.verbose:
            raise
        print(f"freezekern: internal error ({type(exc).__name__}): {exc}\n"
              "this is a bug in freezekern or its use of a library; run again with -v for the traceback and "
              "report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

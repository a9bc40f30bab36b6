"""The `umae` command: a dispatcher. Each subcommand's flags and body live beside its code, in a
module with `HELP`, `add_args(parser)` and `main(args) -> int`; here: the parser, and one line
(`umae <cmd>: error: ...`, exit 2) for a user-facing error instead of a traceback (UMAE_DEBUG=1:
the traceback)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> its module, in `umae --help`'s order
COMMANDS = {
    "bench": "umae.bench.command",
    "report": "umae.bench.report_command",
    "train": "umae.train.main",
    "eval": "umae.research.evaluate",
    "reproduce": "umae.research.reproduce",
    "info": "umae.verify.info",
    "check": "umae.verify.check",
    "convert": "umae.convert",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="umae", description="Fused kernels for MAE / U-MAE training.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, module in COMMANDS.items():
        m = importlib.import_module(module)
        p = sub.add_parser(name, help=m.HELP)
        m.add_args(p)
        p.set_defaults(fn=m.main)
    return ap


def _one_line(e: BaseException) -> str:
    """The message of a user-facing error on one line. An error raised in a DataLoader worker
    arrives re-raised as 'Caught X in DataLoader worker ... Original Traceback ...': its last
    line is the original message."""
    msg = str(e).strip()
    if "Original Traceback" in msg:
        msg = msg.splitlines()[-1]
        head, _, rest = msg.partition(": ")  # 'umae.data.BadImage: <message>'
        msg = rest if head.endswith(type(e).__name__) else msg
    if isinstance(e, OSError) and e.errno is not None and not msg.startswith(("--", "umae")):
        import errno

        where = f" {e.filename}" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"disk full while writing{where}: {e.strerror}" if where else f"disk full: {e.strerror}"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied:{where} ({e.strerror})"
        return f"{e.strerror}:{where}" if where else msg
    return " ".join(msg.split("\n"))


def _aliased(args, parser):
    """`umae bench traffic` and `umae bench --traffic` (earlier releases) are `umae info --traffic` now,
    with the kernels' other static checks; their --shapes and --ops go along, bench's other flags
    (the device, --out) do not apply to counted bytes."""
    from umae.bench.command import measurement

    if args.cmd != "bench" or measurement(args) != "traffic":  # (which refuses two measurements at once)
        return args
    argv = ["info", "--traffic"] + (["--shapes", *args.shapes] if args.shapes else []) + (
        ["--ops", *args.ops] if args.ops else [])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from umae.train.engine import NonFiniteLoss

    try:
        args = _aliased(args, parser)
        return args.fn(args)
    except NonFiniteLoss as e:  # the run stopped before saving; the message names the last checkpoint
        if os.environ.get("UMAE_DEBUG") == "1":
            raise
        print(f"umae {args.cmd}: stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad values, paths, files, a full disk: one line, not a traceback
        if os.environ.get("UMAE_DEBUG") == "1":  # the traceback, for a bug report
            raise
        print(f"umae {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

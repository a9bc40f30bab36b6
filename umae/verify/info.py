"""`umae info`: which implementation each op runs on each device, and why; with --kernels, the
static audit of every Triton kernel specialization compiled for an H100 and of the extension's
CUDA kernels (umae/verify/audit.py); with --traffic, the bytes each op moves, counted
(umae/verify/traffic.py)."""
from __future__ import annotations

import argparse
import os
import sys

HELP = "which implementation each op runs on each device, and why"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", action="store_true",
                   help="also compile every Triton kernel specialization for sm_90 and audit it (registers, spills, "
                        "shared memory, occupancy, vectorized accesses); takes minutes")
    p.add_argument("--traffic", action="store_true",
                   help="also the bytes each op moves, counted: fused (kernels counted in the Triton interpreter) vs "
                        "eager (every aten op) vs the minimum, at ViT-B/16 and ViT-Tiny/32 (was `umae bench traffic`)")
    p.add_argument("--shapes", nargs="+", help="--traffic: the shape sets (default: vit_b16 and vit_tiny32)")
    p.add_argument("--ops", nargs="+", help="--traffic: the ops (default: all)")


def main(args) -> int:
    from .. import format_backend_info

    if args.kernels and args.traffic:
        raise ValueError("--kernels compiles the kernels and --traffic interprets them: one at a time")
    check_traffic_args(args)
    if args.traffic:  # alone: the process becomes an interpreted one, whose backend table is not this machine's
        reexec_interpreted()
        return traffic(args.shapes, args.ops)
    print(format_backend_info())
    return kernel_audit() if args.kernels else 0


def check_traffic_args(args) -> None:
    from ..bench.cases import SHAPES
    from ..bench.command import unknown_names
    from ..ops import registry

    for flag, given in (("--shapes", args.shapes), ("--ops", args.ops)):
        if given and not args.traffic:
            raise ValueError(f"{flag} goes with --traffic")
    bad = unknown_names(args.ops, args.shapes, registry.OPS, SHAPES)  # what the traffic counts: the ops' own
    if bad:
        raise ValueError(bad)


def reexec_interpreted() -> None:
    """The kernels are counted in Triton's interpreter: become a process that has it (exec: no orphan
    child); where it is on already, nothing."""
    from ..ops import _common

    if not _common.triton_interpreted():
        cmd = [sys.executable, "-c", "import sys; from umae.cli.main import main; sys.exit(main(sys.argv[1:]))",
               *sys.argv[1:]]
        os.execve(sys.executable, cmd, dict(os.environ, TRITON_INTERPRET="1"))


def traffic(shapes, ops) -> int:
    """The counted bytes table."""
    from . import traffic as T

    print(f"Counted memory traffic, forward + backward, {str(T.DTYPE).replace('torch.', '')} activations "
          "(umae/verify/traffic.py). Counted bytes, not measured time.\n")
    print(T.format_rows(T.rows(shapes or list(T.TRAFFIC_SHAPES), ops)))
    return 0


def kernel_audit() -> int:
    """Every Triton kernel specialization the launches make, compiled for sm_90 as the JIT would,
    with its static audit (umae/verify/audit.py). Counted from compiled code, not measured."""
    from ..ops import _common, registry

    if _common.triton_interpreted():
        print("umae info --kernels: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)",
              file=sys.stderr)
        return 2
    from . import audit

    print("\nTriton kernels for an H100 (sm_90), as the JIT specializes the launches at the benchmark shapes, "
          "the test token shapes and each model's training step. Static counts, not measurements.")
    for name, op in registry.OPS.items():
        if not op.kernels:
            continue
        rows = audit.audit_op(name)
        print(f"\n{name}: {len(rows)} specializations")
        print(audit.format_rows(rows))
        for r in rows:
            for p in audit.problems(r, name):
                print(f"  ! {r['name']} {r['spec']}: {p}")
    ext = audit.extension()
    if ext:
        rows = audit.cuda_audit(*ext)
        print("\nCUDA kernels of the extension (sm_90, cuobjdump / nvdisasm; dynamic shared memory at the "
              "strips' budget). Static counts, not measurements.")
        print(audit.format_cuda_rows(rows))
        for r in rows:
            for p in audit.cuda_problems(r):
                print(f"  ! {r['name']}: {p}")
    else:
        print("\nCUDA kernels: the extension was built without CUDA (or csrc/ is not beside it): nothing to audit")
    return 0

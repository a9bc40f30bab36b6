"""`umae info`: which implementation each op runs on each device, and why; with --kernels, the
static audit of every Triton kernel specialization compiled for an H100 and of the extension's
CUDA kernels (umae/bench/audit.py)."""
from __future__ import annotations

import argparse
import sys

HELP = "which implementation each op runs on each device, and why"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", action="store_true",
                   help="also compile every Triton kernel specialization for sm_90 and audit it (registers, spills, "
                        "shared memory, occupancy, vectorized accesses); takes minutes")


def main(args) -> int:
    from .. import format_backend_info

    print(format_backend_info())
    if args.kernels:
        return kernel_audit()
    return 0


def kernel_audit() -> int:
    """Every Triton kernel specialization the launches make, compiled for sm_90 as the JIT would,
    with its static audit (umae/bench/audit.py). Counted from compiled code, not measured."""
    from ..ops import _backend, registry

    if _backend.triton_interpreted():
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

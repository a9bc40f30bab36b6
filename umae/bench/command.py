"""`umae bench`: its flags and the run they ask for: the timed kernels and training steps, or one of
the other measurements on the same flags, `umae bench host | loader | profile | tune`
(MEASUREMENTS); prints the tables, writes results.json / .csv and the plots (or host.json, ...)
with --out."""
from __future__ import annotations

import argparse
import os
import sys

HELP = "fused vs eager reference vs torch.compile(reference), per op"


# the measurements besides the timed ops: `umae bench <what>` (the old flags --host, --profile-steps,
# --tune and `--ops loader` still name them; `umae bench traffic` is `umae info --traffic`, umae/cli/main.py)
MEASUREMENTS = {
    "host": "the host time of one call of each op at tiny sizes (Python, checks, dispatch, autograd, launches), "
            "forward and forward + backward, fused vs reference vs one aten op, and a training step of the "
            "smallest model; with --out, host.json",
    "loader": "the input pipeline alone on the host: decode + MAE's augmentation + collate, no model",
    "profile": "a few U-MAE training steps under torch.profiler per batch and provider (--providers; CUDA: ViT-B/16 "
               "at batch 64 and 256): host and wall ms per step, device-busy fraction, kernel launches, top kernels; "
               "with --out, profile.json",
    "tune": "on a GPU: each candidate tile configuration of the Triton kernels (uniformity_loss at B = 256 and "
            "16,384 x 768, bf16, fwd+bwd, device time) and the winners; with --out, tune.json",
}


def add_args(b: argparse.ArgumentParser) -> None:
    from ..ops import registry
    from .cases import SHAPES
    from .runner import E2E_OPS
    from .timing import CG_PROVIDERS, MODES, PROVIDERS

    b.add_argument("what", nargs="?", choices=[*MEASUREMENTS, "traffic"], metavar="MEASUREMENT",
                   help="instead of timing the ops: " + "; ".join(f"{k}: {v}" for k, v in MEASUREMENTS.items())
                        + "; traffic: = umae info --traffic (earlier releases' name)")

    b.add_argument("--full", action="store_true",
                   help="the whole set: every op and training step and the input pipeline, at every default shape "
                        "set, mode and dtype (without it: each op fwd+bwd at one shape set, and the U-MAE training "
                        "step; what a flag below names is run as named)")
    b.add_argument("--ops", nargs="+", help=f"default: the ops and train_step; --full: all ({', '.join(registry.OPS)}, "
                                           f"{', '.join(E2E_OPS)}, loader)")
    b.add_argument("--shapes", nargs="+", help=f"shape sets ({', '.join(SHAPES)})")
    b.add_argument("--modes", nargs="+", choices=MODES, help="default: fwd+bwd; --full: all")
    b.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS + CG_PROVIDERS,
                   help="default: all (the training step on CPU without --full: fused and eager, as a model's "
                        "Inductor compile takes minutes on a CPU)")
    b.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device", choices=["cpu", "cuda"])
    b.add_argument("--out", help="folder for results.json / results.csv")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--append", action="store_true",
                   help="add the rows to --out's results.json (its environment and ceilings kept) instead of "
                        "replacing it")
    b.add_argument("--sweep", action="store_true", help="add the batch-size sweep at ViT-B/16 shapes")
    b.add_argument("--profile", action="store_true", help="write a torch.profiler Chrome trace (NVTX ranges per op)")
    for flag, what in (("--host", "host"), ("--profile-steps", "profile"), ("--tune", "tune")):  # earlier releases' flags
        b.add_argument(flag, action="store_true", help=f"= umae bench {what}")
    b.add_argument("--traffic", action="store_true", help="= umae info --traffic (umae/cli/main.py passes it on)")


def main(args) -> int:
    """`umae bench [MEASUREMENT]`: 0, or 2 for an unknown op or shape set or an absent GPU."""
    if args.out:  # before the run, not after it
        from .._files import check_target

        check_target(args.out, "--out", folder=True, make_parents=True)
    what = measurement(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("umae bench: --device cuda: no CUDA GPU is available here", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {"host": host, "loader": loader, "profile": profile_steps, "tune": tune, None: time_ops}[what](args, device)


def measurement(args) -> str | None:
    """The measurement asked for (`umae bench host`, or its old flag), None for the timed ops."""
    flags = {"host": args.host, "profile": args.profile_steps, "tune": args.tune, "traffic": args.traffic}
    named = [w for w in [args.what, *(w for w, on in flags.items() if on)] if w]
    if args.what is None and args.ops is not None and args.ops == ["loader"]:
        named.append("loader")
    if len(set(named)) > 1:
        raise ValueError(f"umae bench: one measurement at a time, got {' and '.join(sorted(set(named)))}")
    return named[0] if named else None


def tune(args, device) -> int:
    from . import tune as T

    return T.main(device, args.out)


def profile_steps(args, device) -> int:
    from . import profile_steps as P

    return P.main(device, args.providers, args.out)


def host(args, device) -> int:
    from . import host as H

    bad = unknown_names(args.ops, None)
    if bad:
        print(f"umae bench: {bad}", file=sys.stderr)
        return 2
    ops = list(H.registry.OPS) if args.ops is None else [o for o in args.ops if o in H.registry.OPS]
    return H.main(ops, device, args.out, step=args.ops is None or "train_step" in args.ops)


def loader(args, device) -> int:
    bad = unknown_names(None, args.shapes)
    if bad:
        print(f"umae bench: {bad}", file=sys.stderr)
        return 2
    print_loader(args.shapes)
    return 0


def time_ops(args, device) -> int:
    """The timed ops and training steps (and, named in --ops, the input pipeline)."""
    import torch

    from . import loader as L

    quick(args, device)
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    shapes = args.shapes
    if args.sweep:
        from .cases import SWEEP

        shapes = (shapes or []) + list(SWEEP)
    bad = unknown_names(args.ops, shapes)
    if bad:
        print(f"umae bench: {bad}", file=sys.stderr)
        return 2
    old = previous(args.out, args.append)
    env, ceil = print_environment(device)
    ops = args.ops or all_ops()
    if L.OP in ops:  # the input pipeline alone, on the host
        print_loader(shapes)
        ops = [o for o in ops if o != L.OP]
        shapes = [s for s in shapes or [] if s not in L.SHAPES] or None
        if not ops:
            return 0
    rows, kernel_ops = run_rows(args, ops, shapes, dtypes, device, ceil)
    if args.out:
        write_results(args.out, rows, env, ceil, old)
    if args.profile:
        write_profile(args.out, kernel_ops, shapes, dtypes, device)
    return 0


def quick(args, device: str) -> None:
    """Without --full, what the flags leave open is the quick set: the ops and the U-MAE training
    step, fwd+bwd, at QUICK_SHAPES / QUICK_DTYPES (the training step on CPU: fused vs eager)."""
    from ..ops import registry
    from .cases import QUICK_DTYPES, QUICK_SHAPES
    from .timing import MODES, PROVIDERS

    args.e2e_providers = args.providers
    if args.full:
        args.modes = args.modes or list(MODES)
        return
    if args.ops is None:
        args.ops = list(registry.OPS) + ["train_step"]
        if device == "cpu" and args.providers == list(PROVIDERS):
            args.e2e_providers = ["fused", "eager"]
    args.modes = args.modes or ["fwd+bwd"]
    if args.shapes is None and not args.sweep:
        args.shapes = list(QUICK_SHAPES[device])
    if args.dtypes is None:
        args.dtypes = [str(d).replace("torch.", "") for d in QUICK_DTYPES[device]]


def all_ops() -> list[str]:
    """What `--ops` defaults to: every registered op, the training steps, the loader."""
    from ..ops import registry
    from . import loader
    from .runner import E2E_OPS

    return list(registry.OPS) + list(E2E_OPS) + [loader.OP]


def unknown_names(ops, shapes, known_ops=None, known_shapes=None) -> str | None:
    """The message for an op or shape set that does not exist; None when all do. Known by default:
    what `umae bench` measures (its ops, steps and loader; the op and loader shape sets)."""
    from . import loader
    from .cases import SHAPES

    known_ops = all_ops() if known_ops is None else list(known_ops)
    known_shapes = list(SHAPES) + list(loader.SHAPES) if known_shapes is None else list(known_shapes)
    for name, values, known in (("ops", ops, known_ops), ("shapes", shapes, known_shapes)):
        bad = [v for v in values or [] if v not in known]
        if bad:
            return f"unknown {name} {bad}; choose from {sorted(known)}"
    return None


def print_environment(device: str) -> tuple[dict, dict]:
    """Prints the backends, the machine and the measured ceilings; returns (environment, ceilings)."""
    from .. import format_backend_info
    from .runner import environment
    from .timing import ceilings

    env = environment(device)
    print(format_backend_info())
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  "
          f"{env['date']}  THP_MEM_ALLOC_ENABLE={env['thp_mem_alloc']}")
    if device == "cpu":
        print("NOTE: CPU figures, from the C++ CPU kernels -- they are not GPU figures (the Triton and CUDA "
              "kernels are not timed here).")
    ceil = ceilings(device)
    fresh = f", into a fresh tensor {ceil['clone_gbps']:.1f} GB/s" if "clone_gbps" in ceil else ""
    print(f"measured ceilings: copy {ceil['copy_gbps']:.1f} GB/s{fresh}, matmul {ceil['matmul_tflops']:.2f} TFLOP/s "
          f"({ceil['matmul_dtype']})")
    return env, ceil


def print_loader(shapes) -> None:
    from . import loader

    lrows = list(loader.rows([s for s in shapes or [] if s in loader.SHAPES] or None))
    print("input pipeline (umae/bench/loader.py): decode + MAE's augmentation + collate, no model; host CPU")
    print(loader.format_rows(lrows) + "\n")


def run_rows(args, ops, shapes, dtypes, device, ceil) -> tuple[list[dict], list[str]]:
    """Times the kernel ops and the training steps; prints the table; returns (its rows, the kernel ops)."""
    from .report import add_fractions, format_table, speedups
    from .runner import E2E_DEFAULT, E2E_OPS, run, run_e2e

    kernel_ops = [o for o in ops if o not in E2E_OPS]
    op_rows = list(run(kernel_ops, shapes, args.modes, args.providers, dtypes, device,
                       progress=not args.no_progress)) if kernel_ops else []
    e2e_ops = [o for o in E2E_OPS if o in ops]
    e2e_rows = list(run_e2e(shapes or E2E_DEFAULT[device], device, args.e2e_providers, ops=e2e_ops)) if e2e_ops else []
    rows = add_fractions(speedups(op_rows + e2e_rows), ceil)
    print(format_table(rows))
    return rows, kernel_ops


def previous(out, append: bool) -> dict | None:
    """With --append, --out's results.json when there is one (checked before the run, not after it);
    a ValueError naming it when it is not a results file."""
    prev = os.path.join(out, "results.json") if out and append else None
    if prev is None or not os.path.exists(prev):
        return None
    from .report import read_results

    return read_results(prev, "--append's")


def write_results(out: str, rows, env, ceil, old: dict | None) -> None:
    """results.json, results.csv and the plots in `out`; with `old` (`previous`'s), the rows added
    to its rows (one file from several time-boxed runs: scripts/gpu_check.sh)."""
    from .plots import plot
    from .report import write

    if old is not None:
        rows, env, ceil = old["rows"] + rows, old["environment"], old.get("ceilings") or ceil
    write(rows, env, out, ceil)
    charts = plot(rows, ceil, out)
    print(f"wrote {out}/results.json, results.csv" + "".join(f", {os.path.basename(c)}" for c in charts))


def write_profile(out, kernel_ops, shapes, dtypes, device) -> None:
    import torch

    from .runner import profile

    out = out or "."
    os.makedirs(out, exist_ok=True)
    path = profile(kernel_ops, (shapes or ["cpu_small"])[:1], dtypes or [torch.float32], device,
                   os.path.join(out, "trace.json"))
    print(f"wrote {path} (open in chrome://tracing or Perfetto)")

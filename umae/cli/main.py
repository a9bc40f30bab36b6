"""The `umae` command: `umae bench`, `umae info`."""
from __future__ import annotations

import argparse
import os
import sys


def _traffic(args) -> int:
    from umae import _backend

    # the kernels are counted in Triton's interpreter: become a process that has it (exec: no orphan child)
    if not _backend.triton_interpreted():
        cmd = [sys.executable, "-c", "import sys; from umae.cli.main import main; sys.exit(main(sys.argv[1:]))",
               *sys.argv[1:]]
        os.execve(sys.executable, cmd, dict(os.environ, TRITON_INTERPRET="1"))
    from umae.bench import traffic

    shapes = args.shapes or list(traffic.TRAFFIC_SHAPES)
    print(f"Counted memory traffic, forward + backward, {str(traffic.DTYPE).replace('torch.', '')} activations "
          "(umae/bench/traffic.py). Counted bytes, not measured time.\n")
    print(traffic.format_rows(traffic.rows(shapes, args.ops)))
    return 0


def _bench(args) -> int:
    if args.traffic:
        return _traffic(args)
    import torch

    from umae import bench, format_backend_info, registry

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    shapes = args.shapes
    if args.sweep:
        shapes = (shapes or []) + list(bench.SWEEP)
    from umae.bench import loader

    for name, values in (("ops", args.ops), ("shapes", shapes)):
        known = list(registry.OPS) + list(bench.E2E_OPS) + [loader.OP] if name == "ops" else \
            list(bench.SHAPES) + list(loader.SHAPES)
        bad = [v for v in values or [] if v not in known]
        if bad:
            print(f"umae bench: unknown {name} {bad}; choose from {sorted(known)}", file=sys.stderr)
            return 2
    env = bench.environment(device)
    print(format_backend_info())
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  {env['date']}  "
          f"THP_MEM_ALLOC_ENABLE={env['thp_mem_alloc']}")
    if device == "cpu":
        print("NOTE: CPU figures, from the C++ CPU kernels -- they are not GPU figures (the Triton and CUDA "
              "kernels are not timed here).")
    ceil = bench.ceilings(device)
    fresh = f", into a fresh tensor {ceil['clone_gbps']:.1f} GB/s" if "clone_gbps" in ceil else ""
    print(f"measured ceilings: copy {ceil['copy_gbps']:.1f} GB/s{fresh}, matmul {ceil['matmul_tflops']:.2f} TFLOP/s "
          f"({ceil['matmul_dtype']})")
    ops = args.ops or list(registry.OPS) + list(bench.E2E_OPS) + [loader.OP]
    if loader.OP in ops:  # the input pipeline alone, on the host
        lrows = list(loader.rows([s for s in shapes or [] if s in loader.SHAPES] or None))
        print("input pipeline (umae/bench/loader.py): decode + MAE's augmentation + collate, no model; host CPU")
        print(loader.format_rows(lrows) + "\n")
        ops = [o for o in ops if o != loader.OP]
        shapes = [s for s in shapes or [] if s not in loader.SHAPES] or None
        if not ops:
            return 0
    kernel_ops = [o for o in ops if o not in bench.E2E_OPS]
    op_rows = list(bench.run(kernel_ops, shapes, args.modes, args.providers, dtypes, device,
                             progress=not args.no_progress)) if kernel_ops else []
    e2e_shapes = shapes or bench.E2E_DEFAULT[device]
    e2e_ops = [o for o in bench.E2E_OPS if o in ops]
    e2e_rows = list(bench.run_e2e(e2e_shapes, device, args.providers, ops=e2e_ops)) if e2e_ops else []
    rows = bench.add_fractions(bench.speedups(op_rows + e2e_rows), ceil)
    print(bench.format_table(rows))
    if args.out:
        prev = os.path.join(args.out, "results.json")
        if args.append and os.path.exists(prev):  # one results.json from several time-boxed runs (gpu_check.sh)
            import json

            with open(prev) as f:
                old = json.load(f)
            rows, env, ceil = old["rows"] + rows, old["environment"], old["ceilings"] or ceil
        bench.write(rows, env, args.out, ceil)
        charts = bench.plot(rows, ceil, args.out)
        print(f"wrote {args.out}/results.json, results.csv" + "".join(f", {os.path.basename(c)}" for c in charts))
    if args.profile:
        out = args.out or "."
        os.makedirs(out, exist_ok=True)
        path = bench.profile(kernel_ops, (shapes or ["cpu_small"])[:1],
                             dtypes or [torch.float32], device, os.path.join(out, "trace.json"))
        print(f"wrote {path} (open in chrome://tracing or Perfetto)")
    return 0


def _report(args) -> int:
    from umae.bench import report

    table = report.update_readme(args.results, args.readme)
    print(table)
    return 0


def _info(args) -> int:
    from umae import format_backend_info

    print(format_backend_info())
    if args.kernels:
        return _kernel_audit()
    return 0


def _kernel_audit() -> int:
    """Every Triton kernel specialization the launches make, compiled for sm_90 as the JIT would,
    with its static audit (umae/kernels/_audit.py). Counted from compiled code, not measured."""
    from umae import _backend, registry

    if _backend.triton_interpreted():
        print("umae info --kernels: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)",
              file=sys.stderr)
        return 2
    from umae.kernels import _audit

    print("\nTriton kernels for an H100 (sm_90), as the JIT specializes the launches at the benchmark shapes, "
          "the test token shapes and each model's training step. Static counts, not measurements.")
    for name, op in registry.OPS.items():
        if not op.kernels:
            continue
        rows = _audit.audit_op(name)
        print(f"\n{name}: {len(rows)} specializations")
        print(_audit.format_rows(rows))
        for r in rows:
            for p in _audit.problems(r, name):
                print(f"  ! {r['name']} {r['spec']}: {p}")
    ext = _audit.extension()
    if ext:
        rows = _audit.cuda_audit(*ext)
        print("\nCUDA kernels of the extension (sm_90, cuobjdump / nvdisasm; dynamic shared memory at the "
              "strips' budget). Static counts, not measurements.")
        print(_audit.format_cuda_rows(rows))
        for r in rows:
            for p in _audit.cuda_problems(r):
                print(f"  ! {r['name']}: {p}")
    else:
        print("\nCUDA kernels: the extension was built without CUDA (or csrc/ is not beside it): nothing to audit")
    return 0


def _train(args) -> int:
    from umae.train import train

    recs = train(args)
    if recs:
        print(f"done: {recs[-1]['step']} steps, loss {recs[-1]['loss']:.4f}, {recs[-1]['img_per_s']:.0f} img/s; "
              f"checkpoints and log.jsonl in {args.out}")
    return 0


def _eval(args) -> int:
    from umae.evaluate import evaluate

    res = evaluate(args)
    for r in res["results"]:
        print(f"{r['ckpt']} [{r['pool']}]  linear probe {r['linear_probe_acc']:.3f}  kNN {r['knn_acc']:.3f}  "
              f"effective rank {r['effective_rank']:.1f} / {r['feature_dim']}")
    print(f"wrote {args.out}/eval.json and {args.out}/spectrum.png")
    return 0


def _reproduce(args) -> int:
    from umae.reproduce import reproduce

    reproduce(args)
    print(f"wrote {args.out}/report.md, spectrum.png, curves.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from umae import bench, registry

    ap = argparse.ArgumentParser(prog="umae", description="Fused kernels for MAE / U-MAE training.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="fused vs eager reference vs torch.compile(reference), per op")
    b.add_argument("--ops", nargs="+",
                   help=f"default: all ({', '.join(registry.OPS)}, {', '.join(bench.E2E_OPS)}, loader)")
    b.add_argument("--shapes", nargs="+", help=f"shape sets ({', '.join(bench.SHAPES)})")
    b.add_argument("--modes", nargs="+", default=list(bench.MODES), choices=bench.MODES)
    b.add_argument("--providers", nargs="+", default=list(bench.PROVIDERS), choices=bench.PROVIDERS)
    b.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device", choices=["cpu", "cuda"])
    b.add_argument("--out", help="folder for results.json / results.csv")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--append", action="store_true",
                   help="add the rows to --out's results.json (its environment and ceilings kept) instead of replacing it")
    b.add_argument("--sweep", action="store_true", help="add the batch-size sweep at ViT-B/16 shapes")
    b.add_argument("--profile", action="store_true", help="write a torch.profiler Chrome trace (NVTX ranges per op)")
    b.add_argument("--traffic", action="store_true",
                   help="instead of timing: count the bytes each op moves, fused (kernels counted in the Triton "
                        "interpreter) vs eager (every aten op) vs the minimum, at ViT-B/16 and ViT-Tiny/32")
    b.set_defaults(fn=_bench)
    r = sub.add_parser("report", help="regenerate README's performance table from bench/results")
    r.add_argument("--results", default="bench/results")
    r.add_argument("--readme", default="README.md")
    r.set_defaults(fn=_report)
    from umae import evaluate, train

    t = sub.add_parser("train", help="MAE / U-MAE pretraining (torchrun for DDP)")
    train.add_args(t)
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="linear probe, kNN and the feature spectrum of checkpoints")
    evaluate.add_args(e)
    e.set_defaults(fn=_eval)
    from umae import reproduce

    rp = sub.add_parser("reproduce", help="U-MAE's effect in one command: MAE vs U-MAE trained and evaluated "
                                          "alike, one report folder")
    reproduce.add_args(rp)
    rp.set_defaults(fn=_reproduce)
    i = sub.add_parser("info", help="which implementation each op runs on each device, and why")
    i.add_argument("--kernels", action="store_true",
                   help="also compile every Triton kernel specialization for sm_90 and audit it (registers, spills, "
                        "shared memory, occupancy, vectorized accesses); takes minutes")
    i.set_defaults(fn=_info)
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from umae.train.engine import NonFiniteLoss

    try:
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

"""The numbers a run reports: speedups, fractions of the measured ceilings, the printed table,
results.json / results.csv, and README's performance table generated from the recorded GPU
results under bench/results/ (`umae report`; never typed by hand)."""
from __future__ import annotations

import csv
import glob
import json
import os

from .runner import E2E_OPS
from .timing import FUSED_PROVIDERS


def add_fractions(rows, ceil):
    """Adds the fraction of the measured copy bandwidth / matrix peak to fused rows."""
    for r in rows:  # fused rows only: the other providers' work differs from the counted bytes / FLOPs
        if "ms" in r and r["provider"] in FUSED_PROVIDERS and r["op"] not in E2E_OPS:
            r["frac_copy_bw"] = r["gbps"] / ceil["copy_gbps"]
            if r.get("tflops"):
                r["frac_matmul_peak"] = r["tflops"] / ceil["matmul_tflops"]
    return rows


def speedups(rows):
    """Adds `speedup_vs_eager` / `speedup_vs_compile` to the fused and fused+compile rows."""
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["mode"])  # noqa: E731
    base = {(key(r), r["provider"]): r["ms"] for r in rows if "ms" in r}
    for r in rows:
        if r.get("provider") in FUSED_PROVIDERS and "ms" in r:
            for p in ("eager", "compile"):
                if (key(r), p) in base:
                    r[f"speedup_vs_{p}"] = base[(key(r), p)] / r["ms"]
    return rows


def format_table(rows) -> str:
    head = (f"{'op':<16} {'shape':<10} {'dtype':<8} {'mode':<7} {'provider':<13} {'ms':>9} {'GB/s':>8} "
            f"{'TFLOP/s':>8} {'x eager':>8} {'x compile':>9} {'%copyBW':>8} {'%mmPeak':>8} {'parity':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<13} skipped: {r['skipped']}")
            continue
        if "error" in r:
            out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<13} ERROR {r['error']}")
            continue
        tf = f"{r['tflops']:.2f}" if r.get("tflops") else ("%.0f img/s" % r["img_per_s"] if "img_per_s" in r else "-")
        se = f"{r['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in r else ""
        sc = f"{r['speedup_vs_compile']:.2f}" if "speedup_vs_compile" in r else ""
        par = f"{r['parity_max_abs']:.1e}" if r["provider"] == "fused" and r["op"] not in E2E_OPS else ""
        fb = f"{100 * r['frac_copy_bw']:.0f}%" if r.get("gbps") and "frac_copy_bw" in r else ""
        fm = f"{100 * r['frac_matmul_peak']:.0f}%" if "frac_matmul_peak" in r else ""
        out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<13} "
                   f"{r['ms']:>9.3f} {r['gbps']:>8.1f} {tf:>8} {se:>8} {sc:>9} {fb:>8} {fm:>8} {par:>9}")
    return "\n".join(out)


def write(rows, env, out_dir, ceil=None):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(environment=env, ceilings=ceil, rows=rows), f, indent=1)
    fields = sorted({k for r in rows for k in r})
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(env) + fields)
        w.writeheader()
        for r in rows:
            w.writerow({**env, **r})


# ---- README's table from bench/results/<device>/<date>/results.json -----------------

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def load(results_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*", "results.json"))):
        with open(path) as f:
            d = json.load(f)
        if d["environment"].get("device_type") == "cuda":
            runs.append((path, d))
    return runs


def table(results_dir) -> str:
    runs = load(results_dir)
    if not runs:
        return ("No GPU results are recorded yet: `bash scripts/gpu_run.sh` on a GPU machine writes them to "
                "`bench/results/<device>/<date>/`, and `umae report` regenerates this table from them.")
    path, d = runs[-1]  # the newest recorded run
    env, ceil = d["environment"], d.get("ceilings") or {}
    lines = [f"From `{os.path.relpath(path)}`: {env['device']}, {env['date']}, torch {env['torch']}, "
             f"triton {env['triton']}, commit {env['commit']}. Measured ceilings: copy "
             f"{ceil.get('copy_gbps', float('nan')):.0f} GB/s, bf16 matmul {ceil.get('matmul_tflops', float('nan')):.0f} TFLOP/s.",
             "", "| op | shape | dtype | mode | fused ms | eager ms | compile ms | fused+compile ms | x eager | x compile "
             "| GB/s | TFLOP/s | % of ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in d["rows"]:
        if "ms" in r:
            by.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    for (op, shape, dtype, mode), p in by.items():
        if mode not in ("fwd+bwd", "step") or "fused" not in p:
            continue
        f = p["fused"]
        times = " | ".join(f"{p[k]['ms']:.3f}" if k in p else "-" for k in ("fused", "eager", "compile", "fused+compile"))
        frac = f.get("frac_matmul_peak", f.get("frac_copy_bw"))
        roof = f"{f['gbps']:.0f} | {(f.get('tflops') or 0):.1f} | {100 * frac:.0f}%" if frac is not None else "- | - | -"
        lines.append(f"| {op} | {shape} | {dtype} | {mode} | {times} | {f.get('speedup_vs_eager', float('nan')):.2f} | "
                     f"{f.get('speedup_vs_compile', float('nan')):.2f} | {roof} |")
    return "\n".join(lines)


def update_readme(results_dir, readme) -> str:
    t = table(results_dir)
    with open(readme) as f:
        s = f.read()
    if START not in s or END not in s:
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    head, rest = s.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(head + START + "\n" + t + "\n" + END + tail)
    return t

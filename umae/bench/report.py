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
    for r in rows:
        # MFU: every provider does the model's FLOPs; only against a bf16 ceiling (the steps run under
        # bf16 autocast: the CPU's ceiling is fp32, which its bf16 matmuls exceed)
        if "ms" in r and r["op"] in E2E_OPS and r.get("tflops") and ceil.get("matmul_dtype") == "bf16":
            r["mfu"] = r["tflops"] / ceil["matmul_tflops"]
        # fused rows only: the other providers' work differs from the counted bytes / FLOPs
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
            f"{'TFLOP/s':>8} {'x eager':>8} {'x compile':>9} {'%copyBW':>8} {'%mmPeak':>8} {'parity':>9} {'peak MB':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<13} skipped: {r['skipped']}")
            continue
        if "error" in r:
            out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<13} ERROR {r['error']}")
            continue
        tf = ("%.0f img/s" % r["img_per_s"]) if "img_per_s" in r else (f"{r['tflops']:.2f}" if r.get("tflops") else "-")
        se = f"{r['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in r else ""
        sc = f"{r['speedup_vs_compile']:.2f}" if "speedup_vs_compile" in r else ""
        par = f"{r['parity_max_abs']:.1e}" if r["provider"] == "fused" and r["op"] not in E2E_OPS else ""
        fb = f"{100 * r['frac_copy_bw']:.0f}%" if r.get("gbps") and "frac_copy_bw" in r else ""
        fm = f"{100 * r['frac_matmul_peak']:.0f}%" if "frac_matmul_peak" in r else (
            f"MFU {100 * r['mfu']:.0f}%" if "mfu" in r else "")
        pk = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else ""
        out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<13} "
                   f"{r['ms']:>9.3f} {r['gbps']:>8.1f} {tf:>8} {se:>8} {sc:>9} {fb:>8} {fm:>8} {par:>9} {pk:>9}")
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
    return sorted(runs, key=lambda run: run[1]["environment"]["date"])  # oldest first


def table(results_dir) -> str:
    runs = load(results_dir)
    if not runs:
        return ("No GPU results are recorded yet: `bash scripts/gpu_check.sh` on a GPU machine writes them; copied to "
                "`bench/results/<device>/<date>/`, and `umae report` regenerates this table from them.")
    # every recorded run; where two measured the same row, the newer run's wins
    lines, by = [], {}
    for i, (path, d) in enumerate(runs, 1):
        env, ceil = d["environment"], d.get("ceilings") or {}
        lines.append(f"- run {i}: `{os.path.relpath(path)}`: {env['device']}, {env['date']}, torch {env['torch']}, "
                     f"triton {env['triton']}, commit {env['commit']}; measured ceilings: copy "
                     f"{ceil.get('copy_gbps', float('nan')):.0f} GB/s, bf16 matmul "
                     f"{ceil.get('matmul_tflops', float('nan')):.0f} TFLOP/s.")
        runs_rows = {}
        for r in d["rows"]:
            if "ms" in r or "error" in r:
                runs_rows.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
        for k, p in runs_rows.items():
            by[k] = (i, p)
    lines += ["", "Times in ms (an error, e.g. out of memory, says so). Training steps: img/s and MFU (FLOPs counted "
              "by torch's FlopCounterMode over the measured bf16 matmul peak); ops: GB/s of the bytes the op must "
              "move and the fraction of the measured copy bandwidth (or matmul peak). Peak memory: above the inputs.",
              "", "| run | op | shape | dtype | mode | fused | eager | compile | fused+compile | x eager | x compile "
              "| GB/s or img/s | TFLOP/s | % of ceiling | peak MB fused / eager |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cell = lambda r: "-" if r is None else (f"{r['ms']:.3f}" if "ms" in r else  # noqa: E731
                                            ("OOM" if "OutOfMemory" in r["error"] else "error"))
    mb = lambda r: f"{r['peak_mb']:.0f}" if r and r.get("peak_mb") is not None else "-"  # noqa: E731
    for (op, shape, dtype, mode), (run, p) in by.items():
        if mode not in ("fwd+bwd", "step") or "ms" not in p.get("fused", {}):
            continue
        f = p["fused"]
        times = " | ".join(cell(p.get(k)) for k in ("fused", "eager", "compile", "fused+compile"))
        if "img_per_s" in f:
            roof = (f"{f['img_per_s']:.0f} img/s | {(f.get('tflops') or 0):.1f} | "
                    + (f"MFU {100 * f['mfu']:.0f}%" if "mfu" in f else "-"))
        else:
            frac = f.get("frac_matmul_peak", f.get("frac_copy_bw"))
            roof = f"{f['gbps']:.0f} | {(f.get('tflops') or 0):.1f} | {100 * frac:.0f}%" if frac is not None else "- | - | -"
        ratio = lambda k: f"{f[k]:.2f}" if k in f else "-"  # noqa: E731
        lines.append(f"| {run} | {op} | {shape} | {dtype} | {mode} | {times} | {ratio('speedup_vs_eager')} | "
                     f"{ratio('speedup_vs_compile')} | {roof} | {mb(f)} / {mb(p.get('eager'))} |")
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

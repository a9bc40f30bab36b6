"""README's performance table, generated from the recorded GPU results under bench/results/
(never typed by hand): `umae report`."""
from __future__ import annotations

import glob
import json
import os

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
             "", "| op | shape | dtype | mode | fused ms | eager ms | compile ms | x eager | x compile | GB/s | TFLOP/s | % of ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in d["rows"]:
        if "ms" in r:
            by.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    for (op, shape, dtype, mode), p in by.items():
        if mode not in ("fwd+bwd", "step") or "fused" not in p:
            continue
        f = p["fused"]
        ms = lambda k: f"{p[k]['ms']:.3f}" if k in p else "-"  # noqa: E731
        frac = f.get("frac_matmul_peak", f.get("frac_copy_bw"))
        lines.append(f"| {op} | {shape} | {dtype} | {mode} | {ms('fused')} | {ms('eager')} | {ms('compile')} | "
                     f"{f.get('speedup_vs_eager', float('nan')):.2f} | {f.get('speedup_vs_compile', float('nan')):.2f} | "
                     f"{f['gbps']:.0f} | {(f.get('tflops') or 0):.1f} | {100 * frac:.0f}% |" if frac is not None else
                     f"| {op} | {shape} | {dtype} | {mode} | {ms('fused')} | {ms('eager')} | {ms('compile')} | "
                     f"{f.get('speedup_vs_eager', float('nan')):.2f} | {f.get('speedup_vs_compile', float('nan')):.2f} | - | - | - |")
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

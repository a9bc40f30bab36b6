"""The numbers a run reports: speedups, fractions of the measured ceilings, the printed table,
results.json / results.csv, and the performance tables generated from the recorded GPU results
under bench/results/ (`umae report`; never typed by hand): the full table in docs/benchmarks.md,
its headline rows in README.md."""
from __future__ import annotations

import csv
import glob
import io
import os

from .. import _files as files
from .._table import Col, format_table as _format_table
from .runner import E2E_OPS
from .timing import CG_PROVIDERS, FUSED_PROVIDERS, HOST_BOUND


def add_fractions(rows, ceil):
    """Adds the fraction of the measured copy bandwidth / matrix peak to fused rows."""
    for r in rows:
        # MFU: every provider does the model's FLOPs; only against a bf16 ceiling (the steps run under
        # bf16 autocast: the CPU's ceiling is fp32, which its bf16 matmuls exceed)
        if "ms" in r and r["op"] in E2E_OPS and r.get("tflops") and ceil.get("matmul_dtype") == "bf16":
            r["mfu"] = r["tflops"] / ceil["matmul_tflops"]
        # fused rows only: the other providers' work differs from the counted bytes / FLOPs. From the
        # device time where a CUDA graph measured it: the kernels' share of the ceiling, not the host's
        if "ms" in r and r["provider"] in FUSED_PROVIDERS and r["op"] not in E2E_OPS:
            r["frac_copy_bw"] = r.get("gbps_device", r["gbps"]) / ceil["copy_gbps"]
            tflops = r.get("tflops_device", r.get("tflops"))
            if tflops:
                r["frac_matmul_peak"] = tflops / ceil["matmul_tflops"]
    return rows


def speedups(rows):
    """Adds `speedup_vs_eager` / `speedup_vs_compile` to the fused and fused+compile rows."""
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["mode"])  # noqa: E731
    base = {(key(r), r["provider"]): r["ms"] for r in rows if "ms" in r}
    for r in rows:
        if r.get("provider") in FUSED_PROVIDERS and "ms" in r:
            for p in ("eager", "compile"):
                q = "compile-cg" if p == "compile" and r["provider"] in CG_PROVIDERS else p  # like against like
                if (key(r), q) in base:
                    r[f"speedup_vs_{p}"] = base[(key(r), q)] / r["ms"]
    return rows


def _formatted(key, fmt):
    """A cell: row[key] in format `fmt`, empty when the row has no `key`."""
    return lambda r: format(r[key], fmt) if key in r else ""


# `umae bench`'s printed table; a skipped or failed row shows its reason after the provider
TABLE = [Col("op", "op", width=16, align="<"), Col("shape", "shape", width=10, align="<"),
         Col("dtype", "dtype", width=8, align="<"), Col("mode", "mode", width=7, align="<"),
         Col("provider", "provider", width=13, align="<"), Col("ms", "ms", ".3f", 9),
         # CUDA: the kernels' time replayed from a CUDA graph, and whether the host's work dominates
         Col("device ms", lambda r: f"{r['ms_device']:.3f} {r['bound'][0]}" if "ms_device" in r else (
             "n/c" if "device_error" in r else ""), width=11),
         Col("GB/s", "gbps", ".1f", 8),
         Col("TFLOP/s", lambda r: "%.0f img/s" % r["img_per_s"] if "img_per_s" in r else (
             f"{r['tflops']:.2f}" if r.get("tflops") else "-"), width=8),
         Col("x eager", _formatted("speedup_vs_eager", ".2f"), width=8),
         Col("x compile", _formatted("speedup_vs_compile", ".2f"), width=9),
         Col("%copyBW", lambda r: f"{100 * r['frac_copy_bw']:.0f}%" if r.get("gbps") and "frac_copy_bw" in r else "",
             width=8),
         Col("%mmPeak", lambda r: f"{100 * r['frac_matmul_peak']:.0f}%" if "frac_matmul_peak" in r else (
             f"MFU {100 * r['mfu']:.0f}%" if "mfu" in r else ""), width=8),
         Col("parity", lambda r: f"{r['parity_max_abs']:.1e}" if r["provider"] == "fused" and r["op"] not in E2E_OPS
             else "", width=9),
         Col("peak MB", lambda r: f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "", width=9),
         # exact on any device (umae/bench/costs.py): ops dispatched, bytes kept for backward
         Col("aten calls", _formatted("aten_calls", "d"), width=10),
         Col("saved MB", lambda r: f"{r['saved_bytes'] / 2**20:.2f}" if r.get("saved_bytes") is not None else "",
             width=9)]


def format_table(rows) -> str:
    text = _format_table(rows, TABLE, note_after=5, note=lambda r: f"skipped: {r['skipped']}" if "skipped" in r else (
        f"ERROR {r['error']}" if "error" in r else None))
    if any("ms_device" in r or "device_error" in r for r in rows):
        text += ("\ndevice ms: one call replayed from a CUDA graph (no host work); h: host-bound (ms >= "
                 f"{HOST_BOUND} x device ms), d: device-bound; n/c: the call could not be captured (results.json "
                 "says why). %copyBW and %mmPeak are of the device time where there is one.")
    return text


def write_json(out_dir: str, name: str, data: dict) -> None:
    """`data` as out_dir/name (the host, profile and tune views' files), said on stdout."""
    os.makedirs(out_dir, exist_ok=True)
    files.write_json(os.path.join(out_dir, name), data)
    print(f"wrote {out_dir}/{name}")


def write(rows, env, out_dir, ceil=None):
    os.makedirs(out_dir, exist_ok=True)
    files.write_json(os.path.join(out_dir, "results.json"), dict(environment=env, ceilings=ceil, rows=rows))
    fields = sorted({k for r in rows for k in r})
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(env) + fields)
    w.writeheader()
    for r in rows:
        w.writerow({**env, **r})
    files.write_text(os.path.join(out_dir, "results.csv"), text.getvalue())


# ---- the tables from bench/results/<device>/<date>/results.json -----------------------

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"  # the full table (docs/benchmarks.md)
HEAD_START, HEAD_END = "<!-- perf-headline:start -->", "<!-- perf-headline:end -->"  # its headline (README.md)
HEADLINE_DTYPES = ("bfloat16", "bfloat16-autocast")
NO_RESULTS = ("No GPU results are recorded yet: `bash scripts/gpu_check.sh` on a GPU machine writes them; copied to "
              "`bench/results/<device>/<date>/`, and `umae report` regenerates this table from them.")


def read_results(path: str, what: str) -> dict:
    """A results.json `write` wrote; a ValueError naming `what` and the file otherwise."""
    d = files.read_json(path, what)
    if not (isinstance(d.get("rows"), list) and isinstance(d.get("environment"), dict)):
        raise ValueError(f"{what} {path!r} is not a umae bench results file (no 'rows' list and "
                         "'environment' object)")
    return d


def load(results_dir):
    if not os.path.isdir(results_dir):
        raise ValueError(f"--results {results_dir!r} is not a folder (bench/results/<device>/<date>/results.json)")
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*", "results.json"))):
        d = read_results(path, "--results'")
        env = d["environment"]
        if not isinstance(env.get("date"), str):  # the runs are ordered by it
            raise ValueError(f"--results' {path!r} is not a umae bench results file (its environment has no date)")
        if env.get("device_type") == "cuda":
            runs.append((path, d))
    return sorted(runs, key=lambda run: run[1]["environment"]["date"])  # oldest first


def measured(runs) -> dict:
    """(op, shape, dtype, mode) -> (run number, {provider: row}) over every recorded run; where two
    measured the same row, the newer run's wins. Only fwd+bwd and training-step rows whose fused
    provider has a time."""
    by = {}
    for i, (_path, d) in enumerate(runs, 1):
        runs_rows = {}
        for r in d["rows"]:
            if "ms" in r or "error" in r:
                runs_rows.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
        for k, p in runs_rows.items():
            by[k] = (i, p)
    return {k: v for k, v in by.items() if k[3] in ("fwd+bwd", "step") and "ms" in v[1].get("fused", {})}


def _cell(r) -> str:
    return "-" if r is None else (f"{r['ms']:.3f}" if "ms" in r else ("OOM" if "OutOfMemory" in r["error"] else "error"))


def _ratio(f, k) -> str:
    return f"{f[k]:.2f}" if k in f else "-"


def _roof(f) -> tuple[str, str, str]:
    """(GB/s or img/s, TFLOP/s, % of ceiling or MFU) of a fused row."""
    if "img_per_s" in f:
        return (f"{f['img_per_s']:.0f} img/s", f"{(f.get('tflops') or 0):.1f}",
                f"MFU {100 * f['mfu']:.0f}%" if "mfu" in f else "-")
    frac = f.get("frac_matmul_peak", f.get("frac_copy_bw"))
    if frac is None:
        return "-", "-", "-"
    return f"{f['gbps']:.0f}", f"{(f.get('tflops') or 0):.1f}", f"{100 * frac:.0f}%"


def table(runs) -> str:
    """The full table of `load`'s runs: every run with its environment, every fwd+bwd / step row."""
    if not runs:
        return NO_RESULTS
    lines = []
    for i, (path, d) in enumerate(runs, 1):
        env, ceil = d["environment"], d.get("ceilings") or {}
        lines.append(f"- run {i}: `{os.path.relpath(path)}`: {env['device']}, {env['date']}, torch {env['torch']}, "
                     f"triton {env['triton']}, commit {env['commit']}; measured ceilings: copy "
                     f"{ceil.get('copy_gbps', float('nan')):.0f} GB/s, bf16 matmul "
                     f"{ceil.get('matmul_tflops', float('nan')):.0f} TFLOP/s.")
    lines += ["", "Times in ms (an error, e.g. out of memory, says so). Training steps: img/s and MFU (FLOPs counted "
              "by torch's FlopCounterMode over the measured bf16 matmul peak); ops: GB/s of the bytes the op must "
              "move and the fraction of the measured copy bandwidth (or matmul peak). Peak memory: above the inputs.",
              "", "| run | op | shape | dtype | mode | fused | eager | compile | fused+compile | x eager | x compile "
              "| GB/s or img/s | TFLOP/s | % of ceiling | peak MB fused / eager |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mb = lambda r: f"{r['peak_mb']:.0f}" if r and r.get("peak_mb") is not None else "-"  # noqa: E731
    for (op, shape, dtype, mode), (run, p) in measured(runs).items():
        f = p["fused"]
        times = " | ".join(_cell(p.get(k)) for k in ("fused", "eager", "compile", "fused+compile"))
        lines.append(f"| {run} | {op} | {shape} | {dtype} | {mode} | {times} | {_ratio(f, 'speedup_vs_eager')} | "
                     f"{_ratio(f, 'speedup_vs_compile')} | {' | '.join(_roof(f))} | {mb(f)} / {mb(p.get('eager'))} |")
    return "\n".join(lines)


def headline(runs) -> str:
    """The README's rows of the full table of `load`'s runs: bf16 at ViT-B/16 and the uniformity
    loss at the largest batch measured, fewer columns, and a link to the rest."""
    if not runs:
        return NO_RESULTS
    rows = {k: v for k, v in measured(runs).items() if k[2] in HEADLINE_DTYPES}
    unif = [s for (_o, s, _d, _m) in rows if s.startswith("unif_b") and s[len("unif_b"):].isdigit()]
    shapes = {"vit_b16"} | ({max(unif, key=lambda s: int(s[len("unif_b"):]))} if unif else set())
    devices = ", ".join(sorted({d["environment"]["device"] for _path, d in runs}))
    lines = [f"{devices}, bf16 (training steps: bf16 autocast), forward + backward or one training step, the newest "
             "run of each row. Every row, run, commit and peak memory: "
             "[docs/benchmarks.md](docs/benchmarks.md#recorded-gpu-performance).", "",
             "| op | shape | fused ms | eager ms | compile ms | x eager | x compile | GB/s or img/s | % of ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (op, shape, _dtype, _mode), (_run, p) in rows.items():
        if shape not in shapes:
            continue
        f = p["fused"]
        rate, _tflops, frac = _roof(f)
        times = " | ".join(_cell(p.get(k)) for k in ("fused", "eager", "compile"))
        lines.append(f"| {op} | {shape} | {times} | {_ratio(f, 'speedup_vs_eager')} | "
                     f"{_ratio(f, 'speedup_vs_compile')} | {rate} | {frac} |")
    return "\n".join(lines)


def _replace(text: str, path: str, blocks: dict) -> str:
    """`text` with each (start, end) marker pair's content replaced; a ValueError if it has none."""
    found = False
    for (start, end), t in blocks.items():
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            text, found = head + start + "\n" + t + "\n" + end + tail, True
    if not found:
        raise ValueError(f"{path} has no {START} ... {END} or {HEAD_START} ... {HEAD_END} markers")
    return text


def update_readme(results_dir, readme, docs=None) -> str:
    """Regenerates the tables from `results_dir`: the full table between the perf-table markers and
    the headline between the perf-headline markers, in `readme` and in `docs` (default:
    docs/benchmarks.md beside `readme`, where that file exists). Every file must hold one pair at
    least; nothing is written unless all do. Returns the full table."""
    runs = load(results_dir)
    blocks = {(START, END): table(runs), (HEAD_START, HEAD_END): headline(runs)}
    if docs is None:
        docs = os.path.join(os.path.dirname(os.path.abspath(readme)), "docs", "benchmarks.md")
        paths = [readme] + ([docs] if os.path.isfile(docs) else [])
    else:
        paths = [readme, docs]
    new = {}
    for path in paths:
        new[path] = _replace(files.read_text(path, "--readme" if path == readme else "docs"), path, blocks)
    for path, text in new.items():
        files.write_text(path, text)
    return blocks[(START, END)]

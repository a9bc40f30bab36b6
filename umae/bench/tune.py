"""`umae bench tune`: the candidate tile configurations of a Triton op's kernels
(`CANDIDATES` in its kernel module: the default first), each timed on the GPU in one call at the
shapes where it matters, forward + backward, by device time (CUDA-graph replay) and with the host;
the winner per (shape, product) is reported and written to tune.json. The defaults are not
changed here: a winner becomes the default in a commit, after the sm_90 audit has passed it (the
compile check compiles every candidate: umae/verify/jit.py).
"""
from __future__ import annotations

import torch

from ..ops import registry
from .cases import case
from .report import write_json
from .timing import device_ms, mode_fn, provider_forward, time_ms

DTYPE = torch.bfloat16  # what the GPU trains in


def tuned():
    """The ops whose kernel module declares candidates (CANDIDATES) and the sizes to time them at
    (TUNE_AT: the similarity's and the Gram's, U-MAE's per-rank batch and a large one)."""
    return [op for op in registry.OPS.values() if getattr(op.kernels, "CANDIDATES", None)]


def runs(op):
    """(shape, product, group, index, config) of every candidate to time for `op` (an entry): per size,
    the groups of the product its launches use, each candidate with the other groups at their defaults."""
    k = op.kernels
    for B, D in k.TUNE_AT:
        product = "sim" if k.uses_similarity(B, D) else "gram"
        for group in k.PRODUCTS[product]:
            for i, cfg in enumerate(k.CANDIDATES[group]):
                yield dict(B=B, D=D), product, group, i, cfg


def tune(op, device: str) -> list[dict]:
    rows = []
    for shape, product, group, i, cfg in runs(op):
        torch.manual_seed(0)
        c = case(op.name, shape, DTYPE, device)
        with op.kernels.configured(**{group: cfg}):
            fn = mode_fn(provider_forward(c.forward, "fused"), c.grad_inputs, "fwd+bwd")
            ms = time_ms(fn, device)[0]
            dev, why = device_ms(fn) if device == "cuda" else (None, "no GPU")
        rows.append(dict(op=op.name, shape=f"B={shape['B']} D={shape['D']}", dtype=str(DTYPE).replace("torch.", ""),
                         product=product, group=group,
                         candidate=i, config=cfg, ms=ms, ms_device=dev, **({"device_error": why} if dev is None else {})))
    return rows


def winners(rows) -> dict:
    """{(shape, group): the row with the least device time (host-inclusive time where none)}."""
    best: dict = {}
    for r in rows:
        t = r["ms_device"] if r["ms_device"] is not None else r["ms"]
        key = (r["shape"], r["group"])
        if key not in best or t < best[key][0]:
            best[key] = (t, r)
    return {key: r for key, (_, r) in best.items()}


def format_rows(rows) -> str:
    win = {id(r) for r in winners(rows).values()}
    lines = ["| shape | product | group | candidate | config | ms | device ms | |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dev = f"{r['ms_device']:.4f}" if r["ms_device"] is not None else "-"
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"| {r['shape']} | {r['product']} | {r['group']} | {r['candidate']}{' (default)' if r['candidate'] == 0 else ''} "
                     f"| {cfg} | {r['ms']:.4f} | {dev} | {'winner' if id(r) in win else ''} |")
    return "\n".join(lines)


def main(device: str, out: str | None) -> int:
    if device != "cuda":
        print("umae bench tune: the candidates are Triton kernels, timed on a GPU only; on CPU the C++ kernels "
              "run (nothing to tune here)")
        return 0
    rows = [r for op in tuned() for r in tune(op, device)]
    print("Candidate tile configurations, fused fwd+bwd (umae/bench/tune.py); winner: least device time")
    print(format_rows(rows))
    if out:
        write_json(out, "tune.json", dict(rows=rows))
    return 0

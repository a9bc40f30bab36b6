"""`umae reproduce --preset hierarchical`: what MAE recovers of a known latent hierarchy, by mask
ratio and patch size (Kong et al. 2023), and what U-MAE's uniformity term changes ("How Mask
Matters", Zhang et al. 2022). MAE is trained on umae.data.hierarchical's images at each mask ratio and
patch size, and U-MAE at the paper's ratio, all from the same seed (same images, batches and
augmentation), over one or more seeds; every run's encoder is evaluated with `umae eval`'s code
(the linear recoverability of each latent level, the class probe, the effective rank). Writes
report.md, recovery.png and sweep.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from . import evaluate
from ..data.hierarchical import LEVEL_DIMS, LEVELS
from ..train import TrainConfig, train

# default: within 10 minutes on a 2-core CPU; full: for a GPU
SWEEPS = {
    "default": dict(ratios=(0.1, 0.25, 0.5, 0.75, 0.9), patches=(4, 8), umae_ratio=0.75, umae_lamb=0.1, steps=150,
                    batch_size=128, lr=1e-3, warmup_steps=15, builtin_size=4096, eval_images=1024, amp="none"),
    "full": dict(ratios=(0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85, 0.9), patches=(4, 8), umae_ratio=0.75, umae_lamb=0.1,
                 steps=5000, batch_size=256, lr=1e-3, warmup_steps=250, builtin_size=50000, eval_images=5000,
                 amp="auto"),
}


def arms(s: dict) -> list[dict]:
    """Every run of a sweep: MAE at each (patch size, mask ratio), U-MAE at (smallest patch, umae_ratio)."""
    out = [dict(patch=p, ratio=r, lamb=0.0) for p in s["patches"] for r in s["ratios"]]
    return out + [dict(patch=min(s["patches"]), ratio=s["umae_ratio"], lamb=s["umae_lamb"])]


def _config(a, s: dict, arm: dict, seed: int, out: str, desc: str) -> TrainConfig:
    return TrainConfig(data="hierarchical", model=f"{a.model}_patch{arm['patch']}_32", mask_ratio=arm["ratio"],
                       lamb=arm["lamb"], seed=seed, out=out, steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                       warmup_steps=s["warmup_steps"], builtin_size=s["builtin_size"], amp=s["amp"], device=a.device,
                       log_every=max(1, s["steps"] // 10), no_progress=a.no_progress, progress_desc=desc,
                       overwrite=a.overwrite, num_workers=getattr(a, "num_workers", None))


def run(a) -> dict:
    """Trains and evaluates every arm over `a.seeds` seeds; writes the report. `a`: reproduce's flags."""
    s = dict(SWEEPS["full" if a.full else "default"])
    if a.steps is not None:
        s["steps"] = a.steps
    os.makedirs(a.out, exist_ok=True)
    t0, rows = time.perf_counter(), []
    seeds = range(a.seed, a.seed + a.seeds)
    rows += [r for seed in seeds for r in untrained(a, s, seed)]  # what the architecture gives before training
    todo = [(arm, seed) for seed in seeds for arm in arms(s)]
    for i, (arm, seed) in enumerate(todo):
        name = f"{'U-MAE' if arm['lamb'] else 'MAE'}_p{arm['patch']}_r{arm['ratio']:g}_s{seed}"
        out = os.path.join(a.out, name)
        print(f"umae reproduce --preset hierarchical: [{i + 1}/{len(todo)}] {name}", flush=True)
        train(_config(a, s, arm, seed, out, f"[{i + 1}/{len(todo)}] {name}"))
        ev = argparse.Namespace(ckpt=[os.path.join(out, "checkpoint-last.pt")], data=None, model=None, pool="both",
                                holdout=0.2, knn_k=20, max_images=s["eval_images"], batch_size=256,
                                out=os.path.join(out, "eval"), device=a.device)
        for r in evaluate.evaluate(ev)["results"]:
            rows.append(dict(arm, seed=seed, pool=r["pool"], effective_rank=r["effective_rank"],
                             **{k: v for k, v in r["latent_recovery"].items() if k != "true_dims"}))
    settings = dict(s, model=a.model, seeds=list(range(a.seed, a.seed + a.seeds)),
                    minutes=round((time.perf_counter() - t0) / 60, 1))
    summary = summarize(rows)
    with open(os.path.join(a.out, "sweep.json"), "w") as f:
        json.dump(dict(settings=settings, rows=rows, summary=summary), f, indent=1)
    plot(summary, os.path.join(a.out, "recovery.png"))
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(report_md(summary, settings))
    print(open(os.path.join(a.out, "report.md")).read())
    return dict(rows=rows, summary=summary, settings=settings)


def untrained(a, s: dict, seed: int) -> list[dict]:
    """The same evaluation of each patch size's encoder at its initialization (seeded as the runs'):
    the reference a trained run's recovery is read against (random features recover some of it)."""
    import timm
    import torch

    from .. import data as D

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tr, te = (D.open_dataset("hierarchical", t, seed, s["builtin_size"]) for t in (True, False))
    out = []
    for patch in s["patches"]:
        torch.manual_seed(seed)
        model = timm.create_model(f"{a.model}_patch{patch}_32").to(device).eval()
        for pool in ("cls", "mean"):
            (xtr, ytr), (xte, yte) = (evaluate.extract(model, ds, pool, 256, device, s["eval_images"]) for ds in (tr, te))
            rec = evaluate._latent_recovery(tr, te, xtr, ytr, xte, yte)["latent_recovery"]
            out.append(dict(patch=patch, ratio=0.0, lamb=-1.0, seed=seed, pool=pool,
                            effective_rank=evaluate.spectrum(xtr)[1],
                            **{k: v for k, v in rec.items() if k != "true_dims"}))
    return out


METRICS = ("r2_top", "r2_mid", "r2_low", "class_acc", "effective_rank")


def _name(r) -> str:
    return "untrained" if r["lamb"] < 0 else (f"U-MAE {r['lamb']:g}" if r["lamb"] else "MAE")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread (sample standard deviation; 0 for one seed) over seeds, per (arm, pool)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["patch"], r["ratio"], r["lamb"], r["pool"]), []).append(r)
    out = []
    for (patch, ratio, lamb, pool), rs in sorted(groups.items()):
        row = dict(patch=patch, ratio=ratio, lamb=lamb, pool=pool, n=len(rs))
        for m in METRICS:
            v = [r[m] for r in rs]
            row[m], row[m + "_sd"] = statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
        out.append(row)
    return out


def report_md(summary: list[dict], settings: dict) -> str:
    lines = ["# umae reproduce --preset hierarchical", "",
             "Linear recoverability of each latent level of umae.data.hierarchical's images from the frozen encoder "
             "(held-out ridge R^2, averaged over the level's dimensions; the class by the linear probe), and the "
             f"features' effective rank ({evaluate.SPECTRUM}). True latent dimensions: "
             + ", ".join(f"{lv} {LEVEL_DIMS[lv]}" for lv in LEVELS) + " (top: plus the class of 10). "
             "Mean (sd) over the seeds. 'untrained': the same encoder at its initialization.", "",
             "| run | patch | mask ratio | features | R^2 top | R^2 mid | R^2 low | class acc | effective rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        cells = " | ".join(f"{r[m]:.3f} ({r[m + '_sd']:.3f})" if m != "effective_rank" else
                           f"{r[m]:.1f} ({r[m + '_sd']:.1f})" for m in METRICS)
        ratio = "-" if r["lamb"] < 0 else f"{r['ratio']:g}"
        lines.append(f"| {_name(r)} | {r['patch']} | {ratio} | {r['pool']} | {cells} |")
    lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), "",
              "Files: recovery.png (R^2 per level and effective rank against the mask ratio, one line per patch "
              "size; U-MAE as a star), sweep.json (every run and seed), <run>/ (checkpoints, log.jsonl, eval/).", ""]
    return "\n".join(lines)


def plot(summary: list[dict], path: str, pool: str = "cls") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(18, 3.4))
    rows = [r for r in summary if r["pool"] == pool]
    for ax, m in zip(axes, METRICS):
        for patch in sorted({r["patch"] for r in rows}):
            pts = sorted((r["ratio"], r[m], r[m + "_sd"]) for r in rows if r["patch"] == patch and not r["lamb"])
            line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                               capsize=2, label=f"MAE, patch {patch}")
            for r in (r for r in rows if r["patch"] == patch and r["lamb"] < 0):
                ax.axhline(r[m], ls="--", lw=1, color=line[0].get_color(), label=f"untrained, patch {patch}")
        for r in (r for r in rows if r["lamb"] > 0):
            ax.plot(r["ratio"], r[m], "*", markersize=12, label=f"U-MAE {r['lamb']:g}, patch {r['patch']}")
        ax.set_title(m.replace("r2_", "R^2 ") + f" ({pool})")
        ax.set_xlabel("mask ratio")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

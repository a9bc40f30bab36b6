"""`umae reproduce`: U-MAE's effect in one command. MAE (lambda 0) and U-MAE (each lambda > 0)
are trained from the same seed on the same data, batches and masks, evaluated with `umae eval`'s
code (linear probe and kNN on cls and mean-pooled features, effective rank, spectrum), and written
to one folder: report.md, spectrum.png, curves.png (loss_mae, loss_unif and the effective rank of
the cls features over training), eval.json and each run's checkpoints and log."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .. import data as D
from ..data import video as V
from ..models import VIDEO_CONFIGS, is_video
from . import evaluate, sweep
from ..train import TrainConfig, train

HELP = "U-MAE's effect in one command: MAE vs U-MAE trained and evaluated alike, one report folder"

# name -> settings. "digits-mini" is measured on the 2-core CPU machine (docs/training.md, "Reproduce");
# "cifar10-vit-tiny" is for a GPU with CIFAR-10 on disk (--data /path/to/cifar10).
PRESETS = {
    # lr 1e-3 with 30 warmup steps: the best probe and rank of docs/training.md's recipe table
    "digits-mini": dict(data="digits", model="umae_vit_mini_patch4_32", steps=300, epochs=None, batch_size=128,
                        lr=1e-3, blr=None, warmup_steps=30, warmup_epochs=None, amp="none", curve_points=10),
    # U-MAE's published recipe is its ImageNet script (zhangq327/U-MAE pretrain.sh: blr 1.5e-4,
    # weight decay 0.05, norm_pix_loss, mask 0.75, 40 of 200 epochs warmup); this preset applies
    # it to CIFAR-10 ViT-Tiny at 32x32 with patch 4 and the paper's longer CIFAR schedule
    "cifar10-vit-tiny": dict(data=None, model="umae_vit_tiny_patch4_32", steps=None, epochs=2000, batch_size=512,
                             lr=None, blr=1.5e-4, warmup_steps=None, warmup_epochs=200, amp="bf16", curve_points=20),
    # VideoMAE's tube masking (0.9) on the generated motion clips, the micro video model: about 5
    # minutes on the 2-core CPU for the three default lambdas (docs/training.md, "Video")
    "video": dict(data="video-builtin", model="umae_videomae_micro_patch4_32", steps=1500, epochs=None, batch_size=64,
                  lr=1e-3, blr=None, warmup_steps=75, warmup_epochs=None, amp="none", curve_points=5,
                  builtin_size=2048),
}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted([*PRESETS, "hierarchical"]), default="digits-mini",
                   help="hierarchical: MAE over mask ratios and patch sizes and U-MAE on umae.data.hierarchical's images, "
                        "each latent level's recovery measured (umae/research/sweep.py)")
    p.add_argument("--full", action="store_true", help="--preset hierarchical: the GPU-sized sweep")
    p.add_argument("--seeds", type=int, default=1, help="run every arm over this many seeds (from --seed); the "
                   "report gives the mean and spread")
    p.add_argument("--data", default=None, help="default: the preset's ('digits' ships offline)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.01, 0.1],
                   help="uniformity weights; 0 is plain MAE")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--model", default=None, help="default: the preset's (hierarchical: the family, umae_vit_mini)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=2000, help="cap per split for the evaluations")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--device", default=None)
    p.add_argument("--num-workers", type=int, default=None,
                   help="loader processes of each run (default: umae train's, the machine's cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs (log.jsonl, checkpoints) a previous reproduce left in --out's lamb_* "
                        "folders (default: refused)")


def _train_config(a, preset: dict, lamb: float, out: str, ckpt_every: int, steps: int, desc: str,
                  seed: int | None = None) -> TrainConfig:
    """One run's training settings: the preset's, these flags', and umae train's defaults for the rest."""
    seed = a.seed if seed is None else seed
    return TrainConfig(data=a.data, model=a.model, lamb=lamb, seed=seed, out=out, batch_size=a.batch_size,
                       builtin_size=preset.get("builtin_size", D.BUILTIN_SIZE),
                       steps=steps, amp=preset["amp"], device=a.device, lr=preset["lr"],
                       blr=TrainConfig.blr if preset["blr"] is None else preset["blr"], warmup_steps=a.warmup_steps,
                       ckpt_every=ckpt_every, log_every=max(1, min(10, steps // 10)), no_progress=a.no_progress,
                       progress_desc=desc, overwrite=getattr(a, "overwrite", False),
                       num_workers=getattr(a, "num_workers", None))


def _steps_and_warmup(a, preset: dict) -> tuple[int, int | None]:
    if a.steps is not None:  # the preset's warmup, as the same share of the steps
        w = preset["warmup_steps"]
        return a.steps, (round(w * a.steps / preset["steps"]) if w and preset["steps"] else w)
    if preset["steps"]:
        return preset["steps"], preset["warmup_steps"]
    per_epoch = len(D.open_dataset(a.data, True)) // a.batch_size
    return preset["epochs"] * per_epoch, preset["warmup_epochs"] * per_epoch


def _rank_curve(run_dir: str, ds, a, known: dict) -> list[tuple[int, float]]:
    """(step, effective rank of the features of `ds`: cls, a video model's mean) at each saved
    checkpoint; `known`: {step: rank} already measured (the last checkpoint, by the evaluation)."""
    points = list(known.items())
    for f in os.listdir(run_dir):
        n = f[len("checkpoint-"):-len(".pt")]
        if f.startswith("checkpoint-") and n.isdigit() and int(n) not in known:
            model, run, step = evaluate.load_model(os.path.join(run_dir, f), a.device_obj)
            x, _ = evaluate.extract(model, ds, a.pool, 256, a.device_obj, a.eval_images, run["sampling_rate"])
            points.append((step, evaluate.spectrum(x)[1]))
    return sorted(points)


def _train_set(a, preset: dict, seed: int, cache: dict):
    """The data a run of `seed` trained on, made once: a video model's generated clips depend on the seed,
    the image presets' data sets do not."""
    video = is_video(a.model)
    key = seed if video else None
    if key not in cache:
        if video:
            frames = V.builtin_frames(VIDEO_CONFIGS[a.model][2], TrainConfig.sampling_rate)
            cache[key] = V.open_video(a.data, True, seed, preset.get("builtin_size", D.BUILTIN_SIZE), frames)
        else:
            cache[key] = D.open_dataset(a.data, True)
    return cache[key]


def validate(a) -> None:
    from ..train.config import check_at_most, check_out, check_range, check_seed, parse_device

    check_range(a, ("steps", "batch_size"), 1, optional=True)  # None: the preset's
    check_range(a, ("seeds",), 1)
    check_range(a, ("eval_images",), 2)  # eval's --max-images
    check_seed(a.seed)
    if a.model is not None:
        from ..models import check_name

        check_name(a.model)
        if a.preset != "hierarchical" and is_video(a.model) != (a.preset == "video"):
            raise ValueError(f"--model {a.model} is {'a video' if is_video(a.model) else 'an image'} model; --preset "
                             f"{a.preset} trains {'video' if a.preset == 'video' else 'image'} models")
    if a.data is not None:
        if a.preset == "video":
            from ..train.config import check_data_kind

            check_data_kind(a.data, a.model or PRESETS["video"]["model"])
        else:
            D.check_folder(a.data)
    bad = [v for v in a.lambdas if not 0 <= v < float("inf")]
    if bad:
        raise ValueError(f"--lambdas must be finite and >= 0, got {bad[0]}")
    check_at_most("--lambdas", a.lambdas)  # train's --lamb
    named: dict = {}  # run folders and report rows name a lambda by 6 significant digits
    for v in a.lambdas:
        if f"{v:g}" in named:
            raise ValueError(f"--lambdas {named[f'{v:g}']!r} and {v!r} are the same run (lamb_{v:g}): give values "
                             "distinct to 6 significant digits")
        named[f"{v:g}"] = v
    parse_device(a.device)
    check_out(a.out)  # before the runs whose report goes there
    if not getattr(a, "overwrite", False):  # before any run: a later lambda's old run would stop it midway
        from ..train.main import _held

        for lamb, seed in _runs(a):
            run_dir = _run_dir(a, lamb, seed)
            if _held(run_dir):
                raise ValueError(f"--out {a.out!r} holds a previous reproduce's runs ({run_dir}: "
                                 f"{', '.join(_held(run_dir)[:3])}); pass --overwrite to replace them, or "
                                 "choose another --out")


def _runs(a) -> list[tuple[float, int]]:
    """(lambda, seed) of every run: each lambda over --seeds seeds from --seed."""
    return [(lamb, seed) for lamb in a.lambdas for seed in range(a.seed, a.seed + a.seeds)]


def _run_dir(a, lamb: float, seed: int) -> str:
    return os.path.join(a.out, f"lamb_{lamb:g}" + (f"_seed{seed}" if a.seeds > 1 else ""))


def reproduce(a) -> dict:
    """`umae reproduce`'s run from its parsed flags (`a` is not changed: the preset's values fill a copy)."""
    validate(a)
    a = argparse.Namespace(**vars(a))
    if a.preset == "hierarchical":
        a.model = a.model or ("umae_vit_tiny" if a.full else "umae_vit_mini")
        return sweep.run(a)
    preset = PRESETS[a.preset]
    a.data = a.data or preset["data"]
    if a.data is None:
        raise ValueError(f"--preset {a.preset} needs --data (a CIFAR-10 folder in torchvision's format)")
    a.model = a.model or preset["model"]
    a.batch_size = a.batch_size if a.batch_size is not None else preset["batch_size"]
    a.device_obj = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps, a.warmup_steps = _steps_and_warmup(a, preset)
    ckpt_every = max(1, steps // preset["curve_points"])
    os.makedirs(a.out, exist_ok=True)

    t0 = time.perf_counter()
    runs, logs, seeds = {}, {}, {}
    todo = _runs(a)
    for i, (lamb, seed) in enumerate(todo):
        name = ("MAE" if lamb == 0 else f"U-MAE (lambda {lamb:g})") + (f", seed {seed}" if a.seeds > 1 else "")
        run_dir = _run_dir(a, lamb, seed)
        print(f"umae reproduce: training {name}, {steps} steps -> {run_dir}", flush=True)
        logs[name] = train(_train_config(a, preset, lamb, run_dir, ckpt_every, steps, f"[{i + 1}/{len(todo)}] {name}",
                                         seed))
        runs[name], seeds[name] = run_dir, seed

    # the same evaluation code as `umae eval`, on every run's last checkpoint
    ev = argparse.Namespace(ckpt=[os.path.join(d, "checkpoint-last.pt") for d in runs.values()], data=a.data,
                            model=None, pool="both", holdout=0.2, knn_k=20, max_images=a.eval_images, batch_size=256,
                            out=a.out, device=str(a.device_obj))
    print(f"umae reproduce: evaluating {len(runs)} runs, then the effective rank at each checkpoint", flush=True)
    results = evaluate.evaluate(ev)["results"]
    by_ckpt = {os.path.join(d, "checkpoint-last.pt"): name for name, d in runs.items()}
    for r in results:
        r["run"] = by_ckpt[r["ckpt"]]
        r["seed"] = seeds[r["run"]]
    a.pool = "mean" if is_video(a.model) else "cls"
    last = {r["run"]: {r["step"]: r["effective_rank"]} for r in results if r["pool"] == a.pool}
    sets: dict = {}  # the training images (clips) of each seed, as eval's spectrum
    curves = {name: dict(log=logs[name], rank=_rank_curve(d, _train_set(a, preset, seeds[name], sets), a, last[name]))
              for name, d in runs.items()}
    minutes = (time.perf_counter() - t0) / 60
    settings = dict(preset=a.preset, data=a.data, model=a.model, steps=steps, batch_size=a.batch_size,
                    lr=preset["lr"], blr=preset["blr"], warmup_steps=a.warmup_steps, seed=a.seed, seeds=a.seeds,
                    lambdas=a.lambdas,
                    device=str(a.device_obj), minutes=round(minutes, 1))
    plot_curves(curves, os.path.join(a.out, "curves.png"), a.pool)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(report_md(results, settings))
    with open(os.path.join(a.out, "curves.json"), "w") as f:
        json.dump({k: dict(log=v["log"], rank=v["rank"]) for k, v in curves.items()}, f, indent=1)
    print(open(os.path.join(a.out, "report.md")).read())
    return dict(results=results, settings=settings, curves=curves)


def main(args) -> int:
    """`umae reproduce`."""
    reproduce(args)
    files = "recovery.png, sweep.json" if args.preset == "hierarchical" else "spectrum.png, curves.png"
    print(f"wrote {args.out}/report.md, {files}")
    return 0


def report_md(results, settings) -> str:
    lines = ["# umae reproduce: MAE vs U-MAE", "",
             "Same seed, data, batches and masks for every run; evaluated with `umae eval`'s code "
             "(linear probe: L-BFGS logistic regression on standardized frozen features; kNN k=20). "
             f"Effective rank: {evaluate.SPECTRUM}; (cov): {evaluate.SPECTRUM_COV}.", "",
             "| run | features | effective rank | (cov) | linear probe | kNN |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['pool']} | {r['effective_rank']:.1f} | {r['effective_rank_cov']:.1f} | "
                     f"{r['linear_probe_acc']:.3f} | {r['knn_acc']:.3f} |")
    lines += _over_seeds(results)
    lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), "",
              "Files: spectrum.png (singular value spectra of the features), curves.png (loss_mae, loss_unif, effective "
              "rank of the cls features, a video model's mean feature, over training), eval.json, curves.json, lamb_*/ (checkpoints, log.jsonl).", ""]
    return "\n".join(lines)


def _over_seeds(results) -> list[str]:
    """With several seeds: each lambda's mean (sample sd) over them, to tell an effect from the seed's noise."""
    import statistics

    groups: dict = {}
    for r in results:
        groups.setdefault((r["lamb"], r["pool"]), []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return []
    lines = ["", f"Over {len(next(iter(groups.values())))} seeds, mean (sd):", "",
             "| lambda | features | effective rank | linear probe | kNN |", "|---|---|---|---|---|"]
    for (lamb, pool), g in sorted(groups.items()):
        cells = []
        for key, fmt in (("effective_rank", ".1f"), ("linear_probe_acc", ".3f"), ("knn_acc", ".3f")):
            v = [r[key] for r in g]
            cells.append(f"{statistics.fmean(v):{fmt}} ({statistics.stdev(v):{fmt}})")
        lines.append(f"| {lamb:g} | {pool} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(curves, path, pool: str = "cls") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, c in curves.items():
        steps = [r["step"] for r in c["log"]]
        axes[0].plot(steps, [r["loss_mae"] for r in c["log"]], label=name)
        axes[1].plot(steps, [r["loss_unif"] for r in c["log"]], label=name)
        axes[2].plot(*zip(*c["rank"]), marker="o", label=name) if c["rank"] else None
    for ax, title in zip(axes, ("loss_mae", "loss_unif", f"effective rank ({pool})")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

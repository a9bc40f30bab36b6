"""`umae eval`: linear probe and kNN accuracy on frozen encoder features, and the
dimensional-collapse view of U-MAE (singular value spectrum of the centered features and its
effective rank), as numbers and as a PNG comparing runs."""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

from .. import data as D
from ..data import video as V
from .._files import check_finite_weights, check_recorded_config, load_weights, read_checkpoint, write_json

HELP = "linear probe, kNN and the feature spectrum of checkpoints"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", nargs="+", required=True, help="one or more checkpoints (compare runs)")
    p.add_argument("--data", default=None, help="default: the data set the checkpoint was trained on")
    p.add_argument("--model", default=None, help="the umae model of a checkpoint that does not record one (a "
                   "facebookresearch/mae checkpoint, e.g. mae_pretrain_vit_base.pth: umae_vit_base_patch16_224)")
    p.add_argument("--pool", choices=["cls", "mean", "both"], default="both")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction for ImageFolder data")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--max-images", type=int, default=10000, help="cap per split, for speed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--device", default=None)


@torch.no_grad()
def extract(model, ds, pool, batch_size, device, max_images, sampling_rate: int = 4):
    """(features, labels) of the first max_images samples, without augmentation; a video model's clips
    are the middle window of its frames at `sampling_rate`."""
    n = min(len(ds), max_images)
    sub = torch.utils.data.Subset(ds, list(range(n)))
    if hasattr(model, "num_frames"):
        aug = V.VideoAugmented(sub, model.img_size, model.num_frames, sampling_rate, seed=0, train=False)
    else:
        aug = D.Augmented(sub, model.img_size, seed=0, train=False)
    feats, labels = [], []
    for x, *_, y in torch.utils.data.DataLoader(aug, batch_size=batch_size):
        feats.append(model.features(x.to(device), pool).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(xtr, ytr, xte, yte, epochs=100, wd=1e-4):
    """Full-batch L-BFGS logistic regression on standardized features; test accuracy."""
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    head = torch.nn.Linear(xtr.shape[1], int(max(ytr.max(), yte.max())) + 1)
    for t in head.parameters():  # zeros (the problem is convex): the same accuracy on every call
        torch.nn.init.zeros_(t)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=epochs, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(xtr), ytr) + wd * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(xte).argmax(1) == yte).float().mean())


def knn_accuracy(xtr, ytr, xte, yte, k=20, t=0.07):
    """Weighted cosine kNN (as in DINO's evaluation), chunked: no test x train matrix in full."""
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    k = min(k, len(xtr))
    ncls = int(max(ytr.max(), yte.max())) + 1
    correct = 0
    for i in range(0, len(xte), 1024):
        sim, idx = (xte[i:i + 1024] @ xtr.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), ncls).scatter_add_(1, ytr[idx], (sim / t).exp())
        correct += int((votes.argmax(1) == yte[i:i + 1024]).sum())
    return correct / len(xte)


SPECTRUM = ("singular values of the centered feature matrix (n x d); effective rank = exp of the entropy of "
            "their normalized distribution (Roy & Vetterli 2007)")
SPECTRUM_COV = "the same over the feature covariance's eigenvalues (the squared singular values / (n - 1))"


def _erank(v):
    p = v / v.sum().clamp_min(1e-30)
    return float((-(p * p.clamp_min(1e-30).log()).sum()).exp())


def spectrum(x):
    """Singular values of the centered features (descending), their effective rank and the
    covariance eigenvalues' effective rank. The covariance's squares the singular values, so it
    weighs the leading directions more and reads lower on the same features (both are
    reported; `effective_rank` is over the features' own singular values)."""
    x = x.double() - x.double().mean(0)
    s = torch.linalg.svdvals(x)
    return s.float(), _erank(s), _erank(s.square())


# a run record's entries eval reads, with their types, and the defaults of those it may lack
_RUN = dict(model=str, lamb=(int, float), fused=bool, data=(str, type(None)), seed=int, builtin_size=int,
            probe_classes=int, cls_double_norm=bool, sampling_rate=int)
_RUN_DEFAULTS = dict(lamb=0.0, fused=False, data=None, seed=0, probe_classes=0, cls_double_norm=True, sampling_rate=4)


def _run_record(ck: dict, path: str, model_name) -> dict:
    """The checkpoint's run record (MAE's checkpoints have none: `model_name`'s defaults), its
    entries checked; a ValueError naming --ckpt for one that is malformed. A file that records its
    architecture ("config": `umae convert` writes it) needs no model name."""
    run = ck.get("run")
    if run is None and model_name is None and isinstance(ck.get("config"), dict):
        run = dict(model="its recorded config")
    if run is None and model_name is None:
        raise ValueError(f"--ckpt {path!r} records no model (a facebookresearch/mae checkpoint?): pass --model, "
                         "e.g. --model umae_vit_base_patch16_224, and --data")
    if not isinstance(run, (dict, type(None))):
        raise ValueError(f"--ckpt {path!r}: its run record is a {type(run).__name__}, not a dict")
    out = {**_RUN_DEFAULTS, **(run or {})}
    if model_name is not None:
        out["model"] = model_name
    if "model" not in out:
        raise ValueError(f"--ckpt {path!r}: its run record names no model: pass --model")
    for k, types in _RUN.items():
        v = out.get(k)
        if k in out and (not isinstance(v, types) or (isinstance(v, bool) and types is not bool)
                         or (k == "lamb" and not math.isfinite(v))):
            raise ValueError(f"--ckpt {path!r}: its run record is malformed: {k!r} is {v!r}")
    return out


def load_model(path, device, model_name=None):
    """(model, run record, step) of a `umae train` checkpoint, or of a facebookresearch/mae one
    ({"model": state_dict}, no run record: `model_name` says which umae model it fits)."""
    import timm

    from ..models import MaskedAutoencoderViT, VideoMaskedAutoencoderViT, check_name, is_video

    ck = read_checkpoint(path, "--ckpt")
    run = _run_record(ck, path, model_name)
    config = ck.get("config")
    video = is_video(run["model"]) or (isinstance(config, dict) and "num_frames" in config)
    kw = dict(fused=False, lamb=run["lamb"]) if video else dict(
        fused=False, lamb=run["lamb"], probe_classes=run.get("probe_classes", 0),
        cls_double_norm=run.get("cls_double_norm", True))
    if model_name is None and isinstance(config, dict):  # the architecture as recorded (a converted model's eps)
        if ck.get("run") is not None:  # a run record names its model: a name umae knows, or a damaged record
            check_name(run["model"], f"--ckpt {path!r}'s recorded model")
        try:
            model = (VideoMaskedAutoencoderViT if video else MaskedAutoencoderViT).from_config(config, **kw)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"--ckpt {path!r}: its recorded config does not make a model: {e}") from None
    else:
        check_name(run["model"], "--model" if model_name else f"--ckpt {path!r}'s recorded model")
        model = timm.create_model(run["model"], **kw)
        check_recorded_config(model, ck, path, "--ckpt", f"--model {model_name}" if model_name else run["model"])
    # a train checkpoint's "model" entry, or MAE's (encoder-only loads with a warning)
    load_weights(model, ck, path, "--ckpt")
    check_finite_weights(model, path, "--ckpt")
    return model.to(device).eval(), run, ck.get("step")


def validate(args) -> None:
    from ..train.config import check_out, check_range, parse_device

    check_range(args, ("knn_k", "batch_size"), 1)
    check_range(args, ("max_images",), 2)  # the probes standardize by the features' spread: two images at least
    if args.model is not None:
        from ..models import check_name

        check_name(args.model)
    if not 0 < args.holdout < 1:
        raise ValueError(f"--holdout must be in (0, 1), got {args.holdout}")
    parse_device(args.device)
    for path in args.ckpt:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--ckpt {path!r}: no such checkpoint")
    check_out(args.out)  # last: it creates the folder


def evaluate(args) -> dict:
    validate(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results, spectra = [], {}
    for path in args.ckpt:
        model, run, step = load_model(path, device, args.model)
        video = hasattr(model, "num_frames")
        if video and args.pool == "cls":
            raise ValueError(f"--pool cls: --ckpt {path!r} is a video model, which has no cls token; its feature is "
                             "the mean token (--pool mean)")
        pools = ["mean"] if video else ["cls", "mean"] if args.pool == "both" else [args.pool]
        data = args.data or run["data"]
        if video:
            data = data or V.VIDEO_BUILTIN
            if data != V.VIDEO_BUILTIN and not os.path.isfile(data):
                said = "--data" if args.data else f"the data its run recorded,"
                raise ValueError(f"{said} {data!r}: --ckpt {path!r} is a video model; its data is {V.VIDEO_BUILTIN!r} "
                                 "or a list of video files ('path label' per line)")
            size = run.get("builtin_size", D.BUILTIN_SIZE)
            frames = V.builtin_frames(model.num_frames, run["sampling_rate"])
            tr = V.open_video(data, True, run["seed"], size, frames)
            tr, te = (tr, V.open_video(data, False, run["seed"], size, frames)) if data == V.VIDEO_BUILTIN \
                else D.split(tr, args.holdout)
        elif data in (None, "builtin", "hierarchical"):
            tr = D.open_dataset(data or "builtin", True, run["seed"], run.get("builtin_size", D.BUILTIN_SIZE))
            te = D.open_dataset(data or "builtin", False, run["seed"], run.get("builtin_size", D.BUILTIN_SIZE))
        elif data == "digits":  # its own fixed test split
            tr, te = D.open_dataset(data, True), D.open_dataset(data, False)
        else:
            tr = D.open_dataset(data, True)
            if type(tr.ds).__name__ == "ImageFolder":  # no test split of its own: hold part out
                tr, te = D.split(tr, args.holdout)
            else:
                te = D.open_dataset(data, False)
        run_name = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"
        for pool in pools:
            xtr, ytr = extract(model, tr, pool, args.batch_size, device, args.max_images, run["sampling_rate"])
            xte, yte = extract(model, te, pool, args.batch_size, device, args.max_images, run["sampling_rate"])
            s, erank, erank_cov = spectrum(xtr)
            name = f"{run_name} ({pool})"
            spectra[name] = s
            results.append(dict(name=name, ckpt=path, step=step, model=run["model"], lamb=run["lamb"], fused=run["fused"],
                                mask_ratio=run.get("mask_ratio"), pool=pool,
                                linear_probe_acc=linear_probe(xtr, ytr, xte, yte),
                                knn_acc=knn_accuracy(xtr, ytr, xte, yte, args.knn_k), effective_rank=erank,
                                effective_rank_cov=erank_cov, feature_dim=xtr.shape[1], n_train=len(xtr),
                                n_test=len(xte), **_latent_recovery(tr, te, xtr, ytr, xte, yte)))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "eval.json"), dict(effective_rank=SPECTRUM, effective_rank_cov=SPECTRUM_COV,
                                                         results=results,
                                                         spectra={k: v.tolist() for k, v in spectra.items()}))
    plot_spectra(spectra, {r["name"]: r["effective_rank"] for r in results}, os.path.join(args.out, "spectrum.png"))
    return dict(results=results)


def _latent_recovery(tr, te, xtr, ytr, xte, yte) -> dict:
    """For a data set with known latents (umae.data.hierarchical): how linearly the features recover each
    level (held-out ridge R^2; the class by the linear probe), beside each level's true dimension."""
    if not hasattr(tr, "latents"):
        return {}
    from ..data.hierarchical import recovery

    cut = lambda ds, n: {k: v[:n] for k, v in ds.latents.items()}  # noqa: E731  (extract's first n images)
    rec = recovery(xtr, ytr, cut(tr, len(xtr)), xte, yte, cut(te, len(xte)), linear_probe)
    return dict(latent_recovery=rec)


def main(args) -> int:
    """`umae eval`."""
    res = evaluate(args)
    for r in res["results"]:
        print(f"{r['ckpt']} [{r['pool']}]  linear probe {r['linear_probe_acc']:.3f}  kNN {r['knn_acc']:.3f}  "
              f"effective rank {r['effective_rank']:.1f} / {r['feature_dim']}")
        if "latent_recovery" in r:
            rec = r["latent_recovery"]
            print("    latent recovery (held-out ridge R^2): " + "  ".join(
                f"{lv} {rec['r2_' + lv]:.3f} (dim {rec['true_dims'][lv]})" for lv in ("top", "mid", "low"))
                + f"  class {rec['class_acc']:.3f}")
    print(f"wrote {args.out}/eval.json and {args.out}/spectrum.png")
    return 0


def plot_spectra(spectra, eranks, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in spectra.items():
        ax.semilogy((s / s.sum()).clamp_min(1e-12).numpy(), label=f"{name}: eff. rank {eranks[name]:.1f}")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("normalized singular value (log)")
    ax.set_title("Singular values of the centered features (dimensional collapse)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

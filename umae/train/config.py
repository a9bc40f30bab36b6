"""`TrainConfig`: every setting of a training run, typed, with its default and its help. The CLI's
flags are generated from it (`add_args`), `TrainConfig.from_args` turns parsed flags into one,
and code (`umae reproduce`, the tests) builds one directly: `TrainConfig(model=..., out=..., steps=...)`.
`validate(cfg)` is the one place a run's settings are checked."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

from ..data import BUILTIN_SIZE

# what a resumed run must share with its checkpoint (the model's structure and the optimizer's groups)
RESUME_KEYS = ("model", "probe_classes", "decay_tokens")
# what it must share unless --resume-override names it: a change makes the run another experiment
# (batch_size, accum_iter, world_size: the data position continues at micro step = step * accum_iter
# over the new batches per epoch, and the global batch sets --blr's lr: a change is a shift of both).
# A resume in another number of processes with the same batch per micro step across them
# (batch_size x processes) and accum_iter changes none of that: it needs no override, with
# exact_ddp_grad (without it U-MAE's official gradient scales with 1 / processes: a change).
CHANGEABLE = ("lamb", "mask_ratio", "seed", "data", "builtin_size", "norm_pix_loss", "cls_double_norm", "batch_size",
              "accum_iter", "world_size", "exact_ddp_grad", "sampling_rate")


def _opt(default, help=None, **argparse_kw):
    """A field that is a flag of `umae train`: its help and any argparse keywords (choices, metavar)
    in the metadata. A bool field is `--x` (store_true) when its default is False, `--x/--no-x`
    (BooleanOptionalAction) otherwise."""
    return field(default=default, metadata=dict(help=help, **argparse_kw))


@dataclass
class TrainConfig:
    data: str | None = _opt(None, "image models: 'builtin' (procedurally generated shapes10, no download; the "
                            "default), 'digits' (scikit-learn's real handwritten digits, no download), 'hierarchical' "
                            "(generated images with known latents at three levels, umae.data.hierarchical), a "
                            "CIFAR-10/100 folder in torchvision's format, or an ImageFolder directory. Video models: "
                            "'video-builtin' (generated motion clips, no download; the default) or a list of video "
                            "files, one 'path label' per line (MCG-NJU/VideoMAE's format; decoded with PyAV)")
    builtin_size: int = _opt(BUILTIN_SIZE, "images (clips) in the builtin, hierarchical or video-builtin training set")
    model: str = _opt("umae_vit_tiny_patch4_32")
    fused: bool = _opt(True, "fused kernels (default) or the pure-PyTorch references")
    lamb: float = _opt(0.01, "uniformity weight (0 = plain MAE)")
    cls_double_norm: bool = _opt(True, "U-MAE's cls feature as its official forward: the encoder norm applied twice")
    exact_ddp_grad: bool = _opt(True, "under DDP, the uniformity term's exact global-batch gradient; "
                                "--no-exact-ddp-grad: U-MAE's official GatherLayer, whose gradient DDP's averaging "
                                "scales by 1 / world size (the paper's runs)")
    online_probe: bool = _opt(False, "train U-MAE's online linear classifier on the detached cls feature; log its "
                              "accuracy")
    mask_ratio: float | None = _opt(None, "default: 0.75 (MAE) for image models, 0.9 (VideoMAE's tube masking) for "
                                    "video models")
    sampling_rate: int = _opt(4, "video models: the frame step of the sampled frames (VideoMAE's --sampling_rate)")
    norm_pix_loss: bool = _opt(True)
    batch_size: int = _opt(64, "per process")
    accum_iter: int = _opt(1)
    epochs: int = _opt(1)
    steps: int = _opt(0, "optimizer steps (overrides --epochs when > 0)")
    blr: float = _opt(1.5e-4, "base lr: lr = blr * effective batch / 256")
    lr: float | None = _opt(None, "absolute lr (overrides --blr)")
    min_lr: float = _opt(0.0)
    warmup_steps: int | None = _opt(None, "default: 5% of the steps")
    weight_decay: float = _opt(0.05)
    decay_tokens: bool | None = _opt(None, "weight-decay cls_token and mask_token, as MAE's rule (only "
                                               "1-d parameters and biases are exempt); default: on for image models, "
                                               "off for video models (MCG-NJU's rule), or the resumed checkpoint's "
                                               "choice")
    clip_grad: float | None = _opt(None, "clip the gradient norm (default: off, as MAE)")
    amp: str = _opt("auto", "auto: bf16 on a GPU that supports it, none (fp32) otherwise",
                    choices=["auto", "none", "bf16", "fp16"])
    compile: bool = _opt(False, "torch.compile the model")
    compile_mode: str = _opt("default", "with --compile: torch.compile's mode; reduce-overhead replays the step's "
                             "kernels from CUDA graphs (no host work per launch; MAE's shapes are static, and every "
                             "umae op is capturable); on CPU it compiles as default",
                             choices=["default", "reduce-overhead", "max-autotune"])
    fsdp: bool = _opt(False, "with several processes (torchrun), shard the parameters, gradients and optimizer "
                      "state over them (FSDP2's fully_shard per block) instead of DDP; checkpoints are the same "
                      "either way")
    seed: int = _opt(0)
    out: str = _opt("runs/umae")
    ckpt_every: int = _opt(0, "checkpoint every N optimizer steps (0: at the end)")
    resume: str | None = _opt(None, "checkpoint to resume from. Its run's settings ("
                                        + ", ".join(CHANGEABLE) + ") must match this run's (pass the same values) "
                                        "unless named in --resume-override; --lr, --blr, --steps, --amp, --clip-grad "
                                        "and the like may change")
    overwrite: bool = _opt(False, "a fresh run (no --resume) into an --out that holds another run's log.jsonl or "
                           "checkpoint-*.pt deletes them first; a --resume from an earlier checkpoint into its "
                           "run's folder deletes the run's later checkpoints (default: either is refused)")
    resume_override: str = _opt("", "with --resume: settings that may differ from the checkpoint's, e.g. "
                                "lamb,mask_ratio (the checkpoint records each change; world_size: another number of "
                                "processes, which needs none where the batch across them is kept). With batch_size or "
                                "accum_iter "
                                "the data position is recomputed from the step (micro step = step * the new "
                                "--accum-iter, over the new batches per epoch), not continued at the images seen, and "
                                "--blr's lr follows the new effective batch", metavar="SETTING[,SETTING]")
    num_workers: int | None = _opt(None, "loader processes (default: the machine's cores)")
    log_every: int = _opt(10, "optimizer steps between log records (the only host syncs of the loop)")
    device: str | None = _opt(None, "default: cuda when available")
    no_progress: bool = _opt(False)
    # not a flag: the progress bar's label (umae reproduce names each of its runs)
    progress_desc: str = field(default="umae train", metadata=dict(cli=False))

    def __post_init__(self):  # the defaults that depend on the model's kind
        from ..models import is_video

        video = is_video(self.model)
        if self.data is None:
            self.data = "video-builtin" if video else "builtin"
        if self.mask_ratio is None:
            self.mask_ratio = 0.9 if video else 0.75

    @classmethod
    def from_args(cls, args) -> TrainConfig:
        """The config of parsed flags (an argparse.Namespace; its other attributes are ignored)."""
        if isinstance(args, cls):
            return args
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def overrides(self) -> list[str]:
        """--resume-override's settings, as field names."""
        return [k.strip().replace("-", "_") for k in (self.resume_override or "").split(",") if k.strip()]


def add_args(p: argparse.ArgumentParser) -> None:
    """`umae train`'s flags: one per TrainConfig field, `--field-name`, with its type, default and help."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        if not meta.pop("cli", True):
            continue
        help = meta.pop("help")
        kw = dict(default=f.default, help=help.replace("%", "%%") if help else None, **meta)
        kind = typing.get_args(hints[f.name]) or (hints[f.name],)  # Optional[X] -> (X, NoneType)
        if kind[0] is bool:
            kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
            if f.default is False:
                del kw["default"]
        elif kind[0] is not str:
            kw["type"] = kind[0]
        p.add_argument("--" + f.name.replace("_", "-"), **kw)


def check_range(args, names, low: float, strict: bool = False, optional: bool = False) -> None:
    """ValueError naming the flag and its value unless each of `names` is >= low (> low when
    strict; None passes when optional). NaN and infinities fail."""
    for k in names:
        v = getattr(args, k)
        if v is None and optional:
            continue
        if v is None or not (v > low if strict else v >= low):
            raise ValueError(f"--{k.replace('_', '-')} must be {'>' if strict else '>='} {low:g}, got {v}")
        if isinstance(v, float) and math.isinf(v):
            raise ValueError(f"--{k.replace('_', '-')} must be a finite number, got {v}")


def open_out(out: str, name: str = ".write-test", flags: int = os.O_WRONLY | os.O_CREAT) -> int:
    """Creates the --out folder and opens `name` in it (returns the fd), or a ValueError naming
    --out: a file, or a folder this process cannot write (permissions, a read-only mount)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        return os.open(os.path.join(out, name), flags, 0o644)
    except OSError as e:
        raise ValueError(f"--out {out!r} cannot be written: {e.strerror}") from None


def check_out(out: str) -> None:
    """--out can be written, found before the work whose results go there."""
    os.close(open_out(out))
    os.remove(os.path.join(out, ".write-test"))


def parse_device(name: str | None, flag: str = "--device"):
    """torch.device(name), or a ValueError naming the flag: an unknown device, or a CUDA one
    without a GPU (or past the GPUs there are)."""
    if not name:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{flag} {name!r} is not a device (e.g. cpu, cuda, cuda:1): "
                         f"{str(e).splitlines()[0]}") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps, xla...: umae's kernels and training run on these two
        raise ValueError(f"{flag} {name!r}: umae runs on cpu or cuda, not {device.type}")
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes cpu:1 and runs on the one CPU device
        raise ValueError(f"{flag} {name!r}: there is one CPU device (cpu, or cpu:0)")
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{flag} {name!r}: no CUDA GPU is available here")
        if device.index is not None and device.index >= n:
            raise ValueError(f"{flag} {name!r}: there are {n} CUDA GPU(s)")
    return device


MAX_BUILTIN = 1_000_000  # images of the generated sets (3 GB of uint8 32 x 32 RGB)
MAX_VIDEO_BUILTIN_BYTES = 4 << 30  # the generated clips, held in memory by every process


MAX_SCALE = 1e30  # past fp32's range an lr, a weight decay or a loss weight overflows the update or the loss


def check_at_most(flag: str, values) -> None:
    """ValueError naming the flag for the first of `values` above MAX_SCALE (None passes)."""
    for v in values:
        if v is not None and v > MAX_SCALE:
            raise ValueError(f"{flag} must be at most 1e30, got {v:g}")


def check_seed(seed: int) -> None:
    # a generator's seed is 64 bits; the data order folds products of it in
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"--seed must be in [0, 2**63), got {seed}")


def check_data_kind(data: str, model: str, flag: str = "--data") -> None:
    """A ValueError naming `flag` where `data` is of the other kind than `model` (clips for an image
    model, images for a video one), or, for a video model, neither the builtin clips nor a list file."""
    from ..data.video import VIDEO_BUILTIN
    from ..models import is_video

    if is_video(model) and data != VIDEO_BUILTIN and not os.path.isfile(data):
        raise ValueError(f"{flag} {data!r}: {model} is a video model; its data is {VIDEO_BUILTIN!r} or a list of video "
                         "files ('path label' per line)")
    if not is_video(model) and data == VIDEO_BUILTIN:
        raise ValueError(f"{flag} {data!r} is video data; {model} is an image model (video models: "
                         "umae_videomae_*)")
    if not is_video(model) and os.path.isfile(data):
        raise ValueError(f"{flag} {data!r} is a file; {model} is an image model, whose data is a named set or a "
                         "folder (a list of video files is data for the video models, umae_videomae_*)")


def validate(cfg: TrainConfig) -> None:
    """ValueError (FileNotFoundError for --resume) naming the flag of the first bad setting."""
    from ..models import check_name, is_video

    check_name(cfg.model)
    check_data_kind(cfg.data, cfg.model)
    if cfg.online_probe and is_video(cfg.model):
        raise ValueError(f"--online-probe: {cfg.model} is a video model; its probe is `umae eval` (the online probe "
                         "is U-MAE's, on the image models' cls feature)")
    if not 0 <= cfg.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {cfg.mask_ratio}")
    check_range(cfg, ("batch_size", "accum_iter", "epochs", "log_every", "builtin_size", "sampling_rate"), 1)
    check_range(cfg, ("steps", "ckpt_every", "lamb", "weight_decay", "min_lr"), 0)  # --steps 0: use --epochs
    check_range(cfg, ("warmup_steps", "num_workers"), 0, optional=True)
    check_range(cfg, ("blr",), 0, strict=True)
    check_range(cfg, ("lr", "clip_grad"), 0, strict=True, optional=True)
    for k in ("lr", "blr", "min_lr", "weight_decay", "lamb"):
        check_at_most(f"--{k.replace('_', '-')}", [getattr(cfg, k)])
    if cfg.builtin_size > MAX_BUILTIN:  # the generated set is held in memory, 3 KB per image
        raise ValueError(f"--builtin-size must be at most {MAX_BUILTIN:,}, got {cfg.builtin_size:,}")
    if is_video(cfg.model) and cfg.data == "video-builtin":
        from ..data.video import BUILTIN_SIZE as PIXELS, builtin_frames
        from ..models import VIDEO_CONFIGS

        frames = builtin_frames(VIDEO_CONFIGS[cfg.model][2], cfg.sampling_rate)
        nbytes = cfg.builtin_size * frames * 3 * PIXELS * PIXELS
        if nbytes > MAX_VIDEO_BUILTIN_BYTES:
            raise ValueError(f"--builtin-size {cfg.builtin_size:,} clips of {frames} frames would hold "
                             f"{nbytes / 2**30:.1f} GiB in memory; at most {MAX_VIDEO_BUILTIN_BYTES // 2**30} GiB "
                             f"(--builtin-size {MAX_VIDEO_BUILTIN_BYTES // (frames * 3 * PIXELS * PIXELS):,})")
    parse_device(cfg.device)
    check_seed(cfg.seed)
    if cfg.overrides() and not cfg.resume:
        raise ValueError(f"--resume-override {cfg.resume_override!r} needs --resume")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ValueError(f"--compile-mode {cfg.compile_mode} needs --compile")
    bad = set(cfg.overrides()) - set(CHANGEABLE)
    if bad:
        raise ValueError(f"--resume-override {cfg.resume_override!r}: {', '.join(sorted(bad))} cannot be "
                         f"overridden; these can: {', '.join(CHANGEABLE)}")
    if cfg.resume and not os.path.isfile(cfg.resume):
        raise FileNotFoundError(f"--resume {cfg.resume!r}: no such checkpoint")

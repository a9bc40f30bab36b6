"""Datasets and a deterministic input pipeline for training and evaluation.

Every augmented sample is a pure function of (seed, epoch, index), and the sampler's order
a function of (seed, epoch): a run resumes exactly at any step, with any number of workers,
and a DDP run sees the same global batches as a single process.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Sampler

BUILTIN_SIZE = 4096  # images in the builtin training set (its test set: a quarter as many)
NAMED_SETS = ("builtin", "digits", "hierarchical", "video-builtin")  # the data sets that ship offline, by name
# MAE normalizes with ImageNet's statistics; the models' pretrained_cfg says the same (timm's constants)
MEAN, STD = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)


# ---- the embedded default: procedurally generated, labelled, no download ------------

SHAPE_CLASSES = ("disc", "square", "ring", "cross", "h-stripes", "v-stripes", "checker", "triangle", "diamond",
                 "blob-pair")


def make_shapes(n: int, size: int = 32, seed: int = 0):
    """`shapes10`: n RGB images (n, 3, size, size) uint8 and labels (n,) in 10 classes.

    Each class is a shape or texture drawn at a random position and scale, in a random colour,
    on a random smooth background with noise: procedurally generated (documented as such), so
    the first run works offline; labels make linear probing meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    cx, cy = (u(n) - 0.5) * 0.8, (u(n) - 0.5) * 0.8
    r = 0.3 + 0.35 * u(n)
    X, Y = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    R = r[:, None, None]
    freq = (4 + 4 * u(n))[:, None, None]
    masks = {
        0: (X ** 2 + Y ** 2) < R ** 2,
        1: (X.abs() < R) & (Y.abs() < R),
        2: ((X ** 2 + Y ** 2).sqrt() - R * 0.75).abs() < R * 0.25,
        3: ((X.abs() < R * 0.25) | (Y.abs() < R * 0.25)) & (X.abs() < R) & (Y.abs() < R),
        4: torch.sin(Y * freq * math.pi) > 0,
        5: torch.sin(X * freq * math.pi) > 0,
        6: (torch.sin(X * freq * 2) * torch.sin(Y * freq * 2)) > 0,
        7: (Y < R) & (Y > -R) & (X.abs() < (R - Y) / 2),
        8: (X.abs() + Y.abs()) < R,
        9: ((X - R / 2) ** 2 + Y ** 2 < (R / 2) ** 2) | ((X + R / 2) ** 2 + Y ** 2 < (R / 2) ** 2),
    }
    m = torch.zeros(n, size, size, dtype=torch.bool)
    for c, mk in masks.items():
        m[labels == c] = mk[labels == c]
    fg = u(n, 3, 1, 1)
    bg = u(n, 3, 1, 1) * 0.6 + 0.2 * (xx + 1)[None, None] * u(n, 1, 1, 1)
    img = torch.where(m[:, None], fg, bg) + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


DIGITS_TEST_FRACTION = 0.2  # per class, a fixed split shared by every run


def make_digits(train: bool, size: int = 32):
    """`digits`: the 1,797 real handwritten digits (UCI, 8x8, 17 grey levels) that scikit-learn
    ships, so no download: bilinearly upsampled to size x size, grey replicated to RGB, uint8
    (n, 3, size, size), labels 0-9. Train / test: a stratified split fixed by seed 0 (20% of each
    class held out), whatever the run's seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    labels = torch.from_numpy(d.target).long()
    g = torch.Generator().manual_seed(0)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[:round(len(idx) * DIGITS_TEST_FRACTION)]] = True
    keep = ~test if train else test
    x = torch.from_numpy(d.images[keep.numpy()]).float()[:, None] / 16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return (x.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8), labels[keep]


class TensorImages(Dataset):
    """Images held as a uint8 tensor (N, 3, H, W) with labels."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        return self.images[i], int(self.labels[i])

    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


@functools.cache
def _tv_decode():
    """torchvision.io's decoder, or None where it is gone. torchvision 0.29 deprecates it for
    TorchCodec and warns on every call; it still decodes, and that one warning is silenced (the
    deprecation is not the user's to act on)."""
    import warnings

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:
        return None
    return decode_image, read_file, ImageReadMode.RGB


class BadImage(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


def _decode_file(path: str) -> torch.Tensor:
    """An image file as uint8 RGB (3, H, W), or BadImage naming the file (corrupt, truncated,
    empty or unreadable: the decoders' own errors do not say which file)."""
    try:
        return _decode(path)
    except Exception as e:
        import re

        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = re.sub(r"^[^,]+, \S+:\d+, ", "", why)  # torchvision's 'decode_png, /src/decode_png.cpp:66, ...'
        raise BadImage(f"cannot read the image {path!r} in --data: {why}") from None


def _to_8_bit(img: torch.Tensor) -> torch.Tensor:
    """A 16-bit image (0..65535) as the pipeline's 8 bits, by its real scale: round(v / 257), 257 =
    65535 / 255 (read as if 8-bit, its values were 257 times too large)."""
    return torch.div(img.to(torch.int32) + 128, 257, rounding_mode="floor").to(torch.uint8)


def _decode(path: str) -> torch.Tensor:
    """uint8 (3, H, W). torchvision's decode_image (libjpeg-turbo / libpng, no PIL object) for JPEG and
    PNG, which is where it is faster (umae bench --ops loader); PIL for the rest. 16-bit images are
    scaled to 8 bits (_to_8_bit), not read as if they were 8-bit."""
    tv = _tv_decode()
    if tv is not None and path.lower().endswith((".jpg", ".jpeg", ".png")):
        decode_image, read_file, rgb = tv
        img = decode_image(read_file(path), mode=rgb)
        return img if img.dtype == torch.uint8 else _to_8_bit(img)
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode.startswith("I;16"):  # PIL's convert("RGB") clips 16-bit values at 255
            gray = _to_8_bit(torch.from_numpy(np.asarray(im, dtype=np.uint16).astype(np.int32)))
            return gray.expand(3, -1, -1).contiguous()
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


class FolderImages(Dataset):
    """torchvision ImageFolder / CIFAR-10/100 (torchvision's on-disk format), as uint8 CHW tensors:
    CIFAR's arrays are read as they are held, ImageFolder files are decoded by _decode_file."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def num_classes(self) -> int:
        return len(self.ds.classes)

    def load(self, i):
        if hasattr(self.ds, "samples"):  # ImageFolder: (path, label)
            path, label = self.ds.samples[i]
            return _decode_file(path), int(label)
        return torch.from_numpy(self.ds.data[i]).permute(2, 0, 1), int(self.ds.targets[i])  # CIFAR: HWC uint8


def check_folder(path: str) -> None:
    """--data names one of the image sets of NAMED_SETS or a folder; an error naming --data otherwise."""
    if path == "video-builtin":
        raise ValueError("--data 'video-builtin' is video data, for the video models (umae_videomae_*)")
    if path not in NAMED_SETS and not os.path.isdir(path):
        raise FileNotFoundError(f"--data {path!r} is not a directory (use 'builtin' or 'digits' for the data sets "
                                "that ship offline)")


def open_dataset(path: str | None, train: bool = True, seed: int = 0, builtin_size: int = BUILTIN_SIZE):
    """'builtin' / None: shapes10 (train: builtin_size images, test: a quarter as many, other seed);
    'hierarchical': umae.data.hierarchical's images with known latents, sized and seeded alike.
    'digits': scikit-learn's handwritten digits at 32x32 (make_digits). A folder with
    cifar-10-batches-py or cifar-100-python: that CIFAR split. Any other folder: an ImageFolder
    (class sub-folders of images); `train` is ignored, split it with `split`."""
    if path in (None, "builtin", "hierarchical"):
        n = builtin_size if train else builtin_size // 4
        seed = seed if train else seed + 10_000
        return _hierarchical(n, seed) if path == "hierarchical" else TensorImages(*make_shapes(n, seed=seed))
    if path == "digits":
        return TensorImages(*make_digits(train))
    check_folder(path)
    import torchvision

    for sub, cifar in (("cifar-10-batches-py", torchvision.datasets.CIFAR10),
                       ("cifar-100-python", torchvision.datasets.CIFAR100)):
        if os.path.isdir(os.path.join(path, sub)):
            try:  # torchvision checks each batch file's md5 first: a missing or damaged one fails here
                return FolderImages(cifar(path, train=train, download=False))
            except Exception as e:  # RuntimeError, UnpicklingError, ... of a bad copy
                raise ValueError(f"--data {path!r}: {sub} is not a complete, intact copy of torchvision's "
                                 f"{cifar.__name__} ({' '.join(str(e).split()) or type(e).__name__})") from None
    try:
        ds = torchvision.datasets.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"--data {path!r}: not an image folder with class sub-folders ({e})") from None
    if len(ds) == 0:
        raise FileNotFoundError(f"--data {path!r} holds no images")
    return FolderImages(ds)


@functools.lru_cache(maxsize=4)  # a sweep opens the same sets for each of its runs
def _hierarchical(n: int, seed: int) -> TensorImages:
    """umae.data.hierarchical's images with their latents (`ds.latents`: {"top", "mid", "low"}, row i of
    each is image i's)."""
    from .hierarchical import make

    images, labels, latents = make(n, seed)
    ds = TensorImages(images, labels)
    ds.latents = latents
    return ds


def split(ds, holdout: float, seed: int = 0):
    """(train, held-out) index subsets, for data sets without a test split."""
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, int(n * holdout))
    return torch.utils.data.Subset(ds, perm[k:]), torch.utils.data.Subset(ds, perm[:k])


def _base(ds, i):
    """(the data set under any Subsets, the index in it)."""
    while isinstance(ds, torch.utils.data.Subset):
        ds, i = ds.dataset, ds.indices[i]
    return ds, i


def _load(ds, i):
    ds, i = _base(ds, i)
    return ds.load(i)


def num_classes(ds) -> int:
    return num_classes(ds.dataset) if isinstance(ds, torch.utils.data.Subset) else ds.num_classes()


def random_resized_crop_params(h, w, g, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawing from generator g."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        vals = torch.rand(2, generator=g)
        target = area * (scale[0] + (scale[1] - scale[0]) * float(vals[0]))
        ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(vals[1]))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            j = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return i, j, ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def sample_generator(seed: int, epoch: int, i: int) -> torch.Generator:
    """The generator of sample i's augmentation (and a clip's tube mask) in `epoch`: a function of
    (seed, epoch, index) alone, so any worker, resumed or not, draws the same."""
    # folded into the generator's 64 bits (a large --seed overflowed); unchanged below 2^63
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + i) % (1 << 63))


class Augmented(Dataset):
    """MAE's pretraining augmentation (random resized crop 0.2-1 and bicubic resize, as its PIL
    transform: antialiased, rounded to uint8; horizontal flip; normalize), seeded per (seed,
    epoch, index). The crop and flip are views of the uint8 image and the resize runs on uint8
    (torchvision's v2 kernel): only the size x size result becomes float. Indexed by `i` (the
    current `epoch`) or by `(epoch, i)`, as ResumableSampler yields, so one DataLoader and its
    workers serve every epoch."""

    def __init__(self, ds, size: int, seed: int, train: bool = True):
        self.ds, self.size, self.seed, self.train, self.epoch = ds, size, seed, train, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as VF

        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        img, label = _load(self.ds, i)
        if self.train:
            g = sample_generator(self.seed, epoch, i)
            t, l, h, w = random_resized_crop_params(img.shape[1], img.shape[2], g)
            img = img[:, t:t + h, l:l + w]
            if bool(torch.rand((), generator=g) < 0.5):
                img = img.flip(-1)
        if tuple(img.shape[1:]) != (self.size, self.size):
            img = VF.resize(img, [self.size, self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = img.float().div_(255)
        return (x - MEAN[:, None, None]) / STD[:, None, None], label


class ResumableSampler(Sampler):
    """Epoch-seeded permutations, sliced into global batches; rank r takes its part of each.
    Yields (epoch, index) from batch `start_batch` of `epoch` on, for `num_batches` batches
    (default: to the end of that epoch), crossing epochs: one DataLoader iterator, and its
    workers, serve the whole run, and a resumed run continues exactly."""

    def __init__(self, n, global_batch, seed, rank=0, world=1):
        self.n, self.gb, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.epoch, self.start_batch, self.num_batches = 0, 0, None

    def batches_per_epoch(self):
        return self.n // self.gb

    def _remaining(self):
        return self.batches_per_epoch() - self.start_batch if self.num_batches is None else self.num_batches

    def __iter__(self):
        b = self.gb // self.world
        epoch, k, left = self.epoch, self.start_batch, self._remaining()
        while left > 0:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                (self.seed * 7919 + epoch) % (1 << 63))).tolist()
            for k in range(k, min(self.batches_per_epoch(), k + left)):
                for i in perm[k * self.gb + self.rank * b:k * self.gb + (self.rank + 1) * b]:
                    yield epoch, i
                left -= 1
            epoch, k = epoch + 1, 0

    def __len__(self):
        return self._remaining() * (self.gb // self.world)

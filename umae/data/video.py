"""Video data for VideoMAE / U-MAE video pretraining: a generated, labelled set of motion clips (offline
default) and MCG-NJU's list of video files (`path label` per line) decoded with PyAV; frames sampled,
cropped and tube-masked as MCG-NJU/VideoMAE's pretraining does, each sample a pure function of
(seed, epoch, index) as the image pipeline's (exact resume, any number of workers, DDP alike).
"""
from __future__ import annotations

import math
import os

import torch
from torch.utils.data import Dataset

from . import MEAN, STD

VIDEO_BUILTIN = "video-builtin"
BUILTIN_FRAMES = 16  # frames of a generated clip: 4 sampled at VideoMAE's rate 4 span it
MOTION_CLASSES = ("right", "left", "down", "up", "clockwise", "anticlockwise", "growing", "shrinking", "blinking",
                  "still")


# ---- the generated default: every class is told apart by motion alone --------------------------

def make_motion_clips(n: int, size: int = 32, frames: int = BUILTIN_FRAMES, seed: int = 0):
    """`motion10`: n clips uint8 (n, frames, 3, size, size) and labels (n,) in 10 classes.

    Each clip is one elongated shape (an ellipse or a bar, random aspect, angle, colours, position and
    size, on a smooth background with noise) that moves right, left, down or up, turns clockwise or
    anticlockwise, grows, shrinks, blinks (its colour swapped every 4 frames) or stays still, at a random
    rate. Shape, colour, place and pose are drawn alike for every class, so no single frame tells the
    class: a probe needs the motion. Generated in chunks (bounded memory), a function of (n, seed)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    out = torch.empty(n, frames, 3, size, size, dtype=torch.uint8)
    for lo in range(0, n, 256):
        out[lo:lo + 256] = _draw(labels[lo:lo + 256], size, frames, g)
    return out, labels


def _draw(labels: torch.Tensor, size: int, frames: int, g: torch.Generator) -> torch.Tensor:
    n = len(labels)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    t = torch.arange(frames, dtype=torch.float32)[None, :]  # (1, T)
    c = labels[:, None]
    speed = 0.04 + 0.03 * u(n, 1)  # of the [-1, 1] frame per frame
    dx = torch.where(c == 0, speed, torch.where(c == 1, -speed, torch.zeros(())))
    dy = torch.where(c == 2, speed, torch.where(c == 3, -speed, torch.zeros(())))
    # start so that the path is centred on a random point near the middle
    cx = (u(n, 1) - 0.5) * 0.6 + dx * (t - (frames - 1) / 2)
    cy = (u(n, 1) - 0.5) * 0.6 + dy * (t - (frames - 1) / 2)
    turn = (0.08 + 0.08 * u(n, 1)) * torch.where(c == 4, 1.0, torch.where(c == 5, -1.0, 0.0))
    angle = u(n, 1) * math.pi + turn * t
    grow = (0.02 + 0.02 * u(n, 1)) * torch.where(c == 6, 1.0, torch.where(c == 7, -1.0, 0.0))
    scale = (0.35 + 0.25 * u(n, 1)) * torch.exp(grow * (t - (frames - 1) / 2))
    aspect = 1.8 + 1.2 * u(n, 1)  # long axis / short axis
    bar = u(n, 1) < 0.5
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    X = xx[None, None] - cx[..., None, None]
    Y = yy[None, None] - cy[..., None, None]
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    a = (X * cos + Y * sin) / scale[..., None, None]  # along the long axis
    b = (-X * sin + Y * cos) / scale[..., None, None] * aspect[..., None, None]
    inside = torch.where(bar[..., None, None], (a.abs() < 1) & (b.abs() < 1), a * a + b * b < 1)  # (n, T, H, W)
    fg, fg2 = u(n, 1, 3, 1, 1), u(n, 1, 3, 1, 1)
    blink = (c == 8) & ((t.long() // 4) % 2 == 1)  # (n, T)
    colour = torch.where(blink[..., None, None, None], fg2, fg)  # (n, T, 3, 1, 1)
    bg = (u(n, 1, 3, 1, 1) * 0.6 + 0.2 * (xx + 1)[None, None, None] * u(n, 1, 1, 1, 1))
    clip = torch.where(inside[:, :, None], colour, bg) + 0.02 * torch.randn(n, frames, 3, size, size, generator=g)
    return (clip.clamp(0, 1) * 255).round().to(torch.uint8)


class TensorClips(Dataset):
    """Clips held as a uint8 tensor (N, T, 3, H, W) with labels."""

    def __init__(self, clips, labels):
        self.clips, self.labels = clips, labels

    def __len__(self):
        return len(self.labels)

    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def duration(self, i) -> int:
        return self.clips.shape[1]

    def frames(self, i, ids: list[int]):
        return self.clips[i, ids], int(self.labels[i])


# ---- real video files: MCG-NJU's list, decoded by PyAV ------------------------------------------

class BadVideo(ValueError):
    """A video file that cannot be read or decoded; the message names the file."""


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV (pip install av); --data video-builtin needs "
                          "nothing") from None
    return av


def read_list(path: str) -> list[tuple[str, int]]:
    """MCG-NJU's list: one `path label` per line, fields split at spaces (the first the video, the
    second its label, any further ignored, as MCG-NJU reads them); paths relative to the list's folder
    unless absolute; blank lines skipped. A ValueError naming the file and line for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {path!r} cannot be read as a list of videos: {e}") from None
    root, items = os.path.dirname(os.path.abspath(path)), []
    for k, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[1].isdigit():
            raise ValueError(f"--data {path!r} line {k}: expected 'path label' (label an int >= 0), got {line!r}")
        items.append((os.path.join(root, fields[0]), int(fields[1])))
    if not items:
        raise ValueError(f"--data {path!r} lists no videos")
    return items


class VideoList(Dataset):
    """Video files of an MCG-NJU list, decoded by PyAV (FFmpeg inside its wheel: no system library and
    no torch-version pin, and it writes the tests' files too). A video's frames are indexed once by its
    packets' timestamps (no decoding, as decord indexes them); a clip then seeks to the key frame before
    its first frame and decodes from there, and only the sampled frames are converted."""

    def __init__(self, path: str):
        self.items = read_list(path)
        # per video: (its frame count, its frames' sorted timestamps or None where they carry none,
        # its key frames' (pts, dts) in order)
        self._index: dict[int, tuple] = {}
        _av()

    def __len__(self):
        return len(self.items)

    def num_classes(self) -> int:
        return max(label for _, label in self.items) + 1

    def _fail(self, i, why) -> BadVideo:
        return BadVideo(f"cannot read the video {self.items[i][0]!r} in --data: {why}")

    def duration(self, i) -> int:
        """The video's frames: its packets, checked against the count its container records (fewer is a
        truncated file)."""
        if i not in self._index:
            try:
                with _av().open(self.items[i][0]) as box:
                    stream = box.streams.video[0]
                    packets = [(p.pts, p.dts, p.is_keyframe) for p in box.demux(stream) if p.size]
                    recorded = stream.frames
            except IndexError:
                raise self._fail(i, "it holds no video stream") from None
            except Exception as e:  # FFmpeg's errors: InvalidDataError, EOF, FileNotFoundError, ...
                raise self._fail(i, _reason(e)) from None
            stamps = [p[0] for p in packets]
            if not stamps:
                raise self._fail(i, "it holds no frames")
            if recorded and len(stamps) < recorded:
                raise self._fail(i, f"truncated: {len(stamps)} of the {recorded} frames its container records")
            keys = sorted((pts, dts) for pts, dts, key in packets if key and pts is not None)
            self._index[i] = (len(stamps), None if None in stamps else sorted(stamps), keys)
        return self._index[i][0]

    def frames(self, i, ids: list[int]):
        """uint8 (len(ids), 3, H, W) of frames `ids` (repeats allowed)."""
        import numpy as np

        self.duration(i)
        _, pts, keys = self._index[i]
        want = set(ids)
        path, label = self.items[i]
        try:
            seek = _seek_to(keys, pts, pts[min(want)]) if pts else None
            got = self._decode(path, want, pts, seek) if seek is not None else {}
            if len(got) < len(want):  # from the start (or a seek that landed past a wanted frame)
                got = self._decode(path, want)
        except Exception as e:
            raise self._fail(i, _reason(e)) from None
        if len(got) < len(want):
            raise self._fail(i, f"truncated: frame {max(want - set(got))} of its {self.duration(i)} could not be "
                                "decoded")
        arr = np.stack([got[k] for k in ids])
        return torch.from_numpy(arr).permute(0, 3, 1, 2), label

    @staticmethod
    def _decode(path, want, pts=None, seek=None):
        """{index: rgb24 frame} of the frames `want`: from the start, counted in the order the decoder
        gives them (presentation order); or from the key frame at decode timestamp `seek`, found by
        their timestamps (`pts`: the video's sorted table)."""
        got = {}
        with _av().open(path) as box:
            stream = box.streams.video[0]
            at = None
            if seek is not None:
                box.seek(seek, stream=stream, backward=True, any_frame=False)
                at = {pts[k]: k for k in want}
            for n, frame in enumerate(box.decode(stream)):
                k = at.get(frame.pts) if at is not None else (n if n in want else None)
                if k is not None:
                    got[k] = frame.to_ndarray(format="rgb24")
                    if len(got) == len(want):
                        break
        return got


def _seek_to(keys: list, pts: list, first):
    """The decode timestamp of the last key frame (of `keys`, (pts, dts) in order) at or before the
    frame stamped `first` (None: the video's first frame, of the sorted `pts`), where decoding starts
    for it: the demuxer seeks by decode order, and a frame between that key frame and `first`
    refers to nothing before it."""
    before = [k for k in keys if k[0] <= first]
    if not before or before[-1][0] == pts[0]:
        return None
    key_pts, key_dts = before[-1]
    return key_pts if key_dts is None else key_dts


def _reason(e: BaseException) -> str:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return why


BUILTIN_SIZE = 32  # motion10's pixels: larger models' loaders resize the crops up, as for the image builtin


def builtin_frames(num_frames: int, rate: int) -> int:
    """motion10's clip length for a model of num_frames sampled every `rate`: its whole window (at
    least BUILTIN_FRAMES), so no sampled frame repeats."""
    return max(BUILTIN_FRAMES, num_frames * rate)


def open_video(path: str | None, train: bool = True, seed: int = 0, builtin_size: int = 1024,
               frames: int = BUILTIN_FRAMES):
    """'video-builtin': motion10 clips of `frames` frames at 32 x 32 (train: builtin_size clips, test: a
    quarter as many, another seed). A file: MCG-NJU's list of videos (`train` is ignored: split it with
    data.split)."""
    if path in (None, VIDEO_BUILTIN):
        n = builtin_size if train else max(1, builtin_size // 4)
        return TensorClips(*make_motion_clips(n, BUILTIN_SIZE, frames, seed if train else seed + 10_000))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path!r} is not a list of videos ('path label' per line) nor "
                                f"{VIDEO_BUILTIN!r}")
    return VideoList(path)


# ---- sampling, augmentation and the tube mask: MCG-NJU's pretraining pipeline -------------------

def sample_indices(duration: int, frames: int, rate: int, g: torch.Generator | None) -> list[int]:
    """MCG-NJU's pretraining sampler (one segment, no jitter): a window of frames * rate frames at a
    random offset (g None: the middle one, for evaluation), every `rate`-th frame of it. A video shorter
    than the window starts at its first frame and steps while the next (1-based) position is before its
    last frame, then repeats the frame it reached, as MCG-NJU's loader does."""
    avg = duration - frames * rate + 1
    offset = (int(torch.randint(avg, (1,), generator=g)) if g is not None else avg // 2) if avg > 0 else 0
    ids, cur = [], offset + 1  # 1-based, as MCG-NJU's
    for _ in range(frames):
        ids.append(cur - 1)
        if cur + rate < duration:
            cur += rate
    return ids


SCALES = (1, 0.875, 0.75, 0.66)


def multi_scale_crop_params(h: int, w: int, size: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """GroupMultiScaleCrop(size, [1, .875, .75, .66]) of MCG-NJU: (top, left, height, width). Crop sides
    are the scales of the short side (within 3 pixels of `size`: `size`), a height and a width at most
    one scale apart, placed at one of 13 fixed positions. A side is never longer than the frame's."""
    base = min(h, w)
    sides = [int(base * s) for s in SCALES]
    # within 3 pixels of `size`: `size`, as MCG-NJU's; but never past the frame, where PIL's crop
    # would pad with black (a short side 1-2 pixels under `size`)
    hs = [min(size if abs(x - size) < 3 else x, h) for x in sides]
    ws = [min(size if abs(x - size) < 3 else x, w) for x in sides]
    pairs = [(cw, ch) for i, ch in enumerate(hs) for j, cw in enumerate(ws) if abs(i - j) <= 1]
    cw, ch = pairs[int(torch.randint(len(pairs), (1,), generator=g))]
    ws_, hs_ = (w - cw) // 4, (h - ch) // 4
    spots = [(0, 0), (4 * ws_, 0), (0, 4 * hs_), (4 * ws_, 4 * hs_), (2 * ws_, 2 * hs_),  # corners, centre
             (0, 2 * hs_), (4 * ws_, 2 * hs_), (2 * ws_, 4 * hs_), (2 * ws_, 0),  # the edges' middles
             (ws_, hs_), (3 * ws_, hs_), (ws_, 3 * hs_), (3 * ws_, 3 * hs_)]  # the quarters
    x, y = spots[int(torch.randint(len(spots), (1,), generator=g))]
    return y, x, ch, cw


class VideoAugmented(Dataset):
    """MCG-NJU's pretraining sample: `frames` frames at `rate` (sample_indices), one multi-scale crop
    for all of them resized bilinearly to size x size (uint8, antialiased as PIL's), ImageNet's
    normalization, as (3, frames, size, size) float; and its tube mask (umae.tube_mask of `grid`
    (t, h, w) at `ratio`, drawn by the sample's generator). No flip: MCG-NJU's pretraining has none.
    Indexed by `i` or `(epoch, i)` as data.Augmented; train=False: the middle window, the centred
    square resized, no mask (a (0,) placeholder)."""

    def __init__(self, ds, size: int, frames: int, rate: int, seed: int, grid=None, ratio: float = 0.9,
                 train: bool = True):
        self.ds, self.size, self.n_frames, self.rate, self.seed = ds, size, frames, rate, seed
        self.grid, self.ratio, self.train, self.epoch = grid, ratio, train, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as VF

        from ..ops import tube_mask
        from . import _base, sample_generator

        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        ds, j = _base(self.ds, i)
        g = sample_generator(self.seed, epoch, i) if self.train else None
        clip, label = ds.frames(j, sample_indices(ds.duration(j), self.n_frames, self.rate, g))
        if self.train:
            t, l, h, w = multi_scale_crop_params(clip.shape[-2], clip.shape[-1], self.size, g)
            clip = clip[..., t:t + h, l:l + w]
        else:  # the centred square
            h, w = clip.shape[-2:]
            s = min(h, w)
            clip = clip[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        if tuple(clip.shape[-2:]) != (self.size, self.size):
            clip = VF.resize(clip, [self.size, self.size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        x = (clip.float().div_(255) - MEAN[:, None, None]) / STD[:, None, None]
        x = x.transpose(0, 1).contiguous()  # (3, T, H, W), the model's layout
        if not self.train or self.grid is None:
            return x, torch.zeros(0, dtype=torch.bool), label
        return x, tube_mask(1, *self.grid, self.ratio, generator=g)[0], label

"""Video data and video training (umae/data/video.py, umae train / eval / convert with a video model):
the generated motion clips, MCG-NJU's sampler, crop and tube mask, real files decoded with PyAV (the
tests write them), exact resume, conversion of a trained checkpoint."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import umae.models  # noqa: F401  (registers with timm)
from umae import train
from umae.cli.main import main
from umae.data import video as V
from umae.train import TrainConfig

MICRO = "umae_videomae_micro_patch4_32"


def _args(out, **kw):
    """A micro video run's config into `out`: 16 generated clips per batch, no loader processes."""
    micro = dict(model=MICRO, builtin_size=64, batch_size=16, lr=1e-3, log_every=1, no_progress=True, num_workers=0)
    return TrainConfig(out=str(out), **{**micro, **kw})


def _write_video(path, frames: np.ndarray, fps: int = 25, codec: str = "mpeg4", gop: int = 12, b_frames: int = 0,
                 options=None):
    """frames uint8 (T, H, W, 3) into a video file (PyAV's bundled FFmpeg): a key frame every `gop`
    frames, up to `b_frames` B-frames between references; `options`: the muxer's."""
    import av  # a dependency (scripts/setup.sh): never skipped
    with av.open(str(path), "w", options=options or {}) as box:
        s = box.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.gop_size, s.codec_context.max_b_frames = gop, b_frames
        if codec == "mpeg4":
            s.options = {"qscale": "2"}  # near lossless: the decoded frames compare with the written ones
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                box.mux(p)
        for p in s.encode():
            box.mux(p)


def _smooth_frames(T: int, H: int, W: int, seed: int) -> np.ndarray:
    """Frames a lossy codec keeps: a smooth colour field, each frame a distinct brightness (no two
    within 3 levels, none clipped)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W] / max(H, W)
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * 40 + g.uniform(5, 15, 3)
    step = max(3, 190 // T)
    return np.stack([base + step * (t % (190 // step + 1)) for t in range(T)]).astype(np.uint8)


# ---- the generated clips ----------------------------------------------------------------------

def test_motion_clips_are_seeded_balanced_and_differ_by_motion():
    x, y = V.make_motion_clips(300, seed=3)
    x2, y2 = V.make_motion_clips(300, seed=3)
    assert x.shape == (300, V.BUILTIN_FRAMES, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, V.make_motion_clips(300, seed=4)[0])
    assert torch.bincount(y).tolist() == [30] * 10
    # "still" changes only by its noise across the clip; every moving class by more
    change = (x[:, -4].float() - x[:, 0].float()).abs().mean((1, 2, 3))
    per_class = torch.stack([change[y == c].mean() for c in range(10)])
    still = V.MOTION_CLASSES.index("still")
    assert all(per_class[c] > per_class[still] * 1.2 for c in range(10) if c != still), per_class
    # and no class is told by its first frame's colours: their class means agree within the spread
    first = x[:, 0].float().mean((1, 2, 3))
    means = torch.stack([first[y == c].mean() for c in range(10)])
    assert (means.max() - means.min()) < first.std(), (means, first.std())


# ---- MCG-NJU's sampling, crop and tube mask -------------------------------------------------------

def _mcg_frame_ids(duration, new_length, new_step, start):
    """MCG-NJU's _sample_train_indices (one segment, no temporal jitter; `start` its random draw) and
    _video_TSN_decord_batch_loader, transcribed."""
    skip_length = new_length * new_step
    average_duration = duration - skip_length + 1
    offset = (start if average_duration > 0 else 0) + 1
    skip_offsets = [0] * (skip_length // new_step)
    ids = []
    for i, _ in enumerate(range(0, skip_length, new_step)):
        if offset + skip_offsets[i] <= duration:
            ids.append(offset + skip_offsets[i] - 1)
        else:
            ids.append(offset - 1)
        if offset + new_step < duration:
            offset += new_step
    return ids


@pytest.mark.parametrize("duration,frames,rate", [(16, 4, 4), (17, 16, 4), (64, 16, 4), (300, 16, 4), (9, 4, 2),
                                                  (5, 8, 3), (1, 4, 4)])
def test_frame_sampling_is_mcg_njus(duration, frames, rate):
    g = torch.Generator().manual_seed(duration)
    avg = duration - frames * rate + 1
    for _ in range(5):
        state = g.get_state()
        ids = V.sample_indices(duration, frames, rate, g)
        start = int(torch.randint(avg, (1,), generator=torch.Generator().set_state(state))) if avg > 0 else 0
        assert ids == _mcg_frame_ids(duration, frames, rate, start)
        assert len(ids) == frames and all(0 <= i < duration for i in ids)
    assert V.sample_indices(duration, frames, rate, None) == _mcg_frame_ids(duration, frames, rate, max(avg, 0) // 2)


def _mcg_places(w, h, cw, ch):
    """MCG-NJU's fill_fix_offset(more_fix_crop=True): the 13 (left, top) places."""
    ws, hs = (w - cw) // 4, (h - ch) // 4
    return {(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs), (0, 2 * hs), (4 * ws, 2 * hs),
            (2 * ws, 4 * hs), (2 * ws, 0), (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)}


@pytest.mark.parametrize("h,w,size", [(120, 160, 112), (114, 150, 112), (222, 296, 224)])
def test_multi_scale_crop_takes_mcg_njus_sizes_and_places(h, w, size):
    # sides: the short side's scales, snapped to `size` within 3 pixels (114 -> 112), never past the
    # frame (a height of 222 stays 222: MCG-NJU's PIL crop would pad it with black)
    snap = [size if abs(int(min(h, w) * s) - size) < 3 else int(min(h, w) * s) for s in V.SCALES]
    hs, ws = [min(x, h) for x in snap], [min(x, w) for x in snap]
    g, seen = torch.Generator().manual_seed(0), set()
    for _ in range(600):
        t, l, ch, cw = V.multi_scale_crop_params(h, w, size, g)
        assert t >= 0 and l >= 0 and t + ch <= h and l + cw <= w
        assert any(abs(i - j) <= 1 for i, a in enumerate(hs) for j, b in enumerate(ws) if (a, b) == (ch, cw))
        assert (l, t) in _mcg_places(w, h, cw, ch)
        seen.add((ch, cw))
    assert len(seen) == 10  # every (height, width) pair at most one scale apart


def test_augmented_clip_and_tube_mask_are_functions_of_seed_epoch_index():
    ds = V.TensorClips(*V.make_motion_clips(20, seed=0))
    aug = V.VideoAugmented(ds, 32, 4, 4, seed=5, grid=(2, 8, 8), ratio=0.9)
    x, m, label = aug[(1, 7)]
    x2, m2, _ = aug[(1, 7)]
    assert x.shape == (3, 4, 32, 32) and x.dtype == torch.float32 and label == int(ds.labels[7])
    assert torch.equal(x, x2) and torch.equal(m, m2)
    assert m.dtype == torch.bool and m.shape == (128,) and int(m.sum()) == 2 * int(0.9 * 64)
    assert torch.equal(m[:64], m[64:])  # a tube: the same spatial mask at each tubelet
    assert not torch.equal(aug[(2, 7)][1], m)  # the next epoch draws another
    ev = V.VideoAugmented(ds, 32, 4, 4, seed=5, train=False)
    xe, me, _ = ev[7]
    assert me.numel() == 0  # evaluation: the whole clip, its middle window, no crop
    from umae.data import MEAN, STD

    want = (ds.clips[7, [0, 4, 8, 12]].float() / 255 - MEAN[:, None, None]) / STD[:, None, None]
    assert torch.allclose(xe, want.transpose(0, 1), atol=1e-6)


# ---- real video files --------------------------------------------------------------------------

@pytest.fixture
def video_list(tmp_path):
    """Six MPEG-4 files of 20 frames (40 x 48) in two classes, listed as MCG-NJU does ('path label')."""
    lines = []
    for k in range(6):
        _write_video(tmp_path / f"v{k}.mp4", _smooth_frames(20, 40, 48, k))
        lines.append(f"v{k}.mp4 {k % 2}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.txt"


def test_video_files_decode_to_the_frames_written(video_list, tmp_path):
    ds = V.open_video(str(video_list))
    assert len(ds) == 6 and ds.num_classes() == 2 and ds.duration(3) == 20
    got, label = ds.frames(3, [0, 4, 4, 19])
    want = torch.from_numpy(_smooth_frames(20, 40, 48, 3)[[0, 4, 4, 19]]).permute(0, 3, 1, 2)
    assert got.shape == (4, 3, 40, 48) and got.dtype == torch.uint8 and label == 1
    assert torch.equal(got[1], got[2])
    assert (got.float() - want.float()).abs().mean() < 4.5  # under half the 9 levels between frames: this frame


@pytest.mark.parametrize("codec,ext,b_frames", [("mpeg4", "mp4", 0), ("mpeg4", "mp4", 2), ("libx264", "mkv", 2),
                                                ("mpeg4", "avi", 0)])
def test_a_clip_seeks_to_its_key_frame_and_decodes_what_a_full_decode_does(tmp_path, codec, ext, b_frames):
    # B-frames: the key frame after a wanted frame in display order comes before it in decode order,
    # where a seek by decode time would land past it; the clip's frames are a whole decode's, bitwise
    import av  # a dependency (scripts/setup.sh): never skipped
    path = tmp_path / f"long.{ext}"
    _write_video(path, _smooth_frames(60, 40, 48, 0), codec=codec, gop=12, b_frames=b_frames)
    (tmp_path / "l.txt").write_text(f"long.{ext} 3\n")
    ds = V.open_video(str(tmp_path / "l.txt"))
    seeks = []
    decode = ds._decode
    ds._decode = lambda *a: seeks.append(a[-1]) or decode(*a)
    ids = [23, 27, 31, 31, 59]
    got, label = ds.frames(0, ids)
    with av.open(str(path)) as box:
        whole = np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])
    assert ds.duration(0) == len(whole) == 60 and label == 3
    assert torch.equal(got, torch.from_numpy(whole[ids]).permute(0, 3, 1, 2))
    assert len(seeks) == 1 and seeks[0] is not None  # one decode, from a key frame past the start


def test_bad_video_files_and_lists_are_named(video_list, tmp_path):
    (tmp_path / "junk.mp4").write_bytes(os.urandom(3000))
    whole = (tmp_path / "v0.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[:len(whole) // 3])  # its index (at the end) gone
    _write_video(tmp_path / "front.mp4", _smooth_frames(20, 40, 48, 0), options={"movflags": "faststart"})
    front = (tmp_path / "front.mp4").read_bytes()
    (tmp_path / "front_cut.mp4").write_bytes(front[:len(front) * 2 // 3])  # its index says 20 frames
    for name in ("junk.mp4", "cut.mp4", "front_cut.mp4", "missing.mp4"):
        (tmp_path / "l.txt").write_text(f"{name} 0\nv1.mp4 1\n")
        ds = V.open_video(str(tmp_path / "l.txt"))
        why = r".*truncated: \d+ of the 20 frames" if "front" in name else ""
        with pytest.raises(V.BadVideo, match=name + why):
            ds.frames(0, V.sample_indices(ds.duration(0), 16, 1, None))
    (tmp_path / "l.txt").write_text("v0.mp4 0\nv1.mp4\n")
    with pytest.raises(ValueError, match="line 2"):
        V.open_video(str(tmp_path / "l.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        V.open_video(str(tmp_path / "nope.txt"))


def test_a_list_of_video_files_trains_and_evaluates(video_list, tmp_path, capsys):
    recs = train.train(_args(tmp_path / "run", data=str(video_list), batch_size=2, steps=2, sampling_rate=2))
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
    assert main(["eval", "--ckpt", str(tmp_path / "run" / "checkpoint-last.pt"), "--out", str(tmp_path / "ev"),
                 "--holdout", "0.5"]) == 0
    assert "[mean]" in capsys.readouterr().out


# ---- training, resume, evaluation and conversion of a video model ---------------------------------

def test_video_training_resumes_bitwise_and_converts(tmp_path, capsys):
    full = train.train(_args(tmp_path / "a", steps=4, ckpt_every=2, lamb=0.01))
    assert full[0]["loss_unif"] > 0
    ck = torch.load(tmp_path / "a" / "checkpoint-2.pt", weights_only=False)
    assert ck["run"]["mask_ratio"] == 0.9 and ck["run"]["data"] == "video-builtin" and ck["config"]["num_frames"] == 4
    assert ck["run"]["decay_tokens"] is False  # MCG-NJU's rule: the mask token is not decayed
    resumed = train.train(_args(tmp_path / "b", steps=4, lamb=0.01, resume=str(tmp_path / "a" / "checkpoint-2.pt")))
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == b["loss"] and a["loss_unif"] == b["loss_unif"], (full, resumed)
    last_a = torch.load(tmp_path / "a" / "checkpoint-last.pt", weights_only=False)["model"]
    last_b = torch.load(tmp_path / "b" / "checkpoint-last.pt", weights_only=False)["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    # to MCG-NJU's .pth and back, to transformers' folder and back: the weights bitwise (the key bias
    # aside, which MCG-NJU's attention lacks)
    ckpt = str(tmp_path / "a" / "checkpoint-last.pt")
    assert main(["convert", ckpt, str(tmp_path / "mcg.pth"), "--to", "videomae"]) == 0
    mcg = torch.load(tmp_path / "mcg.pth", weights_only=False)["model"]
    assert torch.equal(mcg["encoder.blocks.1.attn.qkv.weight"], last_a["blocks.1.attn.qkv.weight"])
    assert torch.equal(mcg["decoder.blocks.0.attn.v_bias"], last_a["decoder_blocks.0.attn.qkv.bias"].chunk(3)[2])
    assert main(["convert", str(tmp_path / "mcg.pth"), str(tmp_path / "hf"), "--to", "hf", "--model", MICRO]) == 0
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as a new process has it (the --to hf above turned it off)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pth"), "--to", "videomae"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "Loading" not in err, (out, err)  # one line, no progress bar
    back = torch.load(tmp_path / "back.pth", weights_only=False)["model"]
    assert mcg.keys() == back.keys() and all(torch.equal(mcg[k], back[k]) for k in mcg)
    assert main(["eval", "--ckpt", ckpt, "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "[mean]" in out and "[cls]" not in out


def test_video_settings_are_checked_by_name(tmp_path):
    with pytest.raises(ValueError, match="--data 'builtin'.*video model"):
        train.validate(_args(tmp_path, data="builtin"))
    with pytest.raises(ValueError, match="--data 'video-builtin' is video data"):
        train.validate(_args(tmp_path, model="umae_vit_micro_patch4_32", data="video-builtin"))
    with pytest.raises(ValueError, match="--online-probe"):
        train.validate(_args(tmp_path, online_probe=True))
    with pytest.raises(ValueError, match="--sampling-rate"):
        train.validate(_args(tmp_path, sampling_rate=0))
    with pytest.raises(ValueError, match="--builtin-size"):
        train.validate(_args(tmp_path, model="umae_videomae_base_patch16_224", builtin_size=400_000))
    assert _args(tmp_path).mask_ratio == 0.9 and _args(tmp_path, model="umae_vit_micro_patch4_32").mask_ratio == 0.75

"""The training CLI: convergence fused vs reference, DDP vs a single process, exact resume,
evaluation, and clear errors."""
import argparse
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from umae_testing import MATMUL_TOL, adam_tolerance

import umae.models  # noqa: F401  (registers with timm: some tests create models before any training)
from umae import train
from umae.research import evaluate
from umae.train import TrainConfig
from umae.cli.main import main


def _args(out, **kw):
    """A micro run's config, into `out`; `kw` overrides its settings. No loader processes (a run's
    workers cost more than its micro steps here; test_exact_resume keeps them: the path where the
    sampler's position must survive in the workers)."""
    micro = dict(model="umae_vit_micro_patch4_32", builtin_size=128, batch_size=16, lr=1e-3, log_every=1,
                 no_progress=True, num_workers=0)
    return TrainConfig(out=str(out), **{**micro, **kw})


@pytest.mark.slow
def test_convergence_fused_vs_reference(tmp_path):
    fused = train.train(_args(tmp_path / "f", steps=16, fused=True))
    ref = train.train(_args(tmp_path / "r", steps=16, fused=False))
    lf, lr = [r["loss"] for r in fused], [r["loss"] for r in ref]
    assert len(lf) == 16
    for a, b in zip(lf, lr):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (lf, lr)
    assert sum(lf[-4:]) / 4 < 0.85 * sum(lf[:4]) / 4, lf  # it learns


def test_exact_resume(tmp_path):
    # with loader processes, as a real run: the sampler's position must reach them
    full = train.train(_args(tmp_path / "a", steps=6, ckpt_every=3, num_workers=2))
    train.train(_args(tmp_path / "b", steps=6, ckpt_every=3, num_workers=2))  # checkpoint-3 of an identical run
    resumed = train.train(_args(tmp_path / "c", steps=6, num_workers=2, resume=str(tmp_path / "b" / "checkpoint-3.pt")))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert a["loss"] == b["loss"], (full, resumed)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_ddp_and_fsdp_on_two_processes_match_single_process(tmp_path):
    # one spawn (2 processes importing torch: most of a run's time here) trains every run in turn
    video = dict(model="umae_videomae_micro_patch4_32", steps=2, batch_size=8)
    ddp, amp, full, resumed, video_ddp, video_fsdp = _two_processes(
        (tmp_path / "ddp", dict(steps=3, batch_size=8)),
        (tmp_path / "ddp_bf16", dict(steps=2, batch_size=40, amp="bf16")),
        (tmp_path / "fsdp", dict(fsdp=True, steps=4, batch_size=8, ckpt_every=2)),
        (tmp_path / "resumed", dict(fsdp=True, steps=4, batch_size=8, resume=str(tmp_path / "fsdp" / "checkpoint-2.pt"))),
        (tmp_path / "video_ddp", video), (tmp_path / "video_fsdp", dict(video, fsdp=True)))
    _check_ddp(tmp_path, ddp, amp)
    _check_fsdp(tmp_path, full, resumed)
    # a video model: each rank its half of the global batch's clips and tube masks (drawn per clip in the
    # loader), the uniformity term over the global batch: one process's losses
    single = train.train(_args(tmp_path / "video_one", **dict(video, batch_size=16)))
    for runs in (video_ddp, video_fsdp):
        assert [r["step"] for r in runs] == [1, 2] and runs[0]["loss_unif"] > 0, runs
        for a, b in zip(runs, single):
            assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["loss_unif"] - b["loss_unif"]) < 1e-5, (runs, single)


def _check_ddp(tmp_path, ddp, amp):
    # and, in the same 2 processes, U-MAE under CPU bf16 autocast (it crashed at any batch): the global
    # batch of 80 > the embedding width 64 (the Gram path), its first step's loss as one process's
    single = train.train(_args(tmp_path / "one", steps=3, batch_size=16))
    ck_d = torch.load(tmp_path / "ddp" / "checkpoint-last.pt", weights_only=False)["model"]
    ck_s = torch.load(tmp_path / "one" / "checkpoint-last.pt", weights_only=False)
    for a, b in zip(ddp, single):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["loss_unif"] - b["loss_unif"]) < 1e-5, (ddp, single)
    v = _second_moments(ck_s)
    rms = (sum(t.sum() for t in v.values()) / sum(t.numel() for t in v.values()) / (1 - 0.95 ** 3)).sqrt().item()
    for k, p in ck_s["model"].items():
        if k not in v:  # a buffer (the fixed sin-cos position embedding)
            assert torch.equal(ck_d[k], p), k
            continue
        tol = adam_tolerance(p, v[k], rms, lr=1e-3, steps=3, terms=16 * 65)  # 16 images, 64 patches + cls
        bad = (ck_d[k] - p).abs() > tol
        assert not bad.any(), (f"{k}: {int(bad.sum())} of {p.numel()} elements differ by more than the Adam rounding "
                               f"bound, worst {((ck_d[k] - p).abs() / tol).max().item():.3g}x it")
    one = train.train(_args(tmp_path / "one_bf16", steps=2, batch_size=80, amp="bf16"))
    assert [r["step"] for r in amp] == [1, 2] and all(r["loss_unif"] > 0 for r in amp)
    tol = MATMUL_TOL[torch.bfloat16]["rtol"]  # the Gram summed across ranks vs one process's, both rounded
    assert abs(amp[0]["loss_unif"] - one[0]["loss_unif"]) <= tol * one[0]["loss_unif"], (amp, one)
    assert abs(amp[0]["loss"] - one[0]["loss"]) <= tol * one[0]["loss"], (amp, one)


def _runs_worker(rank, world, port, runs):
    """Several runs one after the other in the same 2 processes (one spawn: CI time)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    for out, kw in runs:
        recs = train.train(_args(out, **kw))
        if rank == 0:
            json.dump(recs, open(os.path.join(out, "recs.json"), "w"))
    import torch.distributed as dist
    dist.destroy_process_group()


def _two_processes(*runs) -> list[list[dict]]:
    """The records of each (out, settings) run, trained in order by the same 2 processes."""
    runs = [(str(out), kw) for out, kw in runs]
    mp.start_processes(_runs_worker, args=(2, _free_port(), runs), nprocs=2, join=True, start_method="spawn")
    return [json.load(open(os.path.join(out, "recs.json"))) for out, _ in runs]


def _check_fsdp(tmp_path, full, resumed):
    # FSDP2 (fully_shard per block) on 2 gloo processes: the single process's losses and, after AdamW, its
    # parameters within the rounding bound; a resumed FSDP run continues bit for bit
    single = train.train(_args(tmp_path / "one_fsdp", steps=4, batch_size=16))
    for a, b in zip(full, single):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["loss_unif"] - b["loss_unif"]) < 1e-5, (full, single)
    ck_f = torch.load(tmp_path / "fsdp" / "checkpoint-last.pt", weights_only=False)
    ck_s = torch.load(tmp_path / "one_fsdp" / "checkpoint-last.pt", weights_only=False)
    assert ck_f["run"]["fsdp"] and ck_f["model"].keys() == ck_s["model"].keys()  # whole tensors, plain layout
    v = _second_moments(ck_s)
    rms = (sum(t.sum() for t in v.values()) / sum(t.numel() for t in v.values()) / (1 - 0.95 ** 4)).sqrt().item()
    for k, p in ck_s["model"].items():
        if k in v:
            tol = adam_tolerance(p, v[k], rms, lr=1e-3, steps=4, terms=16 * 65)
            assert not ((ck_f["model"][k] - p).abs() > tol).any(), k
    assert _second_moments(ck_f).keys() == v.keys()  # the optimizer state, keyed by position as opt.state_dict()
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == b["loss"] and a["loss_unif"] == b["loss_unif"], (full, resumed)


def _second_moments(ck) -> dict:
    """{parameter name: AdamW's exp_avg_sq} of a checkpoint (the optimizer's state is keyed by
    position in its param groups, made by train.param_groups)."""
    import timm

    model = timm.create_model(ck["run"]["model"], fused=False, probe_classes=ck["run"]["probe_classes"])
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in train.param_groups(model, 0.05, ck["run"]["decay_tokens"]) for p in g["params"]]
    state = ck["optimizer"]["state"]
    return {order[i]: state[i]["exp_avg_sq"] for i in range(len(order))}


def test_eval_writes_numbers_and_plot(tmp_path):
    train.train(_args(tmp_path / "mae", steps=2, lamb=0.0))
    train.train(_args(tmp_path / "umae", steps=2))
    p = argparse.ArgumentParser()
    evaluate.add_args(p)
    a = p.parse_args(["--ckpt", str(tmp_path / "mae" / "checkpoint-last.pt"), str(tmp_path / "umae" / "checkpoint-last.pt"),
                      "--out", str(tmp_path / "ev")])
    res = evaluate.evaluate(a)["results"]
    assert len(res) == 4
    for r in res:
        assert 0 <= r["linear_probe_acc"] <= 1 and 0 <= r["knn_acc"] <= 1 and 1 <= r["effective_rank"] <= 64
    assert os.path.getsize(tmp_path / "ev" / "spectrum.png") > 1000


def test_eval_accepts_a_facebookresearch_mae_checkpoint(tmp_path):
    # {"model": encoder state_dict}, no run record: --model names the architecture
    import timm

    src = timm.create_model("umae_vit_micro_patch4_32", fused=False)
    enc = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")
    p = argparse.ArgumentParser()
    evaluate.add_args(p)
    a = p.parse_args(["--ckpt", str(tmp_path / "mae_pretrain.pth"), "--pool", "cls", "--max-images", "200",
                      "--out", str(tmp_path / "ev")])
    with pytest.raises(ValueError, match="pass --model"):
        evaluate.evaluate(a)
    a.model = "umae_vit_micro_patch4_32"
    with pytest.warns(UserWarning, match="encoder-only"):
        (r,) = evaluate.evaluate(a)["results"]
    assert r["model"] == "umae_vit_micro_patch4_32" and 0 <= r["linear_probe_acc"] <= 1


def test_digits_data_shapes_labels_and_split():
    from umae import data as D

    tr, te = D.open_dataset("digits", True), D.open_dataset("digits", False)
    assert len(tr) + len(te) == 1797 and 340 <= len(te) <= 380
    x, y = tr.load(0)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and 0 <= y <= 9
    assert torch.equal(x[0], x[1]) and x.float().std() > 20  # grey as RGB, not blank
    for ds in (tr, te):  # every class on both sides (stratified), the split fixed across calls
        assert set(ds.labels.tolist()) == set(range(10))
    assert torch.equal(D.open_dataset("digits", False).images, te.images)
    assert not any(torch.equal(te.images[0], tr.images[i]) for i in range(len(tr)))


def test_train_and_eval_on_digits(tmp_path):
    from umae import data as D

    train.train(_args(tmp_path / "d", steps=2, data="digits"))
    p = argparse.ArgumentParser()
    evaluate.add_args(p)
    a = p.parse_args(["--ckpt", str(tmp_path / "d" / "checkpoint-last.pt"), "--pool", "cls", "--out", str(tmp_path / "ev")])
    (r,) = evaluate.evaluate(a)["results"]
    assert r["n_test"] == len(D.open_dataset("digits", False))
    assert 0.1 < r["linear_probe_acc"] <= 1


def test_spectrum_effective_rank():
    # features with known singular values: centered orthonormal columns scaled by sv
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 5, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(a - a.mean(0))[0]
    sv = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    x = u @ torch.diag(sv) @ torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0] + 7.0
    s, er, er_cov = evaluate.spectrum(x)
    torch.testing.assert_close(s.double(), sv, rtol=1e-5, atol=1e-5)
    for v, got in ((sv, er), (sv ** 2, er_cov)):
        p = v / v.sum()
        assert got == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    assert er_cov < er  # squaring weighs the leading directions more
    assert 7.5 < evaluate.spectrum(torch.randn(4000, 8, generator=g))[1] <= 8
    assert evaluate.spectrum(torch.randn(4000, 1, generator=g) @ torch.randn(1, 8, generator=g))[1] < 1.1


@pytest.mark.parametrize("argv, msg", [
    (["train", "--data", "/no/such/dir"], "is not a directory"),
    (["train", "--mask-ratio", "1.5"], "--mask-ratio must be in"),
    (["train", "--model", "resnet_nope"], "is not registered"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["train", "--resume", "/no/ckpt.pt"], "no such checkpoint"),
    (["eval", "--ckpt", "/no/ckpt.pt"], "no such checkpoint"),
    (["train", "--model", "umae_videomae_micro_patch4_32", "--data", "digits"], "is a video model"),
    (["train", "--data", "video-builtin"], "is video data"),
    (["train", "--model", "umae_videomae_micro_patch4_32", "--data", "/no/list.txt"], "is a video model"),
    (["train", "--model", "umae_videomae_micro_patch4_32", "--sampling-rate", "0"], "--sampling-rate must be >= 1"),
])
def test_cli_errors(tmp_path, capsys, argv, msg):
    assert main(argv + (["--out", str(tmp_path)] if argv[0] == "train" else [])) == 2
    assert msg in capsys.readouterr().err


def test_cli_empty_dataset_folder(tmp_path, capsys):
    (tmp_path / "data" / "cls_a").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err


def test_cli_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag"])
    assert e.value.code == 2


def test_fp16_grad_scaler_and_accumulation(tmp_path):
    recs = train.train(_args(tmp_path / "h", steps=2, amp="fp16", accum_iter=2, batch_size=8))
    assert [r["step"] for r in recs] == [1, 2] and all(r["loss"] == r["loss"] for r in recs)  # finite, not NaN
    ck = torch.load(tmp_path / "h" / "checkpoint-last.pt", weights_only=False)
    assert ck["step"] == 2 and ck["scaler"]  # the scaler state is checkpointed for resume


@pytest.mark.parametrize("model", ["umae_vit_micro_patch4_32", "umae_videomae_micro_patch4_32"])
def test_no_host_sync_between_log_steps(tmp_path, monkeypatch, model):
    """umae's training code reads a tensor on the host only at log steps (one read each). The
    input pipeline (umae/data/) is excluded: it works on CPU tensors by construction. A video
    model's tube masks come with their count; their rows are checked against it by a device-side
    assert on CUDA, by one read of the check's flag per op on the CPU (the only other reads)."""
    import sys

    import umae

    umae_dir = os.path.dirname(umae.__file__)
    calls = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def wrapper(self, *a, _orig=getattr(torch.Tensor, name), _name=name, **k):
            f = sys._getframe(1).f_code.co_filename
            if f.startswith(umae_dir) and not f.startswith(os.path.join(umae_dir, "data", "")):
                calls.append((_name, os.path.relpath(f, umae_dir)))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    recs = train.train(_args(tmp_path, model=model, steps=6, log_every=3, ckpt_every=0))
    assert [r["step"] for r in recs] == [3, 6]
    cpu_mask_checks = ("__bool__", os.path.join("ops", "_common.py"))
    reads = [c for c in calls if c != cpu_mask_checks or "video" not in model]
    assert reads == [("tolist", os.path.join("train", "log.py"))] * 2, calls
    if "video" in model:  # one flag per step of visible_tokens and decoder_tokens (the fused loss's kernel checks)
        assert calls.count(cpu_mask_checks) == 6 * 2, calls


def test_weight_decay_follows_mae_rule():
    import timm

    m = timm.create_model("umae_vit_micro_patch4_32")
    # facebookresearch/mae's add_weight_decay: no decay for 1-d parameters and biases, all else decays
    official = {n for n, p in m.named_parameters() if p.requires_grad and not (p.ndim == 1 or n.endswith(".bias"))}
    names = {id(p): n for n, p in m.named_parameters()}
    for decay_tokens, expect in ((True, official), (False, official - {"cls_token", "mask_token"})):
        groups = train.param_groups(m, 0.05, decay_tokens)
        decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        assert decayed == expect
        assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in m.parameters())
    assert {"cls_token", "mask_token"} <= official and "pos_embed" not in official  # frozen: in no group


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from umae.models import MaskedAutoencoderViT

    calls = []
    real = MaskedAutoencoderViT.forward_loss

    def poisoned(self, *a):  # a finite loss for 5 steps, then NaN
        calls.append(1)
        loss = real(self, *a)
        return loss * float("nan") if len(calls) > 5 else loss
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    out = tmp_path / "nan"
    rc = main(["train", "--model", "umae_vit_micro_patch4_32", "--builtin-size", "64", "--batch-size", "16",
               "--steps", "8", "--ckpt-every", "4", "--log-every", "3", "--lr", "1e-3", "--num-workers", "0",
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "the loss is not finite (loss, loss_mae) at a step in 5..6" in err, err
    assert f"the last checkpoint: {out / 'checkpoint-4.pt'} (step 4)" in err
    # tb: if installed; .lock: the lock on --out
    assert set(os.listdir(out)) - {"tb", ".lock"} == {"checkpoint-4.pt", "checkpoint-last.pt", "log.jsonl"}
    ck = torch.load(out / "checkpoint-last.pt", weights_only=False)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values())
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in logged] == [3, 4, 6] and logged[-1]["loss"] != logged[-1]["loss"]


def test_clip_grad_clips_and_is_neutral_when_loose(tmp_path):
    base = train.train(_args(tmp_path / "a", steps=3, num_workers=0))
    loose = train.train(_args(tmp_path / "b", steps=3, num_workers=0, clip_grad=1e9))
    tight = train.train(_args(tmp_path / "c", steps=3, num_workers=0, clip_grad=1e-3))
    assert [r["loss"] for r in loose] == [r["loss"] for r in base]
    assert tight[0]["loss"] == base[0]["loss"] and tight[2]["loss"] != base[2]["loss"]
    assert tight[0]["grad_norm"] > 1e-3 and "grad_norm" not in base[0]  # the norm before clipping
    with pytest.raises(ValueError, match="--clip-grad must be > 0"):
        train.train(_args(tmp_path / "d", clip_grad=0.0))


def test_online_probe_logs_accuracy_and_evaluates(tmp_path):
    recs = train.train(_args(tmp_path / "p", steps=4, online_probe=True, num_workers=0))
    assert all(0 <= r["probe_acc"] <= 1 and r["loss_probe"] > 0 for r in recs)
    ck = torch.load(tmp_path / "p" / "checkpoint-last.pt", weights_only=False)
    assert ck["run"]["probe_classes"] == 10 and ck["model"]["fc.weight"].shape == (10, 64)
    model, run, step = evaluate.load_model(str(tmp_path / "p" / "checkpoint-last.pt"), "cpu")
    assert model.fc is not None and step == 4
    with pytest.raises(ValueError, match="probe_classes=10.*probe_classes=0"):  # a resume must keep the probe
        train.train(_args(tmp_path / "q", steps=6, resume=str(tmp_path / "p" / "checkpoint-last.pt")))


def test_amp_default_and_tf32(monkeypatch):
    from umae.train.main import resolve_amp

    assert resolve_amp("auto", torch.device("cpu")) == "none"  # the CPU stays fp32 unless asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", torch.device("cuda")) == "none"
    assert resolve_amp("fp16", torch.device("cuda")) == "fp16" and resolve_amp("bf16", torch.device("cpu")) == "bf16"

"""No data loss or silent corruption in `umae train` -- a NaN in any
micro-batch stops the run before a checkpoint, a second writer into --out is refused, a resume
refuses changed settings unless overridden, and a resumed log has each step once."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from umae import train
from umae.train import TrainConfig
from umae.cli.main import main

TINY = ["--model", "umae_vit_micro_patch4_32", "--builtin-size", "64", "--batch-size", "8", "--lr", "1e-3",
        "--num-workers", "0", "--no-progress"]


def _args(out, **kw):
    """A micro run's config, into `out`; `kw` overrides its settings."""
    micro = dict(model="umae_vit_micro_patch4_32", builtin_size=64, batch_size=8, lr=1e-3, log_every=1,
                 num_workers=0, no_progress=True)
    return TrainConfig(out=str(out), **{**micro, **kw})


def _steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]


def test_nan_in_first_micro_batch_stops_before_checkpoint(tmp_path, monkeypatch, capsys):
    from umae.models import MaskedAutoencoderViT

    calls = []
    real = MaskedAutoencoderViT.forward_loss

    def poisoned(self, *a):  # NaN in the first micro-batch of step 3 only (call 5 of accum 2)
        calls.append(1)
        loss = real(self, *a)
        return loss * float("nan") if len(calls) == 5 else loss
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    out = tmp_path / "nan"
    rc = main(["train", *TINY, "--accum-iter", "2", "--steps", "4", "--ckpt-every", "3", "--log-every", "3",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "the loss is not finite" in err and "at a step in 1..3" in err, err
    assert "the last checkpoint: none" in err and len(err.strip().splitlines()) == 1
    assert not any(f.startswith("checkpoint") for f in os.listdir(out)), os.listdir(out)


def test_second_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # another run holds the lock
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    try:
        assert main(["train", *TINY, "--steps", "1", "--out", str(out)]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert f"--out {str(out)!r} is in use by another umae train run (pid 4242)" in err, err
    assert os.listdir(out) == [".lock"]  # nothing written
    assert main(["train", *TINY, "--steps", "1", "--out", str(out)]) == 0  # the lock died with its holder


def test_second_writer_process_is_refused(tmp_path):
    # two processes: the first holds the lock for its whole run
    out = str(tmp_path / "run")
    code = ("import fcntl, os, sys, time; os.makedirs(sys.argv[1]); fd = os.open(sys.argv[1] + '/.lock', "
            "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another umae train run \(pid {holder.pid}\)"):
            train.train(_args(out, steps=1))
    finally:
        holder.kill()
        holder.wait()


def _ddp_locked_worker(rank, world, port, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        train.train(_args(out, steps=1))
        results.put((rank, "trained"))
    except ValueError as e:
        results.put((rank, str(e)))


@pytest.mark.dist
def test_second_writer_is_refused_on_every_ddp_rank(tmp_path):
    # rank 0 is refused the lock: rank 1 must stop too, not wait for rank 0 at the first collective
    import socket

    import torch.multiprocessing as mp

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ddp_locked_worker, args=(r, 2, port, str(out), results)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)  # a rank that waits for the refused rank 0 waits for ever
        assert not any(p.is_alive() for p in procs), "a rank still waits for the refused rank 0"
    finally:
        for p in procs:
            p.kill()
        os.close(fd)
    got = dict(results.get(timeout=60) for _ in procs)
    assert "in use by another umae train run" in got[0], got
    assert "rank 0 stopped the run: --out" in got[1] and "in use by another umae train run" in got[1], got


def test_resume_refuses_changed_settings_unless_overridden(tmp_path, capsys):
    train.train(_args(tmp_path / "a", steps=2, ckpt_every=1))
    ck = str(tmp_path / "a" / "checkpoint-1.pt")
    for flag, value, name in (("--lamb", "0.5", "lamb"), ("--mask-ratio", "0.5", "mask_ratio"),
                              ("--seed", "3", "seed"), ("--data", "digits", "data")):
        rc = main(["train", *TINY, "--steps", "2", "--resume", ck, flag, value, "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert rc == 2 and f"{flag} " in err and f"(this run: " in err and f"--resume-override {name}" in err, err
    rc = main(["train", *TINY, "--steps", "2", "--resume", ck, "--lamb", "0.5", "--mask-ratio", "0.5",
               "--resume-override", "lamb,mask-ratio", "--out", str(tmp_path / "c")])
    assert rc == 0, capsys.readouterr().err
    run = torch.load(tmp_path / "c" / "checkpoint-last.pt", weights_only=False)["run"]
    assert run["lamb"] == 0.5 and run["resume_overrides"] == [dict(step=1, lamb=[0.01, 0.5], mask_ratio=[0.75, 0.5])]
    assert main(["train", *TINY, "--resume", ck, "--resume-override", "model", "--out", str(tmp_path / "d")]) == 2
    assert "--resume-override 'model': model cannot be overridden" in capsys.readouterr().err


def test_resume_refuses_a_changed_batch_size_or_accum_iter_unless_overridden(tmp_path, capsys):
    # either shifts the data position (micro step = step * accum_iter over the batches per epoch) and the lr
    train.train(_args(tmp_path / "a", steps=2, ckpt_every=1))
    ck = str(tmp_path / "a" / "checkpoint-1.pt")
    run = torch.load(ck, weights_only=False)["run"]
    assert run["batch_size"] == 8 and run["accum_iter"] == 1
    for flag, value, name, old in (("--batch-size", "16", "batch_size", 8), ("--accum-iter", "2", "accum_iter", 1)):
        rc = main(["train", *TINY, "--steps", "2", "--resume", ck, flag, value, "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert rc == 2 and f"{flag} {old} (this run: {value})" in err and f"--resume-override {name}" in err, err
    rc = main(["train", *TINY, "--steps", "2", "--resume", ck, "--batch-size", "16", "--accum-iter", "2",
               "--resume-override", "batch-size,accum_iter", "--out", str(tmp_path / "c")])
    assert rc == 0, capsys.readouterr().err
    run = torch.load(tmp_path / "c" / "checkpoint-last.pt", weights_only=False)["run"]
    assert run["batch_size"] == 16 and run["resume_overrides"] == [dict(step=1, batch_size=[8, 16], accum_iter=[1, 2])]
    old = torch.load(ck, weights_only=False)  # a checkpoint from before these were recorded: not compared
    del old["run"]["batch_size"], old["run"]["accum_iter"]
    torch.save(old, tmp_path / "old.pt")
    assert main(["train", *TINY, "--steps", "2", "--resume", str(tmp_path / "old.pt"), "--batch-size", "16",
                 "--out", str(tmp_path / "d")]) == 0, capsys.readouterr().err


def test_resume_takes_the_same_data_folder_however_it_is_typed(tmp_path, monkeypatch, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(8):
            px = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / "imgs" / c / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--data", "imgs", "--steps", "1", "--out", "a"]) == 0
    rc = main(["train", *TINY, "--data", str(tmp_path / "imgs") + "/", "--steps", "2", "--resume",
               "a/checkpoint-last.pt", "--out", "b"])
    assert rc == 0, capsys.readouterr().err
    assert main(["train", *TINY, "--data", "digits", "--steps", "2", "--resume", "a/checkpoint-last.pt",
                 "--out", "c"]) == 2  # another data set still is a change


def _image_folder(root, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            px = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")


def test_resume_records_the_data_folder_where_it_is(tmp_path, monkeypatch, capsys):
    # the same relative --data typed in another directory is another data set
    _image_folder(tmp_path / "x" / "imgs", 0)
    _image_folder(tmp_path / "y" / "imgs", 1)
    monkeypatch.chdir(tmp_path / "x")
    assert main(["train", *TINY, "--data", "imgs", "--steps", "1", "--out", str(tmp_path / "a")]) == 0
    ck = str(tmp_path / "a" / "checkpoint-last.pt")
    run = torch.load(ck, weights_only=False)["run"]
    assert run["data"] == os.path.realpath(tmp_path / "x" / "imgs"), run["data"]
    monkeypatch.chdir(tmp_path / "y")
    capsys.readouterr()
    rc = main(["train", *TINY, "--data", "imgs", "--steps", "2", "--resume", ck, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--data {os.path.realpath(tmp_path / 'x' / 'imgs')!r} (this run: " in err, err
    assert main(["train", *TINY, "--data", "../x/imgs", "--steps", "2", "--resume", ck,
                 "--out", str(tmp_path / "c")]) == 0, capsys.readouterr().err
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "d")]) == 0  # builtin is recorded as such
    assert torch.load(tmp_path / "d" / "checkpoint-last.pt", weights_only=False)["run"]["data"] == "builtin"
    # a checkpoint from before, holding the path as typed, still resumes from where it was typed
    old = torch.load(ck, weights_only=False)
    old["run"]["data"] = "imgs"
    torch.save(old, tmp_path / "old.pt")
    monkeypatch.chdir(tmp_path / "x")
    assert main(["train", *TINY, "--data", str(tmp_path / "x" / "imgs"), "--steps", "2", "--resume",
                 str(tmp_path / "old.pt"), "--out", str(tmp_path / "e")]) == 0, capsys.readouterr().err


def test_resume_logs_each_step_once(tmp_path):
    out = tmp_path / "run"
    train.train(_args(out, steps=4, ckpt_every=2))
    os.remove(out / "checkpoint-4.pt")  # as if killed after logging steps 3 and 4, before checkpoint 4
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and a line torn by the kill
    train.train(_args(out, steps=5, resume=str(out / "checkpoint-2.pt")))
    assert _steps(out) == [1, 2, 3, 4, 5]
    train.train(_args(out, steps=2, overwrite=True))  # a fresh run into the folder, meant: its own log
    assert _steps(out) == [1, 2]
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == ["checkpoint-2.pt", "checkpoint-last.pt"]


def test_fresh_run_into_another_runs_out_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--ckpt-every", "1", "--out", str(out)]) == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f != ".lock"}
    capsys.readouterr()
    assert main(["train", *TINY, "--steps", "2", "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r} holds another run (checkpoint-1.pt, checkpoint-2.pt, checkpoint-3.pt" in err, err
    assert f"--resume {out / 'checkpoint-last.pt'}" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f != ".lock"} == before  # untouched
    os.remove(out / "log.jsonl")  # the log alone is another run too
    for f in os.listdir(out):
        if f.startswith("checkpoint"):
            os.remove(out / f)
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(["train", *TINY, "--steps", "1", "--out", str(out)]) == 2
    assert "holds another run (log.jsonl)" in capsys.readouterr().err
    (out / "log.jsonl").write_text("")  # an empty log (a run that failed before its first step) holds nothing
    assert main(["train", *TINY, "--steps", "1", "--out", str(out)]) == 0
    assert _steps(out) == [1]
    train.train(_args(out, steps=4, ckpt_every=2, overwrite=True))  # --overwrite: the old run is gone first
    (out / "checkpoint-9.pt").write_bytes(b"old")
    assert main(["train", *TINY, "--steps", "2", "--overwrite", "--out", str(out)]) == 0
    assert _steps(out) == [2]  # its own log only (TINY logs at the last step)
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == ["checkpoint-2.pt", "checkpoint-last.pt"]
    assert main(["train", *TINY, "--steps", "3", "--resume", str(out / "checkpoint-2.pt"), "--out", str(out)]) == 0


def test_resume_at_or_past_the_end_is_refused(tmp_path, capsys):
    train.train(_args(tmp_path / "a", steps=2))
    rc = main(["train", *TINY, "--steps", "2", "--resume", str(tmp_path / "a" / "checkpoint-2.pt"),
               "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "is at step 2, and this run ends at step 2 (--steps 2): nothing left to train" in err, err


def test_disk_full_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from umae.train import checkpoint

    real = torch.save

    def save(obj, f):  # the disk fills up while checkpoint 2 is written
        if obj["step"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--steps", "3", "--ckpt-every", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"disk full while writing {out / 'checkpoint-2.pt'}" in err
    assert f"the last checkpoint, intact: {out / 'checkpoint-1.pt'} (step 1)" in err
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not (out / "checkpoint-2.pt").exists()
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert torch.load(out / "checkpoint-last.pt", weights_only=False)["step"] == 1


class _FillsUp:
    """A file that takes `room` bytes, then fails its writes with ENOSPC: a disk filling up under
    torch.save's own zip writer (which turns the OSError into its RuntimeError 'unexpected pos')."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        n = memoryview(b).nbytes
        if n > self.room:
            self.f.write(bytes(memoryview(b).cast("B")[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _check_disk_full(out, rc, err):
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"disk full while writing {out / 'checkpoint-2.pt'}" in err, err
    assert f"the last checkpoint, intact: {out / 'checkpoint-1.pt'} (step 1)" in err, err
    assert "Traceback" not in err and "enforce fail" not in err, err
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not (out / "checkpoint-2.pt").exists()
    assert torch.load(out / "checkpoint-last.pt", weights_only=False)["step"] == 1
    assert torch.load(out / "checkpoint-1.pt", weights_only=False)["step"] == 1


def test_disk_full_inside_torch_save_zip_writer(tmp_path, monkeypatch, capsys):
    # the file the checkpoint writer opens fills up after 64 KiB: torch.save's writer raises its
    # RuntimeError with the OSError as __context__, not the OSError itself
    import builtins

    from umae.train import checkpoint

    def fills_up(path, mode="r", *a, **kw):
        f = builtins.open(path, mode, *a, **kw)
        return _FillsUp(f, 64 << 10) if "checkpoint-2.pt" in str(path) else f
    monkeypatch.setattr(checkpoint, "open", fills_up, raising=False)
    with pytest.raises(RuntimeError, match="unexpected pos") as info:  # what torch itself raises
        with fills_up(str(tmp_path / "checkpoint-2.pt.probe"), "wb") as f:
            torch.save(dict(x=torch.zeros(1 << 16)), f)
    assert isinstance(info.value.__context__, OSError) and info.value.__context__.errno == errno.ENOSPC
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--steps", "3", "--ckpt-every", "1", "--out", str(out)])
    _check_disk_full(out, rc, capsys.readouterr().err)


def test_disk_full_on_a_real_small_tmpfs(tmp_path, capsys):
    # a 3 MiB tmpfs holds checkpoint 1 (about 2 MB: the micro model, AdamW's moments) but not checkpoint 2
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    except OSError:
        r = None
    if r is None or r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        out = mnt / "run"
        rc = main(["train", *TINY, "--steps", "3", "--ckpt-every", "1", "--out", str(out)])
        _check_disk_full(out, rc, capsys.readouterr().err)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_sigkill_leaves_a_loadable_checkpoint_and_resume_is_exact(tmp_path):
    from umae._files import read_checkpoint

    out = tmp_path / "killed"
    argv = [*TINY, "--steps", "12", "--ckpt-every", "2", "--log-every", "1", "--out", str(out)]
    # each save is followed by a pause, so the kill lands while the run is mid-flight
    code = ("import sys, time; from umae.train import checkpoint; from umae.cli.main import main; "
            "real = checkpoint.save; checkpoint.save = lambda *a: (real(*a), time.sleep(0.3))[0]; "
            "sys.exit(main(['train', *sys.argv[1:]]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            if (out / "checkpoint-4.pt").exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    step = read_checkpoint(str(out / "checkpoint-last.pt"), "--resume")["step"]  # loadable
    assert 4 <= step < 12
    train.train(_args(out, steps=12, ckpt_every=2, resume=str(out / "checkpoint-last.pt")))
    unbroken = train.train(_args(tmp_path / "u", steps=12, ckpt_every=2))
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, 13))
    assert [r["loss"] for r in logged] == [r["loss"] for r in unbroken]  # bitwise, before and after the kill
    a = torch.load(out / "checkpoint-last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "u" / "checkpoint-last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_official_ddp_grad_flag_reaches_the_model_and_a_resume_compares_it(tmp_path, capsys, monkeypatch):
    import timm

    built = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    assert main(["train", *TINY, "--steps", "1", "--no-exact-ddp-grad", "--out", str(tmp_path / "a")]) == 0
    assert built[-1].exact_ddp_grad is False  # the model's uniformity term takes U-MAE's official gradient
    ck = tmp_path / "a" / "checkpoint-last.pt"
    assert torch.load(ck, weights_only=False)["run"]["exact_ddp_grad"] is False
    rc = main(["train", *TINY, "--steps", "2", "--resume", str(ck), "--out", str(tmp_path / "b")])
    assert rc == 2 and "--resume-override exact_ddp_grad" in capsys.readouterr().err


def test_nan_gradient_with_a_finite_loss_stops_before_checkpoint(tmp_path, monkeypatch, capsys):
    # was: only the loss was checked: a NaN gradient turned the weights NaN, the run said "done", exit 0,
    # and checkpoint-last.pt held NaNs
    from umae.models import MaskedAutoencoderViT

    class NanGrad(torch.autograd.Function):  # the identity, whose gradient is NaN
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    calls = []
    real = MaskedAutoencoderViT.forward_loss

    def poisoned(self, imgs, pred, mask):  # step 3's gradient only; the losses read at step 3 are finite
        calls.append(1)
        return real(self, imgs, NanGrad.apply(pred) if len(calls) == 3 else pred, mask)
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    steps, seen = [], []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        steps.append(1)
        out = real_step(self, *a, **k)
        seen[:] = [[p for g in self.param_groups for p in g["params"]]]
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "nangrad"
    rc = main(["train", *TINY, "--steps", "4", "--ckpt-every", "3", "--log-every", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "the gradient is not finite" in err and "at a step in 1..3" in err, err
    assert len(steps) == 3 and all(torch.isfinite(p).all() for p in seen[0]), steps  # step 3's skipped on the device
    assert not any(f.startswith("checkpoint") for f in os.listdir(out)), os.listdir(out)


def test_fused_adamw_skips_a_nonfinite_step_on_the_device():
    # no host sync: the update is skipped where the step's flag is 1
    from types import SimpleNamespace

    from umae.train.engine import skip_nonfinite_step
    from umae.train.log import DeviceStats

    w = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.05, fused=True)
    loop = SimpleNamespace(opt=opt, world=1, cfg=None)
    stats = DeviceStats("cpu")
    before = w.detach().clone()
    w.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])
    skip_nonfinite_step(loop, stats.add_grads([w.grad]))
    opt.step()
    assert torch.equal(w.detach(), before) and float(opt.state[w]["step"]) == 0  # untouched, no step counted
    w.grad = torch.ones(5)
    skip_nonfinite_step(loop, stats.add_grads([w.grad]))
    opt.step()
    assert not torch.equal(w.detach(), before) and torch.isfinite(w).all()
    assert not stats.read(1)["grads_finite"]  # the run still stops at its next read


def test_a_large_seed_trains(tmp_path, capsys):
    # was: "Overflow when unpacking long long", naming no flag: the data order's seed products left 64 bits
    assert main(["train", *TINY, "--seed", "10000000", "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    assert main(["train", *TINY, "--seed", str((1 << 63) - 1), "--steps", "1", "--out", str(tmp_path / "t")]) == 0


def test_epochs_that_make_no_step_are_refused(tmp_path, capsys):
    # was: 0 steps trained, exit 0: 64 images at batch 8 are 8 batches, 16 per optimizer step
    out = tmp_path / "none"
    assert main(["train", *TINY, "--steps", "0", "--epochs", "1", "--accum-iter", "16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--epochs 1 of 8 batches at --accum-iter 16 make no optimizer step" in err, err


def test_resume_into_another_runs_folder_is_refused(tmp_path, capsys):
    # was: exit 0, B's log lost 3 of its 4 records and its checkpoints mixed A's and B's
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["train", *TINY, "--steps", "2", "--ckpt-every", "1", "--out", str(a)]) == 0
    assert main(["train", *TINY, "--steps", "4", "--seed", "1", "--out", str(b)]) == 0
    before = {f: (b / f).read_bytes() for f in os.listdir(b) if f != ".lock"}
    capsys.readouterr()
    rc = main(["train", *TINY, "--steps", "4", "--resume", str(a / "checkpoint-1.pt"), "--out", str(b)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds another run" in err and "is not one of its checkpoints" in err, err
    assert {f: (b / f).read_bytes() for f in os.listdir(b) if f != ".lock"} == before  # nothing touched
    # its own folder (from its last checkpoint: an earlier one would replace the later), and an empty one, still resume
    assert main(["train", *TINY, "--steps", "3", "--resume", str(a / "checkpoint-2.pt"), "--out", str(a)]) == 0
    assert main(["train", *TINY, "--steps", "3", "--resume", str(a / "checkpoint-1.pt"),
                 "--out", str(tmp_path / "C")]) == 0


def test_resume_from_an_earlier_checkpoint_into_its_folder_keeps_the_later_ones(tmp_path, capsys):
    # was: --resume checkpoint-2.pt --resume-override lamb into the run's own folder replaced its checkpoints
    # 3 and 4, checkpoint-last and log records 3-4, exit 0
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--ckpt-every", "1", "--log-every", "1", "--out", str(out)]) == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f != ".lock"}
    capsys.readouterr()
    branch = ["train", *TINY, "--steps", "4", "--log-every", "1", "--resume", str(out / "checkpoint-2.pt"),
              "--lamb", "0.5", "--resume-override", "lamb"]
    assert main([*branch, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds the run's later checkpoints (checkpoint-3.pt, checkpoint-4.pt)" in err and "--overwrite" in err, err
    assert len(err.strip().splitlines()) == 1
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f != ".lock"} == before  # untouched
    assert main([*branch, "--out", str(tmp_path / "branch")]) == 0  # into a new folder: a branch
    assert _steps(tmp_path / "branch") == [3, 4]
    assert main([*branch, "--overwrite", "--out", str(out)]) == 0  # asked for: the later ones replaced
    assert _steps(out) == [1, 2, 3, 4]
    assert torch.load(out / "checkpoint-4.pt", weights_only=False)["run"]["lamb"] == 0.5
    # a resume refused for another reason removes nothing, --overwrite or not
    assert main(["train", *TINY, "--steps", "1", "--resume", str(out / "checkpoint-1.pt"), "--overwrite",
                 "--lamb", "0.5", "--resume-override", "lamb", "--out", str(out)]) == 2
    assert "nothing left to train" in capsys.readouterr().err
    assert {f"checkpoint-{k}.pt" for k in (1, 2, 4)} <= set(os.listdir(out))  # (3: replaced, not saved again)


def test_stale_checkpoint_temporaries_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    train.train(_args(out, steps=1))
    (out / "checkpoint-2.pt.tmp").write_bytes(b"a kill mid-write")
    train.train(_args(out, steps=2, resume=str(out / "checkpoint-1.pt")))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def _with_world(ck_path, dst, world):
    """A copy of a checkpoint whose record says it was trained by `world` processes of the same per-process batch."""
    ck = torch.load(ck_path, weights_only=False)
    ck["run"].update(world_size=world, global_batch=ck["run"]["batch_size"] * world * ck["run"]["accum_iter"])
    torch.save(ck, dst)
    return str(dst)


def test_resume_with_another_number_of_processes_keeps_the_global_batch_or_is_refused(tmp_path, capsys):
    # was: a 2-process run resumed in 1 process exited 0 with half the global batch and half --blr's lr
    train.train(_args(tmp_path / "a", steps=2, ckpt_every=1, lr=None, blr=1e-3))
    run = torch.load(tmp_path / "a" / "checkpoint-1.pt", weights_only=False)["run"]
    assert (run["world_size"], run["global_batch"], run["lr"]) == (1, 8, 1e-3 * 8 / 256)
    ck = _with_world(tmp_path / "a" / "checkpoint-1.pt", tmp_path / "two.pt", 2)  # as if from torchrun -nproc 2
    args = ["train", *[a for a in TINY if a not in ("--lr", "1e-3")], "--blr", "1e-3", "--steps", "2", "--resume", ck]
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's run has 2 processes (this run: 1), a global batch of 16 (this run: 8)" in err, err
    assert "keep the global batch with --batch-size 16" in err and "--resume-override world_size" in err, err
    assert len(err.strip().splitlines()) == 1
    assert main([*args, "--batch-size", "16", "--out", str(tmp_path / "c")]) == 0  # the global batch kept
    err = capsys.readouterr().err
    assert "resuming a 2-process run in 1: its global batch of 16 kept (--batch-size 16 x 1 processes" in err, err
    run = torch.load(tmp_path / "c" / "checkpoint-last.pt", weights_only=False)["run"]
    assert run["lr"] == 1e-3 * 16 / 256 and run["global_batch"] == 16
    assert run["resume_overrides"] == [dict(step=1, batch_size=[8, 16], world_size=[2, 1])]
    assert main([*args, "--resume-override", "world_size", "--out", str(tmp_path / "d")]) == 0  # asked for
    # the same global batch through accumulation moves the data position (the batch per micro step differs)
    # and, with U-MAE's official gradient (--no-exact-ddp-grad), the term's weight scales with 1 / processes
    capsys.readouterr()
    assert main([*args, "--accum-iter", "2", "--out", str(tmp_path / "e")]) == 2
    assert "keep the global batch with --batch-size 16 --accum-iter 1" in capsys.readouterr().err
    official = _with_world(tmp_path / "a" / "checkpoint-1.pt", tmp_path / "official.pt", 2)
    ck = torch.load(official, weights_only=False)
    ck["run"]["exact_ddp_grad"] = False
    torch.save(ck, official)
    assert main([*args[:-1], official, "--no-exact-ddp-grad", "--batch-size", "16", "--out", str(tmp_path / "f")]) == 2
    assert "--resume-override batch_size,world_size" in capsys.readouterr().err


def test_weights_overflowed_by_an_update_stop_before_the_checkpoint(tmp_path, monkeypatch, capsys):
    # was: --lr 1e30 --weight-decay 1e10 saved +-inf weights, exit 0 (now refused first: the next test); any
    # update that leaves a weight non-finite with a finite loss and gradient is caught at the checkpoint
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--ckpt-every", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the weights are not finite after the update of step 1" in err and len(err.strip().splitlines()) == 1, err
    assert not [f for f in os.listdir(out) if f.startswith("checkpoint")]


@pytest.mark.parametrize("flags,msg", [
    (["--lr", "1e30", "--weight-decay", "1e10"], "--weight-decay 1e+10 with the peak lr 1e+30 (--lr)"),
    (["--blr", "1", "--weight-decay", "100"], "--weight-decay 100 with the peak lr 0.03125 (--blr's lr"),
    (["--lr", "1e-3", "--min-lr", "1"], "--min-lr 1 is above the peak lr 0.001 (--lr)"),
])
def test_flags_whose_joint_effect_is_certain_to_fail_are_refused(tmp_path, capsys, flags, msg):
    tiny = [a for a in TINY if a not in ("--lr", "1e-3")]
    assert main(["train", *tiny, "--steps", "1", *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "log.jsonl").exists() or not (tmp_path / "run" / "log.jsonl").read_text()

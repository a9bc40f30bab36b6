"""Bad input gets one line naming the problem and a non-zero exit, not a
traceback and not exit 0."""
import errno
import os
import subprocess
import sys

import pytest
import torch
from umae_testing import HANG_GUARD

from umae.cli.main import main

TINY = ["--model", "umae_vit_micro_patch4_32", "--builtin-size", "64", "--batch-size", "8", "--lr", "1e-3",
        "--num-workers", "0", "--no-progress"]


def _err(capsys, argv, rc=2):
    got = main(argv)
    err = capsys.readouterr().err
    assert got == rc, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, msg", [
    (["train", "--steps", "-5"], "--steps must be >= 0, got -5"),
    (["train", "--ckpt-every", "-1"], "--ckpt-every must be >= 0, got -1"),
    (["train", "--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
    (["train", "--lamb", "-1"], "--lamb must be >= 0, got -1.0"),
    (["train", "--lamb", "nan"], "--lamb must be >= 0, got nan"),
    (["train", "--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
    (["train", "--lr", "0"], "--lr must be > 0, got 0.0"),
    (["train", "--blr", "-1"], "--blr must be > 0, got -1.0"),
    (["train", "--min-lr", "-1"], "--min-lr must be >= 0, got -1.0"),
    (["train", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["train", "--lr", "inf"], "--lr must be a finite number, got inf"),
    (["train", "--blr", "inf"], "--blr must be a finite number, got inf"),
    (["train", "--lamb", "inf"], "--lamb must be a finite number, got inf"),
    (["train", "--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["train", "--min-lr", "inf"], "--min-lr must be a finite number, got inf"),
    (["train", "--clip-grad", "inf"], "--clip-grad must be a finite number, got inf"),
    (["train", "--mask-ratio", "inf"], "--mask-ratio must be in [0, 1), got inf"),
    (["reproduce", "--lambdas", "0", "inf"], "--lambdas must be finite and >= 0, got inf"),
    (["reproduce", "--lambdas", "0.1", "0.1000001"], "--lambdas 0.1 and 0.1000001 are the same run (lamb_0.1)"),
    (["reproduce", "--lambdas", "0", "0"], "--lambdas 0.0 and 0.0 are the same run (lamb_0)"),
    (["train", "--resume-override", "lamb"], "--resume-override 'lamb' needs --resume"),
    (["train", "--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead needs --compile"),
    (["train", "--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    (["train", "--device", "meta"], "--device 'meta': umae runs on cpu or cuda, not meta"),
    (["train", "--model", "resnet18"], "--model 'resnet18' is a timm model, not a umae MAE model"),
    (["train", "--lr", "1e39"], "--lr must be at most 1e30, got 1e+39"),
    (["train", "--blr", "1e39"], "--blr must be at most 1e30, got 1e+39"),
    (["train", "--builtin-size", "1000000000000"], "--builtin-size must be at most 1,000,000, got 1,000,000,000,000"),
    (["train", "--seed", str(1 << 63)], f"--seed must be in [0, 2**63), got {1 << 63}"),
    (["reproduce", "--steps", "-1"], "--steps must be >= 1, got -1"),
    (["reproduce", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["reproduce", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["eval", "--ckpt", "x.pt", "--knn-k", "0"], "--knn-k must be >= 1, got 0"),
    (["eval", "--ckpt", "x.pt", "--holdout", "0"], "--holdout must be in (0, 1), got 0.0"),
    (["eval", "--ckpt", "x.pt", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["train", "--device", "cpu:1"], "--device 'cpu:1': there is one CPU device (cpu, or cpu:0)"),
])
def test_invalid_values_are_refused(tmp_path, capsys, argv, msg):
    assert msg in _err(capsys, argv + ["--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # refused before anything ran


@pytest.mark.parametrize("ratio,shown", [("nan", "nan"), ("inf", "inf"), ("-1", "-1.0"), ("2", "2.0"), ("1", "1.0")])
def test_convert_refuses_a_mask_ratio_out_of_range(tmp_path, capsys, ratio, shown):
    # was: accepted, and written into the transformers config
    out = tmp_path / "hf"
    assert f"--mask-ratio must be in [0, 1), got {shown}" in _err(
        capsys, ["convert", str(tmp_path / "x.pth"), str(out), "--to", "hf", "--mask-ratio", ratio])
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path, capsys):
    assert "--device 'cuda': no CUDA GPU is available" in _err(capsys, ["train", "--device", "cuda", "--out",
                                                                         str(tmp_path)])
    # was: torch's "Found no NVIDIA driver" traceback
    assert "umae bench: --device cuda: no CUDA GPU is available here" in _err(capsys, ["bench", "--device", "cuda"])


def _image_folder(root, bad_name, bad_bytes):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (60 * i, 40, 200)).save(root / c / f"{i}.png")
    bad = root / "a" / bad_name
    if bad_bytes is None:
        os.symlink(root / "gone.png", bad)  # unreadable: a dangling link
    else:
        bad.write_bytes(bad_bytes(root / "b" / "0.png"))
    return bad


@pytest.mark.parametrize("kind, name, bad_bytes, workers", [
    ("corrupt", "x.png", lambda good: b"\x89PNG not really" * 20, 0),
    ("truncated", "x.png", lambda good: good.read_bytes()[:60], 0),
    ("empty", "x.jpg", lambda good: b"", 0),
    ("unreadable", "x.png", None, 0),
    ("corrupt, in a loader worker", "x.bmp", lambda good: b"BM" + b"\0" * 50, 1),
])
def test_bad_image_names_the_file(tmp_path, capsys, kind, name, bad_bytes, workers):
    bad = _image_folder(tmp_path / "data", name, bad_bytes)
    argv = ["train", *TINY, "--data", str(tmp_path / "data"), "--batch-size", "9", "--steps", "1",
            "--num-workers", str(workers), "--out", str(tmp_path / "o")]
    err = _err(capsys, argv)
    assert f"cannot read the image {str(bad)!r} in --data" in err, err


def _ckpts(tmp_path):
    """A valid run's checkpoint, and the bad files made from it."""
    main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "run")])
    good = (tmp_path / "run" / "checkpoint-1.pt").read_bytes()
    bad = {"corrupt": b"\x00garbage" * 100, "truncated": good[:len(good) // 2], "empty": b"",
           "not a checkpoint": None}
    paths = {}
    for k, v in bad.items():
        p = tmp_path / f"{k.replace(' ', '_')}.pt"
        if v is None:
            torch.save([1, 2, 3], p)
        else:
            p.write_bytes(v)
        paths[k] = p
    return paths


def test_bad_checkpoints(tmp_path, capsys):
    for kind, p in _ckpts(tmp_path).items():
        for cmd in (["train", *TINY, "--steps", "2", "--resume", str(p), "--out", str(tmp_path / "o")],
                    ["eval", "--ckpt", str(p), "--out", str(tmp_path / "e")]):
            err = _err(capsys, cmd)
            flag = "--resume" if cmd[0] == "train" else "--ckpt"
            assert f"{flag} {str(p)!r} is not" in err, (kind, err)


def test_resume_of_a_model_only_checkpoint(tmp_path, capsys):
    import timm

    from umae import models  # noqa: F401

    m = timm.create_model("umae_vit_micro_patch4_32", fused=False)
    torch.save({"model": m.state_dict()}, tmp_path / "mae_pretrain.pth")  # facebookresearch/mae's format
    err = _err(capsys, ["train", *TINY, "--resume", str(tmp_path / "mae_pretrain.pth"), "--out", str(tmp_path / "o")])
    assert "is a model-only checkpoint" in err and "cannot be resumed" in err, err
    err = _err(capsys, ["eval", "--ckpt", str(tmp_path / "mae_pretrain.pth"), "--model", "umae_vit_tiny_patch4_32",
                        "--out", str(tmp_path / "e")])  # weights of another size
    assert f"--ckpt {str(tmp_path / 'mae_pretrain.pth')!r} does not fit the model" in err, err


def test_out_is_a_file_or_not_writable(tmp_path, capsys, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    for cmd in (["train", *TINY, "--steps", "1"], ["eval", "--ckpt", str(f)], ["reproduce"]):
        assert f"--out {str(f)!r} is a file, not a directory" in _err(capsys, cmd + ["--out", str(f)])
    real = os.open

    def read_only(path, *a, **k):  # the tests run as root, whom chmod does not stop
        if os.path.dirname(str(path)) == str(tmp_path / "ro"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    # each command finds it before its work (eval and reproduce used to fail at the end, writing)
    for cmd in (["train", *TINY, "--steps", "1"], ["eval", "--ckpt", str(f)], ["reproduce"]):
        err = _err(capsys, cmd + ["--out", str(tmp_path / "ro")])
        assert f"--out {str(tmp_path / 'ro')!r} cannot be written: Permission denied" in err, err


def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "umae.cli.main", *argv], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=HANG_GUARD)


def test_cli_process_one_line_and_exit_code(tmp_path):
    r = _cli("train", "--steps", "-5", "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == "umae train: error: --steps must be >= 0, got -5", r.stderr
    (tmp_path / "empty.pt").write_bytes(b"")
    r = _cli("eval", "--ckpt", str(tmp_path / "empty.pt"), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "is not a readable checkpoint" in r.stderr


def test_bogus_backend_env(tmp_path):
    r = _cli("info", env=dict(UMAE_BACKEND="bogus"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "UMAE_BACKEND" in r.stderr, r.stderr


def test_reproduce_refuses_an_out_holding_previous_runs(tmp_path, capsys):
    import argparse

    from umae.research import reproduce

    (tmp_path / "lamb_0.1").mkdir()
    (tmp_path / "lamb_0.1" / "checkpoint-4.pt").write_bytes(b"x")  # the last lambda's: found before any run
    err = _err(capsys, ["reproduce", "--steps", "1", "--out", str(tmp_path)])
    assert f"--out {str(tmp_path)!r} holds a previous reproduce's runs ({tmp_path / 'lamb_0.1'}: checkpoint-4.pt)" in err
    assert "--overwrite" in err and not (tmp_path / "lamb_0").exists()
    p = argparse.ArgumentParser()
    reproduce.add_args(p)
    a = p.parse_args(["--steps", "1", "--overwrite", "--out", str(tmp_path)])
    reproduce.validate(a)  # --overwrite: accepted (each run's train removes the old files)
    a.warmup_steps = None
    assert reproduce._train_config(a, reproduce.PRESETS[a.preset], 0.1, str(tmp_path / "lamb_0.1"), 1, 1, "").overwrite


def test_resume_malformed_checkpoint_entries(tmp_path, capsys):
    # each names --resume and the file, and what does not fit: no traceback, no torch message alone
    main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "run")])
    good = torch.load(tmp_path / "run" / "checkpoint-1.pt", weights_only=False)
    cases = {
        "run_none": (dict(run=None), "'run' is NoneType, not a dict"),
        "step_str": (dict(step="x"), "'step' is 'x', not a step count"),
        "step_neg": (dict(step=-1), "'step' is -1, not a step count"),
        "opt_empty": (dict(optimizer={}), "its optimizer state does not fit this run's AdamW: no entry 'param_groups'"),
        "opt_list": (dict(optimizer=[1]), "'optimizer' is list, not a dict"),
        "model_none": (dict(model=None), "'model' is NoneType, not a dict"),
        "model_bad": (dict(model={"pos_embed": "x"}), "does not fit the model"),
        "no_run": (dict(run=...), "its optimizer state does not fit this run's AdamW: loaded state dict contains "
                                  "a parameter group"),
    }
    for name, (change, msg) in cases.items():
        ck = {k: v for k, v in {**good, **change}.items() if v is not ...}
        p = tmp_path / f"{name}.pt"
        torch.save(ck, p)
        err = _err(capsys, ["train", *TINY, "--steps", "2", "--resume", str(p), "--out", str(tmp_path / name)])
        assert f"--resume {str(p)!r}" in err and msg in err, (name, err)
    assert "try --decay-tokens or --no-decay-tokens" in err
    # a checkpoint without its run record resumes with the choice it was trained with
    assert main(["train", *TINY, "--steps", "2", "--decay-tokens", "--resume", str(tmp_path / "no_run.pt"),
                 "--out", str(tmp_path / "no_run2")]) == 0, capsys.readouterr().err


def test_convert_to_hf_onto_a_file_is_refused(tmp_path, capsys):
    # was: transformers' save_pretrained logged and returned; convert printed "wrote" over nothing written
    out = tmp_path / "model.bin"
    out.write_text("keep me")
    assert "is a file, not a folder; --to hf writes a folder" in _err(capsys, ["convert", str(tmp_path / "x.pth"), str(out),
                                                                "--to", "hf"])
    assert out.read_text() == "keep me"


# ---- the grid: every subcommand, every flag that takes a value, invalid values and malformed files ----

BAD_NUMBERS = ("nan", "inf", "-1", "1e39", "x")
# values a flag takes with a meaning (not refused): clip at 1e39 is no clipping; torch seeds any int
VALID = {("train", "--clip-grad", "1e39"), ("check", "--seed", "-1")}
# the value flags that name a file or folder to read, and those that name one to write
READS = {("train", "--resume"), ("train", "--data"), ("eval", "--ckpt"), ("eval", "--data"), ("reproduce", "--data"),
         ("report", "--results"), ("report", "--readme"), ("convert", "src")}
WRITES = {("train", "--out"): "folder", ("eval", "--out"): "folder", ("reproduce", "--out"): "folder",
          ("bench", "--out"): "folder", ("check", "--junit"): "file", ("convert", "out"): "file"}


@pytest.fixture(scope="module")
def grid_files(tmp_path_factory):
    """A valid checkpoint, and malformed files of every kind a flag may be given."""
    root = tmp_path_factory.mktemp("grid")
    assert main(["train", *TINY, "--steps", "1", "--out", str(root / "run")]) == 0
    good = root / "run" / "checkpoint-1.pt"
    flipped = bytearray(good.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10  # one bit, inside a tensor: torch.load alone loads it
    (root / "folder").mkdir()
    bad = {"missing": root / "missing.pt", "folder": root / "folder", "empty": b"", "garbage": b"\x00garbage" * 100,
           "truncated": good.read_bytes()[:5000], "bit-flipped": bytes(flipped), "bad json": b"{not json",
           "json list": b"[1, 2]", "not utf-8": b"\x80\x81" * 10}
    (root / "README.md").write_text("<!-- perf-table:start -->\n<!-- perf-table:end -->\n")  # report's, valid
    files = {}
    for k, v in bad.items():
        files[k] = v if isinstance(v, type(root)) else root / k.replace(" ", "_")
        if isinstance(v, bytes):
            files[k].write_bytes(v)
    return root, good, files


def _bases(root, good):
    return {"train": ["train", *TINY, "--steps", "1"], "eval": ["eval", "--ckpt", str(good), "--max-images", "16"],
            "reproduce": ["reproduce", "--steps", "1"],
            "report": ["report", "--results", str(root / "folder"), "--readme", str(root / "README.md")],
            "check": ["check", "--ops", "patchify", "--dtypes", "float32"],
            "bench": ["bench", "--ops", "patchify", "--providers", "fused", "--no-progress"],
            "convert": ["convert", str(good), str(root / "converted.pth"), "--to", "mae"], "info": ["info"]}


def _grid(root, good, files):
    """(subcommand, flag, value, argv) of every case: each must end in one line naming the flag, the value
    or the file, and a non-zero exit."""
    import argparse

    from umae.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bases = _bases(root, good)
    for cmd, p in sub.choices.items():
        assert cmd in bases, f"umae {cmd} is not in the grid"
        for a in p._actions:
            if a.nargs == 0 or isinstance(a, argparse._HelpAction):
                continue
            flag = a.option_strings[-1] if a.option_strings else a.dest
            if a.choices is not None:
                values = ["bogus"]
            elif a.type in (int, float):
                values = [v for v in BAD_NUMBERS if (cmd, flag, v) not in VALID]
            elif (cmd, flag) in READS:
                values = [str(f) for k, f in files.items() if not (k == "folder" and flag in ("--data", "src",
                                                                                           "--results"))]
                if flag in ("--data", "--results"):  # a folder is wanted: files, and a folder of nothing
                    values = [str(files["folder"]) + "/missing", str(files["empty"])]
            elif (cmd, flag) in WRITES:
                values = [str(root / "no" / "parent" / "x")] if flag in ("out", "--junit") else []
                values.append(str(files["empty"]) if WRITES[cmd, flag] == "folder" else str(files["folder"]))
            else:  # a name: of a model, a device, an op
                values = ["bogus"]
            for v in values:
                if a.option_strings:
                    argv = [*bases[cmd], flag, v]
                else:  # a positional: replace it in the base
                    argv = list(bases[cmd])
                    argv[[x.dest for x in p._actions if not x.option_strings].index(a.dest) + 1] = v
                if "--out" in p._option_string_actions and flag != "--out":
                    argv += ["--out", str(root / f"out-{cmd}")]
                yield cmd, flag, v, argv


def test_every_flag_refuses_invalid_values_and_malformed_files(grid_files, capsys):
    root, good, files = grid_files
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    wrong, n = [], 0
    for cmd, flag, value, argv in _grid(root, good, files):
        n += 1
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage and one error line naming the flag
            rc = e.code
        except Exception as e:  # a traceback
            capsys.readouterr()
            wrong.append(f"{cmd} {flag} {value!r}: raised {type(e).__name__}: {e}")
            continue
        err = capsys.readouterr().err.strip().splitlines()
        last = err[-1] if err else ""
        named = flag in last or value in last or (flag in ("src", "out") and f"{flag} " in last)
        if rc == 0 or not named or "Traceback" in "\n".join(err) or (len(err) > 1 and not err[0].startswith("usage")):
            wrong.append(f"{cmd} {flag} {value!r}: exit {rc}, stderr {err[-3:]}")
    assert n > 150, n  # the grid reaches every subcommand's flags
    print(f"{n} cases")
    assert not wrong, f"{len(wrong)} of {n} cases:\n" + "\n".join(wrong)
    # refused before writing: every file as it was (the bit-flipped checkpoint was not resumed into a run)
    assert {p: p.read_bytes() for p in before} == before
    assert not (root / "converted.pth").exists()
    assert not [p.name for p in root.glob("out-*/*") if p.suffix in (".pt", ".jsonl")]  # no run began


def test_a_bit_flipped_checkpoint_is_refused_by_its_checksum(grid_files, capsys):
    # was: torch.load loaded the damaged tensor; the run resumed (and eval, convert read it) silently
    root, good, files = grid_files
    p = str(files["bit-flipped"])
    for argv, flag in ((["train", *TINY, "--steps", "2", "--resume", p, "--out", str(root / "flip")], "--resume"),
                       (["eval", "--ckpt", p, "--out", str(root / "flip-eval")], "--ckpt"),
                       (["convert", p, str(root / "flip.pth"), "--to", "mae"], "src")):
        err = _err(capsys, argv)
        assert f"{flag} {p!r} is damaged: its record" in err and "fails its CRC-32 checksum" in err, err


def test_eval_refuses_what_it_cannot_measure(grid_files, capsys):
    root, good, _ = grid_files
    ck = torch.load(good, weights_only=False)
    nan = dict(ck, model={k: v.clone().fill_(float("nan")) if v.is_floating_point() else v
                          for k, v in ck["model"].items()})
    cases = {"nan": (nan, "holds non-finite weights"),  # was: a LinAlgError traceback
             "run_str": (dict(ck, run="x"), "its run record is a str, not a dict"),  # was: TypeError
             "run_lamb": (dict(ck, run=dict(ck["run"], lamb="x")), "its run record is malformed: 'lamb' is 'x'"),
             "run_empty": (dict(ck, run={}), "its run record names no model"),  # was: KeyError
             "run_model": (dict(ck, run=dict(ck["run"], model="nope")), "'s recorded model 'nope' is not registered")}
    for name, (c, msg) in cases.items():
        p = root / f"eval-{name}.pt"
        torch.save(c, p)
        assert msg in _err(capsys, ["eval", "--ckpt", str(p), "--out", str(root / "e")]), name
    # one image: the probes' standardization divided by a NaN spread (was: a traceback)
    assert "--max-images must be >= 2, got 1" in _err(capsys, ["eval", "--ckpt", str(good), "--max-images", "1",
                                                              "--out", str(root / "e")])


def test_convert_writes_whole_or_not_at_all(grid_files, capsys, monkeypatch):
    from umae import convert

    root, good, _ = grid_files
    out, hf = root / "whole.pth", root / "whole-hf"
    out.write_bytes(b"the previous file")
    (hf).mkdir()
    (hf / "config.json").write_text("{}")

    def dies(obj, f, *a, **k):  # a full disk halfway through the file
        (f.write if hasattr(f, "write") else open(f, "wb").write)(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", dies)
    assert "disk full while writing" in _err(capsys, ["convert", str(good), str(out), "--to", "mae"])
    monkeypatch.undo()
    assert out.read_bytes() == b"the previous file"  # was: a partial file in its place
    assert sorted(p.name for p in root.iterdir() if ".tmp" in p.name) == []
    assert main(["convert", str(good), str(out), "--to", "mae"]) == 0
    assert convert.load_mae(out, "umae_vit_micro_patch4_32").state_dict().keys()
    # a folder is replaced as a whole: nothing of the old one is left beside the new
    (hf / "stale.bin").write_bytes(b"x")
    assert main(["convert", str(good), str(hf), "--to", "hf"]) == 0
    assert not (hf / "stale.bin").exists() and (hf / "config.json").read_text() != "{}"
    capsys.readouterr()


def test_malformed_results_files_are_named(tmp_path, capsys):
    run = tmp_path / "results" / "dev" / "2026-01-01"
    run.mkdir(parents=True)
    (tmp_path / "README.md").write_text("<!-- perf-table:start -->\nkeep\n<!-- perf-table:end -->\n")
    for text, msg in (("{bad", "is not valid JSON"), ("[1]", "holds a JSON list, not an object"),
                      ('{"rows": 1}', "is not a umae bench results file")):
        (run / "results.json").write_text(text)
        err = _err(capsys, ["report", "--results", str(tmp_path / "results"), "--readme", str(tmp_path / "README.md")])
        assert f"--results' {str(run / 'results.json')!r}" in err and msg in err, err
        # --append finds it before the run, not after it
        err = _err(capsys, ["bench", "--ops", "patchify", "--append", "--out", str(run), "--no-progress"])
        assert f"--append's {str(run / 'results.json')!r}" in err and msg in err, err
    assert "keep" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("damage", ["empty", "corrupt"])
def test_a_damaged_cifar_folder_is_named(tmp_path, capsys, damage):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    if damage == "corrupt":
        for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                  "batches.meta"):
            (folder / f).write_bytes(b"\x80\x04garbage")
    err = _err(capsys, ["train", *TINY, "--data", str(tmp_path / "cifar"), "--out", str(tmp_path / "o")])
    assert f"--data {str(tmp_path / 'cifar')!r}: cifar-10-batches-py is not a complete, intact copy" in err, err


def test_whole_writes_survive_a_failure_between_the_two_renames(tmp_path, monkeypatch):
    # a folder is replaced by renaming the old one aside, then the new one in: a failure between the two
    # puts the old one back (was: the output folder gone, the old one left hidden)
    from umae import _files

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    real, calls = os.replace, []

    def second_fails(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error", str(b))
        return real(a, b)
    monkeypatch.setattr(os, "replace", second_fails)

    def write(tmp):
        os.makedirs(tmp)
        open(os.path.join(tmp, "config.json"), "w").write("new")
    with pytest.raises(OSError):
        _files.write_whole(str(out), write)
    monkeypatch.undo()
    assert (out / "config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    _files.write_whole(str(out), write)  # and the next write goes through
    assert (out / "config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_damaged_zip_directory_is_one_line_and_a_checksum_free_file_loads(grid_files, tmp_path, capsys):
    import zipfile

    root, good, _ = grid_files
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        first = z.infolist()[0]
    cd = data.find(b"PK\x01\x02")  # the first central directory entry
    for name, offset, value in (("method", 10, 8), ("encrypted", 8, 1)):  # compression 0 -> 8; the encryption flag
        bad = bytearray(data)
        bad[cd + offset] = value
        p = tmp_path / f"{name}.pt"
        p.write_bytes(bytes(bad))
        err = _err(capsys, ["eval", "--ckpt", str(p), "--out", str(tmp_path / "e")])
        assert f"--ckpt {str(p)!r} is" in err, (name, err)  # was: zlib.error / RuntimeError tracebacks
    assert first.CRC != 0
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(torch.load(good, weights_only=False), tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    from umae import _files

    assert _files.read_checkpoint(str(tmp_path / "nocrc.pt"), "--ckpt")["step"] == 1  # no checksums: not "damaged"


def test_convert_to_hf_does_not_replace_a_folder_of_other_files(grid_files, tmp_path, capsys):
    _, good, _ = grid_files
    home = tmp_path / "models"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    err = _err(capsys, ["convert", str(good), str(home), "--to", "hf"])
    assert "holding other files" in err and (home / "notes.txt").read_text() == "mine"



# ---- files that are not regular, kills between renames, records that disagree ---------------------------

@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_writers_never_replace_a_special_file(grid_files, tmp_path, capsys, kind):
    # was: convert and check --junit replaced a FIFO (as root: /dev/null) with a regular file, exit 0
    root, good, _ = grid_files
    target = tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target = "/dev/null"
    for argv in (["convert", str(good), str(target), "--to", "mae"],
                 ["check", "--ops", "patchify", "--dtypes", "float32", "--junit", str(target)]):
        err = _err(capsys, argv)
        assert "not a regular file" in err and str(target) in err, err
    assert os.path.exists(target) and not os.path.isfile(target)


def test_an_empty_junit_path_is_refused(capsys):
    # was: check --junit "" wrote nothing and said nothing
    assert "--junit is an empty path" in _err(capsys, ["check", "--ops", "patchify", "--junit", ""])


def test_a_symlink_is_written_through(grid_files, tmp_path, capsys):
    root, good, _ = grid_files
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "m.pth").write_bytes(b"old")
    os.symlink(tmp_path / "real" / "m.pth", tmp_path / "link.pth")
    assert main(["convert", str(good), str(tmp_path / "link.pth"), "--to", "mae"]) == 0
    assert os.path.islink(tmp_path / "link.pth")  # still the link, the file it names replaced
    assert torch.load(tmp_path / "real" / "m.pth", weights_only=False)["model"].keys()
    assert sorted(os.listdir(tmp_path / "real")) == ["m.pth"]
    capsys.readouterr()


_KILLED = """
import os, signal, sys
from umae import _files
out, when = sys.argv[1], sys.argv[2]
real, calls = os.replace, []
def replace(a, b):
    calls.append(a)
    if when == "between" and len(calls) == 2:  # the old folder is aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)
os.replace = replace
def write(tmp):
    os.makedirs(tmp)
    open(os.path.join(tmp, "config.json"), "w").write("new")
    if when == "mid-write":
        os.kill(os.getpid(), signal.SIGKILL)
_files.write_whole(out, write)
"""


@pytest.mark.parametrize("when", ["between", "mid-write"])
def test_a_kill_during_a_folder_swap_is_put_right_by_the_next_run(tmp_path, when):
    # was: a SIGKILL between the two renames left nothing at OUT (the old model only in a hidden .OUT.tmp-PID-old
    # nothing restores), and one mid-write left .OUT.tmp-PID forever
    from umae import _files

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    r = subprocess.run([sys.executable, "-c", _KILLED, str(out), when], timeout=HANG_GUARD)
    assert r.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left != ["model"]  # the kill left something to put right (the test can fail)
    _files.check_target(str(out), "out", folder=True)  # what a later run does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "config.json").read_text() == "old"


def test_a_damaged_log_line_is_named_on_resume(tmp_path, capsys):
    # was: an invalid UTF-8 byte in log.jsonl stopped --resume with a codec error naming no file
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "1", "--out", str(out)]) == 0
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": 1, "loss": \xff}\n')
    before = (out / "log.jsonl").read_bytes()
    err = _err(capsys, ["train", *TINY, "--steps", "2", "--resume", str(out / "checkpoint-1.pt"), "--out", str(out)])
    assert f"{str(out / 'log.jsonl')!r} is damaged: line 2 is not UTF-8" in err, err
    assert (out / "log.jsonl").read_bytes() == before


def test_a_recorded_architecture_is_never_replaced(grid_files, tmp_path, capsys):
    # was: convert --model replaced the .pth's recorded layer norm eps (1e-12 -> 1e-6: outputs moved 2.7e-5);
    # eval and train --resume built the model from the record's name and ignored its config. Now eval builds
    # the recorded architecture; --model, or a resume's name, that disagrees with it is refused
    root, good, _ = grid_files
    ck = torch.load(good, weights_only=False)
    ck["config"] = dict(ck["config"], norm_eps=1e-12)
    torch.save(ck, tmp_path / "eps.pt")
    src = str(tmp_path / "eps.pt")
    err = _err(capsys, ["convert", src, str(tmp_path / "o.pth"), "--to", "mae", "--model", "umae_vit_micro_patch4_32"])
    assert "records norm_eps=1e-12 where --model umae_vit_micro_patch4_32 has norm_eps=1e-06" in err
    assert "drop --model" in err and not (tmp_path / "o.pth").exists()
    assert main(["convert", src, str(tmp_path / "o.pth"), "--to", "mae"]) == 0  # the record's own
    assert torch.load(tmp_path / "o.pth", weights_only=False)["config"]["norm_eps"] == 1e-12
    capsys.readouterr()
    from umae.research.evaluate import load_model

    model, _, _ = load_model(src, "cpu")  # eval keeps the record: the model of the recorded architecture
    assert model.norm.eps == 1e-12
    model, _, _ = load_model(str(tmp_path / "o.pth"), "cpu")  # a converted file: no run record, no --model needed
    assert model.norm.eps == 1e-12
    err = _err(capsys, ["eval", "--ckpt", src, "--model", "umae_vit_micro_patch4_32", "--max-images", "16",
                        "--out", str(tmp_path / "e")])
    assert "records norm_eps=1e-12 where --model umae_vit_micro_patch4_32 has norm_eps=1e-06" in err
    err = _err(capsys, ["train", *TINY, "--steps", "2", "--resume", src, "--out", str(tmp_path / "r")])
    assert "records norm_eps=1e-12" in err
    ck["config"] = dict(ck["config"], norm_eps=1e-6, norm_pix_loss=False)  # a loss setting, not the architecture
    torch.save(ck, tmp_path / "nopix.pt")
    assert load_model(str(tmp_path / "nopix.pt"), "cpu", "umae_vit_micro_patch4_32")[0].norm.eps == 1e-6


def test_convert_refuses_non_finite_weights_as_eval_does(grid_files, tmp_path, capsys):
    root, good, _ = grid_files
    ck = torch.load(good, weights_only=False)
    ck["model"]["cls_token"] = ck["model"]["cls_token"] * float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    for to in ("mae", "hf"):
        err = _err(capsys, ["convert", str(tmp_path / "nan.pt"), str(tmp_path / f"out-{to}"), "--to", to])
        assert "holds non-finite weights (1 tensors, e.g. cls_token)" in err and not (tmp_path / f"out-{to}").exists()


def test_convert_onto_a_full_disk_or_from_a_truncated_folder_is_one_line(grid_files, tmp_path, capsys):
    # was: tracebacks: "inline_container.cc ... unexpected pos" (.pth), SafetensorError (HF), and for a
    # truncated safetensors file
    root, good, _ = grid_files
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    except OSError:
        r = None
    if r is not None and r.returncode == 0:
        try:
            for to, name in (("mae", "m.pth"), ("hf", "hf")):
                err = _err(capsys, ["convert", str(good), str(mnt / name), "--to", to])
                assert f"disk full while writing {mnt / name}" in err, err
                assert os.listdir(mnt) == []
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    assert main(["convert", str(good), str(tmp_path / "hf"), "--to", "hf"]) == 0
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    capsys.readouterr()
    err = _err(capsys, ["convert", str(tmp_path / "hf"), str(tmp_path / "back.pth"), "--to", "mae"])
    assert "is not a readable ViTMAE folder: SafetensorError" in err, err


def test_patchify_of_no_channel_or_no_pixel_is_refused_by_name():
    # was: the forward ran and the backward failed naming unpatchify
    import umae

    for shape in ((2, 0, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0)):
        with pytest.raises(ValueError, match="imgs must have at least one channel, row and column"):
            umae.patchify(torch.randn(*shape, requires_grad=True), 4)

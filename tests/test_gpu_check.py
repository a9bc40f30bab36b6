"""scripts/gpu_check.sh, the one command for a lent GPU machine, run here as its dry run (every
stage's code at tiny sizes on CPU), so that it cannot rot between leases."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import umae
from umae_testing import HANG_GUARD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["env", "build", "tests", "sanitize", "profile", "ops", "unif", "train", "compile", "host", "tune",
          "video", "video_step", "done (status 0)"]


@pytest.mark.gpucheck
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script is run for real, not as a test")
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    # the tests stage's code with one small file (the suite itself runs around this test)
    env.update(OUT=str(tmp_path), PY=sys.executable, TEST_ARGS="tests/test_patchify.py -k opcheck")
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=HANG_GUARD)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    heads = [re.sub(r" \(\d\d:\d\d:\d\d\)$", "", line[3:]) for line in r.stdout.splitlines() if line.startswith("== ")]
    assert heads == ["env: dry run (CPU, tiny sizes)"] + STAGES[1:], heads
    assert "!!" not in r.stdout, log[-4000:]
    files = set(os.listdir(tmp_path))
    assert {"env.txt", "build.log", "tests.log", "bench.log", "results.json", "host.json",
            "profile.json"} <= files and len(files) <= 8, files  # the device tool returns 8 files at most
    assert "=== sanitize" in open(tmp_path / "tests.log").read()  # its log, in tests.log
    assert "on a GPU only" in open(tmp_path / "bench.log").read()  # the tune stage: nothing to time on CPU
    assert "tree: " in open(tmp_path / "env.txt").read()
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    timed = {(r["op"], r["shape"], r["provider"]) for r in rows if "ms" in r}
    for op in ("patchify", "unpatchify", "masked_mse_loss", "mae_loss", "random_masking", "restore_tokens",
               "uniformity_loss", "tubelet_patchify", "tubelet_unpatchify", "videomae_loss"):
        for provider in ("fused", "eager"):
            assert (op, "tiny", provider) in timed, (op, provider)
    # the compiled providers: one op (the dry run's compile stage)
    for provider in ("compile", "fused+compile"):
        assert ("uniformity_loss", "unif_tiny", provider) in timed, provider
    for op in ("train_step", "mae_train_step", "hf_train_step", "hf_video_train_step", "video_train_step"):
        for provider in ("fused", "eager"):
            assert (op, "tiny", provider) in timed, (op, provider)
    assert ("uniformity_loss", "unif_tiny", "eager") in timed
    steps = [r for r in rows if r.get("mode") == "step" and "ms" in r]
    assert all(r["img_per_s"] > 0 and r["step_flops"] > 0 for r in steps), steps
    host = json.load(open(tmp_path / "host.json"))
    assert [r["op"] for r in host["rows"]] == list(umae.ops.registry.OPS) and host["step"]["step"]["fused"] > 0
    assert "| uniformity_loss |" in open(tmp_path / "bench.log").read()
    prof = json.load(open(tmp_path / "profile.json"))["rows"]
    assert [r["provider"] for r in prof] == ["fused", "eager"] and all(r["launches"] > 0 and r["top"] for r in prof)

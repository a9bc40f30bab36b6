"""umae reproduce at CI size: every file of the report, with numbers from umae eval's code."""
import argparse
import json
import os

import pytest
import torch

from umae.research import evaluate, reproduce

pytestmark = pytest.mark.slow  # end-to-end runs of the trainer and the evaluator (each tested on its own)


def test_reproduce_writes_the_report(tmp_path):
    p = argparse.ArgumentParser()
    reproduce.add_args(p)
    a = p.parse_args(["--steps", "4", "--model", "umae_vit_micro_patch4_32", "--batch-size", "32",
                      "--lambdas", "0", "0.1", "--eval-images", "200", "--out", str(tmp_path), "--no-progress",
                      "--num-workers", "0"])
    res = reproduce.reproduce(a)
    for f in ("report.md", "spectrum.png", "curves.png", "eval.json", "curves.json"):
        assert os.path.getsize(tmp_path / f) > 200, f
    for d in ("lamb_0", "lamb_0.1"):
        assert os.path.isfile(tmp_path / d / "checkpoint-last.pt") and os.path.isfile(tmp_path / d / "log.jsonl")
    report = (tmp_path / "report.md").read_text()
    rows = [r for r in report.splitlines() if r.startswith("| MAE") or r.startswith("| U-MAE")]
    assert len(rows) == 4 and "steps 4" in report and "data digits" in report
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert set(curves) == {"MAE", "U-MAE (lambda 0.1)"}
    for c in curves.values():  # the loss terms logged, the rank at every saved checkpoint
        assert c["log"][-1]["step"] == 4 and len(c["rank"]) >= 2 and all(r > 1 for _, r in c["rank"])
    # the report's numbers are umae eval's, on the same checkpoint
    e = argparse.ArgumentParser()
    evaluate.add_args(e)
    ev = evaluate.evaluate(e.parse_args(["--ckpt", str(tmp_path / "lamb_0.1" / "checkpoint-last.pt"), "--pool", "cls",
                                         "--max-images", "200", "--out", str(tmp_path / "ev")]))["results"][0]
    mine = next(r for r in res["results"] if r["run"] == "U-MAE (lambda 0.1)" and r["pool"] == "cls")
    for k in ("effective_rank", "effective_rank_cov", "linear_probe_acc", "knn_acc"):
        assert abs(ev[k] - mine[k]) < 1e-6, k
    assert (f"{mine['effective_rank']:.1f} | {mine['effective_rank_cov']:.1f} | {mine['linear_probe_acc']:.3f}"
            in report)
    assert curves["U-MAE (lambda 0.1)"]["rank"][-1] == [4, mine["effective_rank"]]  # the curve ends at eval's point
    assert evaluate.SPECTRUM in json.loads((tmp_path / "eval.json").read_text())["effective_rank"]


def test_video_preset_reports_the_mean_feature(tmp_path):
    p = argparse.ArgumentParser()
    reproduce.add_args(p)
    a = p.parse_args(["--preset", "video", "--steps", "10", "--batch-size", "16", "--lambdas", "0", "0.1",
                      "--eval-images", "120", "--out", str(tmp_path), "--no-progress", "--num-workers", "0"])
    res = reproduce.reproduce(a)
    report = (tmp_path / "report.md").read_text()
    rows = [r for r in report.splitlines() if r.startswith("| MAE") or r.startswith("| U-MAE")]
    assert len(rows) == 2 and all("| mean |" in r for r in rows), rows  # no cls token: its mean feature
    assert "preset video" in report and "data video-builtin" in report
    assert {r["run"] for r in res["results"]} == {"MAE", "U-MAE (lambda 0.1)"}
    ck = torch.load(tmp_path / "lamb_0.1" / "checkpoint-last.pt", weights_only=False)
    assert ck["run"]["mask_ratio"] == 0.9 and ck["run"]["builtin_size"] == 2048
    for c in json.loads((tmp_path / "curves.json").read_text()).values():
        assert c["log"][-1]["step"] == 10 and len(c["rank"]) >= 2 and all(r > 1 for _, r in c["rank"])

def test_seeds_report_mean_and_spread(tmp_path):
    p = argparse.ArgumentParser()
    reproduce.add_args(p)
    a = p.parse_args(["--steps", "3", "--model", "umae_vit_micro_patch4_32", "--batch-size", "32", "--lambdas", "0",
                      "--seeds", "2", "--eval-images", "100", "--out", str(tmp_path), "--no-progress",
                      "--num-workers", "0"])
    res = reproduce.reproduce(a)
    assert {r["seed"] for r in res["results"]} == {0, 1}
    assert all((tmp_path / f"lamb_0_seed{s}" / "checkpoint-last.pt").is_file() for s in (0, 1))
    report = (tmp_path / "report.md").read_text()
    accs = [r["linear_probe_acc"] for r in res["results"] if r["pool"] == "cls"]
    import statistics

    assert "Over 2 seeds, mean (sd):" in report
    assert f"{statistics.fmean(accs):.3f} ({statistics.stdev(accs):.3f})" in report


def test_cifar_preset_needs_data():
    p = argparse.ArgumentParser()
    reproduce.add_args(p)
    import pytest

    with pytest.raises(ValueError, match="needs --data"):
        reproduce.reproduce(p.parse_args(["--preset", "cifar10-vit-tiny"]))

"""The benchmark report and the generator of the performance tables (docs/benchmarks.md's full
table, README's headline) (the numbers are not checked here: speed is claimed from benchmarks only)."""
import json
import os

import pytest
import torch
from umae_testing import LOSS_TOL

from umae import bench

from umae.ops import _common
from umae.bench import report
from umae.bench.timing import MODES, PROVIDERS


def test_bench_rows_and_outputs(tmp_path):
    rows = list(bench.run(["mae_loss", "uniformity_loss"], ["cpu_small"], ["fwd"], ["fused", "eager"],
                          [torch.float32], "cpu", progress=False))
    ceil = dict(copy_gbps=10.0, matmul_tflops=1.0, matmul_dtype="fp32")
    rows = bench.add_fractions(bench.speedups(rows), ceil)
    fused = [r for r in rows if r["op"] == "mae_loss" and r["provider"] == "fused"][0]
    assert fused["impl"] == "cpp-cpu" and fused["ms"] > 0 and "speedup_vs_eager" in fused
    assert fused["parity_max_abs"] < 2 * LOSS_TOL[torch.float32]["rtol"]  # the loss is ~2 (randn pred)
    assert "frac_copy_bw" in fused
    env = bench.environment("cpu")
    bench.write(rows, env, str(tmp_path), ceil)
    assert json.load(open(tmp_path / "results.json"))["environment"]["device_type"] == "cpu"
    assert bench.format_table(rows).count("\n") >= 3


def test_rows_carry_the_exact_costs_and_the_fused_step_is_below_its_reference():
    # aten_calls: the ops dispatched (a umae kernel's own ATen calls counted too); saved_bytes: what the
    # forward keeps for backward. Exact on any device, so checked here
    rows = list(bench.run(["uniformity_loss"], ["unif_tiny"], ["fwd", "fwd+bwd"], ["fused", "eager"],
                          [torch.float32], "cpu", progress=False))
    by = {(r["mode"], r["provider"]): r for r in rows}
    assert by["fwd+bwd", "fused"]["aten_calls"] > 1  # more than the op itself: what its C++ kernel dispatches
    assert by["fwd+bwd", "fused"]["aten_calls"] < by["fwd+bwd", "eager"]["aten_calls"]
    assert "aten_calls" not in by["fwd", "fused"]
    step = {r["provider"]: r for r in bench.run_e2e(["tiny"], "cpu", providers=("fused", "eager"))}
    for k in ("aten_calls", "saved_bytes"):
        assert 0 < step["fused"][k] < step["eager"][k], (k, step["fused"][k], step["eager"][k])
    assert "aten calls" in bench.format_table(rows + list(step.values()))


def test_costs_count_a_kernels_own_calls_and_saved_storages_once():
    from umae.bench import costs

    x = torch.randn(64, 32, requires_grad=True)

    def fn():
        y = x.exp()  # saves its output
        (y * y).sum().backward()  # saves y twice: one storage
    got = costs.measure(fn, held=[x])
    assert got["saved_bytes"] == 64 * 32 * 4
    assert costs.measure(lambda: (x * 2).sum().backward(), held=[x])["saved_bytes"] == 0  # x is held
    import umae
    plain = costs.measure(lambda: umae.uniformity_loss(x.detach()))["aten_calls"]
    assert plain > 1  # umae::uniformity_loss and the ATen calls of its C++ kernel (the mm)


def test_report_regenerates_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\nrest\n")
    res = tmp_path / "results"
    with pytest.raises(ValueError, match="--results .* is not a folder"):  # was: the tables replaced by "No GPU results"
        report.update_readme(str(res), str(readme))
    assert "old" in readme.read_text()
    res.mkdir()
    assert "No GPU results" in report.update_readme(str(res), str(readme))
    run = res / "NVIDIA_H100" / "2026-11-23"
    os.makedirs(run)
    env = dict(device="NVIDIA H100", device_type="cuda", torch="2.11", triton="3.6", commit="abc", date="2026-11-23")
    rows = [dict(op="mae_loss", shape="vit_b16", dtype="bfloat16", mode="fwd+bwd", provider=p, ms=ms, gbps=1.0,
                 tflops=None) for p, ms in (("fused", 1.0), ("eager", 4.0), ("compile", 2.0))]
    rows = bench.add_fractions(bench.speedups(rows), dict(copy_gbps=3000.0, matmul_tflops=800.0, matmul_dtype="bf16"))
    json.dump(dict(environment=env, ceilings=dict(copy_gbps=3000.0, matmul_tflops=800.0), rows=rows),
              open(run / "results.json", "w"))
    table = report.update_readme(str(res), str(readme))
    text = readme.read_text()
    assert "| 1 | mae_loss | vit_b16 | bfloat16 | fwd+bwd | 1.000 | 4.000 | 2.000 | - | 4.00 | 2.00 |" in table
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    # a later run (its folder sorts before the first's) measures the row again: its numbers, its run number
    run2 = res / "NVIDIA_H100" / "2026-11-23-2"
    os.makedirs(run2)
    rows2 = [dict(rows[0], ms=0.5), dict(op="mae_loss", shape="vit_b16", dtype="bfloat16", mode="fwd+bwd",
                                          provider="eager", error="OutOfMemoryError: CUDA out of memory")]
    json.dump(dict(environment=dict(env, date="2026-11-24", commit="def"), ceilings=None, rows=rows2),
              open(run2 / "results.json", "w"))
    table = report.update_readme(str(res), str(readme))
    assert "- run 2: `" in table and "commit def" in table
    assert [r for r in table.splitlines() if "| mae_loss |" in r] == [
        "| 2 | mae_loss | vit_b16 | bfloat16 | fwd+bwd | 0.500 | OOM | - | - | 4.00 | 2.00 | 1 | 0.0 | 0% | - / - |"]



def test_report_writes_docs_table_and_readme_headline(tmp_path):
    # the repository's layout: the full table in docs/benchmarks.md, its headline rows in README.md
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    os.makedirs(docs.parent)
    readme.write_text("intro\n<!-- perf-headline:start -->\nold\n<!-- perf-headline:end -->\nrest\n")
    docs.write_text("bench\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\nend\n")
    run = tmp_path / "results" / "NVIDIA_H100" / "2026-11-23"
    os.makedirs(run)
    env = dict(device="NVIDIA H100", device_type="cuda", torch="2.11", triton="3.6", commit="abc", date="2026-11-23")
    ceil = dict(copy_gbps=3000.0, matmul_tflops=800.0, matmul_dtype="bf16")
    rows = [dict(op=op, shape=shape, dtype=dtype, mode="fwd+bwd", provider=p, ms=ms, gbps=1.0, tflops=None)
            for op, shape, dtype in (("mae_loss", "vit_b16", "bfloat16"), ("mae_loss", "vit_b16", "float32"),
                                     ("mae_loss", "vit_l16", "bfloat16"), ("uniformity_loss", "unif_b1024", "bfloat16"),
                                     ("uniformity_loss", "unif_b16384", "bfloat16"))
            for p, ms in (("fused", 1.0), ("eager", 4.0), ("compile", 2.0))]
    rows = bench.add_fractions(bench.speedups(rows), ceil)
    json.dump(dict(environment=env, ceilings=ceil, rows=rows), open(run / "results.json", "w"))
    table = report.update_readme(str(tmp_path / "results"), str(readme))  # docs/benchmarks.md found beside it
    full, head = docs.read_text(), readme.read_text()
    assert table in full and full.startswith("bench\n") and full.endswith("end\n") and "old" not in full
    assert "| 1 | mae_loss | vit_l16 | bfloat16 | fwd+bwd |" in full and "| float32 |" in full
    assert head.startswith("intro\n") and head.endswith("rest\n") and "old" not in head
    assert "docs/benchmarks.md#recorded-gpu-performance" in head
    # the headline: bf16 at ViT-B/16 and the uniformity loss at the largest batch measured
    assert [r for r in head.splitlines() if r.startswith("| ") and "op |" not in r] == [
        "| mae_loss | vit_b16 | 1.000 | 4.000 | 2.000 | 4.00 | 2.00 | 1 | 0% |",
        "| uniformity_loss | unif_b16384 | 1.000 | 4.000 | 2.000 | 4.00 | 2.00 | 1 | 0% |"]
    # a file without markers: an error naming it, and nothing written anywhere
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="README.md has no"):
        report.update_readme(str(tmp_path / "results"), str(readme))
    assert docs.read_text() == full

def test_cli_bench_and_info(tmp_path, capsys):
    from umae.cli.main import main

    assert main(["bench", "--ops", "mae_loss", "--modes", "fwd", "--providers", "fused", "eager", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CPU figures" in out and "measured ceilings" in out and "mae_loss" in out
    assert (tmp_path / "results.csv").exists() and (tmp_path / "speedup.png").exists()
    assert main(["bench", "--ops", "nope"]) == 2
    assert main(["info"]) == 0
    assert "uniformity_loss" in capsys.readouterr().out


@pytest.mark.slow
def test_every_compiled_case_is_compiled():
    # all cases compile the same function: past dynamo's recompile limit the later ones would run
    # eagerly under a "compile" label. With a limit of 1, each of 3 cases must still add a graph.
    import torch._dynamo.config
    from torch._dynamo.utils import counters

    tiny = dict(N=2, img=8, p=4, C=3, D=24, Dd=16)
    graphs = []
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch.setattr would delete it on undo)
        for op in ("patchify", "mae_loss", "uniformity_loss"):
            before = counters["stats"]["unique_graphs"]
            rows = list(bench.run([op], [tiny], ["fwd"], ["compile"], [torch.float32], "cpu", progress=False))
            assert rows and "ms" in rows[0], rows
            graphs.append(counters["stats"]["unique_graphs"] - before)
    assert all(g >= 1 for g in graphs), graphs


# ---- counted memory traffic (umae info --traffic) ----------------------------------------

def test_traffic_counts_bytes():
    # the dispatch count: an add reads two tensors and writes one; a view moves nothing
    from umae.verify import traffic

    a, b = torch.randn(3, 5), torch.randn(3, 5)
    with traffic._AtenBytes() as m:
        (a + b).view(15)
    assert m.bytes == 3 * 15 * 4
    # the interpreter count: the masking and restore kernels at a small awkward shape
    if not _common.triton_interpreted():
        pytest.skip("the fused count needs the Triton interpreter")
    tiny = dict(N=3, img=20, p=4, C=3, D=40, Dd=24)
    for op in ("random_masking", "restore_tokens"):
        low, eager, fused = traffic.minimum_bytes(op, tiny), traffic.eager_bytes(op, tiny), traffic.fused_bytes(op, tiny)
        # the fused kernels touch about what the op must move (small shared rows are re-read: requested
        # > unique), far less than the reference's chain of aten ops
        assert 0.9 * low <= fused["unique"] <= fused["requested"] <= 1.35 * low, (op, low, fused)
        assert eager > 2 * fused["unique"], (op, eager, fused)
    # the kernels' bytes derived from their grids and block shapes equal the interpreter's count,
    # at awkward sizes (partial tiles, several Gram tiles, a batch split), forward and backward
    clip = dict(clips=2, frames=6, img=20, p=4, ts=3, C=3, ratio=0.75)  # odd tubelets, a partial tile
    for op, shape in [("random_masking", tiny), ("restore_tokens", tiny), ("uniformity_loss", dict(N=70, D=130)),
                      ("uniformity_loss", dict(N=1100, D=72)), ("tubelet_patchify", clip),
                      ("tubelet_unpatchify", clip), ("videomae_loss", clip)]:
        f = traffic.fused_bytes(op, shape)
        assert f["formula"] == f["kernels"] > 0, (op, shape, f)
    # the video loss reads the masked tokens' pixels and pred once each way, and the mask: its minimum,
    # within the rank counts' mask bytes; its reference (on CPU: a boolean index) moves several times more
    low, eager, fused = (traffic.minimum_bytes("videomae_loss", clip), traffic.eager_bytes("videomae_loss", clip),
                         traffic.fused_bytes("videomae_loss", clip))
    assert low <= fused["requested"] <= 1.1 * low and eager > 3 * fused["requested"], (low, eager, fused)


def test_hf_train_step_bench_rows():
    # transformers' ViTMAE training step, umae.patch'ed (fused) vs unpatched (eager): timed rows, no errors
    pytest.importorskip("transformers")
    from umae import bench

    rows = list(bench.run_e2e(["tiny"], "cpu", providers=("fused", "eager"), ops=("hf_train_step",)))
    assert [r["provider"] for r in rows] == ["fused", "eager"]
    for r in rows:
        assert "error" not in r, r
        assert r["op"] == "hf_train_step" and r["ms"] > 0 and r["img_per_s"] > 0


def test_loader_bench(monkeypatch, capsys):
    from umae.bench import loader
    from umae.cli.main import main
    from umae.runtime import default_workers

    monkeypatch.setitem(loader.SHAPES, "builtin32", dict(loader.SHAPES["builtin32"], images=96, batch=32))
    monkeypatch.setitem(loader.SHAPES, "jpeg224", dict(loader.SHAPES["jpeg224"], images=12, batch=4, hw=(90, 70)))
    assert main(["bench", "--device", "cpu", "--ops", "loader", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [r.split() for r in out.splitlines() if r.startswith("loader ")]
    assert [(r[1], r[2]) for r in rows] == [(s, w) for s in ("builtin32", "jpeg224")
                                           for w in sorted({"0", str(default_workers())}, key=int)]
    assert all(float(r[-1]) > 0 for r in rows)
    (r,) = loader.rows(["jpeg224"], workers=[0])
    assert r["dtype"] == "torch.float32" and r["sample"] == (3, 224, 224)


def test_mfu_only_against_a_bf16_ceiling():
    # the training steps run under bf16 autocast: the CPU's fp32 matmul ceiling gave "MFU 117%"
    step = dict(op="train_step", shape="cpu_small", dtype="bfloat16-autocast", mode="step", provider="fused", ms=10.0,
                tflops=50.0, gbps=0.0, img_per_s=6400.0, parity_max_abs=float("nan"))
    on_gpu = bench.add_fractions([dict(step)], dict(copy_gbps=1.0, matmul_tflops=100.0, matmul_dtype="bf16"))
    on_cpu = bench.add_fractions([dict(step)], dict(copy_gbps=1.0, matmul_tflops=0.1, matmul_dtype="fp32"))
    assert on_gpu[0]["mfu"] == 0.5 and "mfu" not in on_cpu[0]
    assert "MFU 50%" in bench.format_table(on_gpu) and "MFU" not in bench.format_table(on_cpu).split("\n", 2)[2]


def test_bench_defaults_quick_and_full():
    # `umae bench` alone: each op fwd+bwd at one shape set vs eager and compile, and the U-MAE
    # training step (on CPU fused vs eager: a model's Inductor compile takes minutes); --full: all
    from umae.ops import registry
    from umae.bench import command
    from umae.cli.main import build_parser

    for device, shapes, dtypes, e2e in (("cpu", ["cpu_small", "cpu_video"], ["float32"], ["fused", "eager"]),
                                        ("cuda", ["vit_b16", "unif_b16384", "videomae_b"], ["bfloat16"], list(PROVIDERS))):
        a = build_parser().parse_args(["bench"])
        command.quick(a, device)
        assert a.ops == list(registry.OPS) + ["train_step"] and a.modes == ["fwd+bwd"]
        assert a.shapes == shapes and a.dtypes == dtypes and a.providers == list(PROVIDERS) and a.e2e_providers == e2e
    a = build_parser().parse_args(["bench", "--full"])
    command.quick(a, "cpu")
    assert a.ops is None and a.shapes is None and a.dtypes is None and a.modes == list(MODES)
    a = build_parser().parse_args(["bench", "--ops", "patchify", "--modes", "fwd", "--shapes", "cpu_large"])
    command.quick(a, "cpu")  # what a flag names is run as named
    assert a.ops == ["patchify"] and a.modes == ["fwd"] and a.shapes == ["cpu_large"]


def test_host_view_rows_and_verdicts(tmp_path, capsys):
    # the numbers are not checked (speed is claimed from benchmarks only): the rows, the ratios, the file
    from umae.bench import host
    from umae.cli.main import main

    rows = host.op_rows(["patchify", "random_masking"], "cpu", n=3, rounds=3)
    assert [r["op"] for r in rows] == ["patchify", "random_masking"]
    for r in rows:
        assert r["impl"] == "cpp-cpu"
        assert all(r[m][p] > 0 for m in host.MODES for p in ("fused", "reference", "unit"))
    step = host.step_row("cpu", n=1, rounds=1)
    assert step["step"]["fused"] > 0 and step["step"]["reference"] > 0
    table = host.format_rows(rows, step)
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 3 and "training step" in table
    # a verdict can fail: each target on its own
    t = lambda f, r, u: dict(fused=f, reference=r, unit=u)  # noqa: E731
    ok = dict(op="x", impl="cpp-cpu", **{"fwd": t(4, 10, 2), "fwd+bwd": t(10, 10, 10)})
    assert all(v[2] for v in host.verdicts(ok).values())
    slow_fwd = dict(ok, fwd=t(6, 10, 2))  # more than half the reference
    assert [m for m, v in host.verdicts(slow_fwd).items() if not v[2]] == ["fwd"]
    many_units = dict(ok, **{"fwd+bwd": t(14, 20, 10)})  # 1.4 units
    assert [m for m, v in host.verdicts(many_units).items() if not v[2]] == ["fwd+bwd"]
    assert "missed: fwd+bwd" in host.format_rows([many_units])
    capsys.readouterr()
    assert main(["bench", "host", "--device", "cpu", "--ops", "uniformity_loss", "--out", str(tmp_path)]) == 0
    saved = json.load(open(tmp_path / "host.json"))
    assert [r["op"] for r in saved["rows"]] == ["uniformity_loss"] and saved["step"] is None
    assert "| uniformity_loss | cpp-cpu |" in capsys.readouterr().out


def test_device_time_columns_and_fractions():
    # CUDA rows carry a device time (a CUDA graph's replay): fractions of the ceilings come from it,
    # the row says whether the host's work dominates, and a call that could not be captured says so
    from umae.bench.runner import with_device_time
    from umae.bench import timing

    ceil = dict(copy_gbps=1000.0, matmul_tflops=100.0, matmul_dtype="bf16")
    row = dict(op="mae_loss", shape="vit_b16", dtype="bfloat16", mode="fwd+bwd", provider="fused", ms=1.0,
               gbps=100.0, tflops=None, parity_max_abs=0.0, ms_device=0.2, gbps_device=500.0, bound="host")
    (row,) = bench.add_fractions([row], ceil)
    assert row["frac_copy_bw"] == 0.5  # 500 GB/s of device time, not the host-bound 100
    failed = {k: v for k, v in row.items() if k not in ("ms_device", "gbps_device", "bound")}
    text = bench.format_table([row, dict(failed, provider="eager", device_error="not capturable: x")])
    assert "0.200 h" in text and "n/c" in text and "host-bound" in text
    cpu_row = {k: v for k, v in failed.items() if k != "frac_copy_bw"}
    assert "host-bound" not in bench.format_table(bench.add_fractions([cpu_row], ceil))  # CPU rows: no legend
    assert cpu_row["frac_copy_bw"] == 0.1  # and the fraction of their own time
    if torch.cuda.is_available():
        x = torch.randn(1 << 20, device="cuda")
        got = with_device_time(lambda: x.mul(2), 1.0, 8 << 20, 0)
        assert got["ms_device"] > 0 and got["bound"] in ("host", "device")
    else:
        assert timing.HOST_BOUND > 1


def test_cuda_graph_providers_time_training_steps_and_compare_like_with_like():
    rows = list(bench.run(["patchify"], ["tiny"], ["fwd"], ["fused", "compile-cg"], [torch.float32], "cpu",
                          progress=False))
    assert [r.get("skipped", "") for r in rows if r["provider"] == "compile-cg"] == [
        "the CUDA-graph providers time training steps"]
    key = dict(op="train_step", shape="vit_b16_b256", dtype="bfloat16-autocast", mode="step")
    steps = [dict(key, provider=p, ms=ms) for p, ms in (("eager", 10.0), ("compile", 8.0), ("compile-cg", 5.0),
                                                          ("fused+compile-cg", 4.0))]
    cg = [r for r in bench.speedups(steps) if r["provider"] == "fused+compile-cg"][0]
    assert cg["speedup_vs_compile"] == 5.0 / 4.0 and cg["speedup_vs_eager"] == 10.0 / 4.0  # vs compile-cg
    assert bench.E2E["vit_b16_b256"] == ("umae_vit_base_patch16_224", 256)


def test_tune_runs_every_candidate_of_the_product_each_shape_uses(capsys):
    # B < D (256 x 768): the similarity's configurations; B >= D (16,384 x 768): the Gram's
    from umae.ops import registry
    from umae.bench import tune
    from umae.kernels import uniformity as k

    assert [op.name for op in tune.tuned()] == ["uniformity_loss"]
    runs = list(tune.runs(registry.get("uniformity_loss")))
    groups = {(shape["B"], group) for shape, _p, group, _i, _c in runs}
    assert groups == {(256, "SIM_CFG"), (256, "SZ_CFG"), (16384, "GRAM_CFG"), (16384, "ZG_CFG")}
    assert len(runs) == sum(len(k.CANDIDATES[g]) for g in ("SIM_CFG", "SZ_CFG", "GRAM_CFG", "ZG_CFG"))
    assert all(k.CANDIDATES[g][0] is getattr(k, g) for g in k.CANDIDATES)  # the default first
    with k.configured(SIM_CFG=k.CANDIDATES["SIM_CFG"][1]):
        assert k.SIM_CFG is k.CANDIDATES["SIM_CFG"][1]
    assert k.SIM_CFG is k.CANDIDATES["SIM_CFG"][0]
    row = lambda i, dev, ms: dict(shape="B=256 D=768", group="SIM_CFG", product="sim", candidate=i,  # noqa: E731
                                  config=k.CANDIDATES["SIM_CFG"][i], ms=ms, ms_device=dev)
    rows = [row(0, 0.05, 0.2), row(1, 0.03, 0.3), row(2, None, 0.1)]
    assert tune.winners(rows)[("B=256 D=768", "SIM_CFG")]["candidate"] == 1  # least device time
    assert "winner" in tune.format_rows(rows).splitlines()[3]
    assert tune.main("cpu", None) == 0 and "on a GPU only" in capsys.readouterr().out


def test_the_measurements_are_subcommands_and_the_old_flags_their_aliases(capsys, monkeypatch):
    from umae.bench import command
    from umae.cli.main import main

    calls = []
    for what in ("host", "loader", "profile", "tune"):
        monkeypatch.setattr(command, {"profile": "profile_steps"}.get(what, what),
                            lambda args, device, what=what: calls.append(what) or 0)
    for argv in (["host"], ["--host"], ["loader"], ["--ops", "loader"], ["profile"], ["--profile-steps"], ["tune"],
                 ["--tune"]):
        assert main(["bench", *argv, "--device", "cpu"]) == 0, argv
    assert calls == ["host", "host", "loader", "loader", "profile", "profile", "tune", "tune"]
    assert main(["bench", "host", "--tune"]) == 2
    assert "one measurement at a time, got host and tune" in capsys.readouterr().err


def test_the_counted_traffic_is_umae_info_and_the_old_bench_names_reach_it(capsys, monkeypatch):
    from umae.cli.main import main
    from umae.verify import info

    seen = []
    monkeypatch.setattr(info, "reexec_interpreted", lambda: None)
    monkeypatch.setattr(info, "traffic", lambda shapes, ops: seen.append((shapes, ops)) or 0)
    for argv in (["info", "--traffic"], ["bench", "traffic"], ["bench", "--traffic", "--ops", "patchify"],
                 ["bench", "--device", "cpu", "traffic", "--shapes", "vit_tiny32"]):
        assert main(argv) == 0, argv
    assert seen == [(None, None), (None, None), (None, ["patchify"]), (["vit_tiny32"], None)]
    from umae.cli.main import _aliased, build_parser

    parser = build_parser()
    timed = parser.parse_args(["bench", "--out", "traffic"])  # a folder named traffic: the timed ops
    assert _aliased(timed, parser) is timed
    assert main(["info", "--kernels", "--traffic"]) == 2
    assert "one at a time" in capsys.readouterr().err
    assert main(["bench", "host", "--traffic"]) == 2
    assert "one measurement at a time, got host and traffic" in capsys.readouterr().err

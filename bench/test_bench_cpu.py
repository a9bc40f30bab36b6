"""pytest-benchmark: the C++ CPU paths vs the eager reference (`pytest bench/ --benchmark-only`).

CPU figures only: they say how the CPU kernels compare on this machine, nothing about a GPU.
"""
import pytest
import torch

import umae
from umae import bench

# the ops whose first CPU implementation is a C++ kernel (today: all of them)
from umae.ops import registry
CASES = [name for name, op in registry.OPS.items() if op.impls_for("cpu")[0].name == "cpp-cpu"]


@pytest.mark.parametrize("provider", ["fused", "eager"])
@pytest.mark.parametrize("op", CASES)
def test_cpu_fwd_bwd(benchmark, op, provider):
    torch.manual_seed(0)
    case = bench.case(op, "cpu_small", torch.float32, "cpu")
    fn = bench.mode_fn(bench.provider_forward(case.forward, provider), case.grad_inputs, "fwd+bwd")
    benchmark.group = f"{op} fwd+bwd N=16 224x224 p=16 fp32"
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
    if provider == "fused":
        assert umae.backend_info(["cpu"])[op]["cpu"].startswith("cpp-cpu")

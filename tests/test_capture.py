"""CUDA-graph safety: no op, forward or backward, reads a tensor on the host or synchronizes, so
each is captured by torch.cuda.graph (and by torch.compile's CUDA-graph mode). Captured and
replayed on a GPU; here, what a CPU test can see: the syncing calls are absent from the ops' code
and from what their Python and C++ autograd layers dispatch."""
import ast
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from umae_testing import TOL, assert_close

import umae
from umae.bench.cases import CASES
from umae.ops import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# calls that wait for the device or read a tensor on the host
SYNCING = {"item", "tolist", "cpu", "numpy", "synchronize"}
# host-side by design, and why: (file, function)
HOST_SIDE = {
    ("kernels/restore_tokens.py", "check_ids"),  # its CPU branch (the interpreter); CUDA returns before it
    ("umae/ops/uniformity_op.py", "check_equal_batches_once"),  # once per process group, before training
    ("umae/ops/_common.py", "video_mask"),  # the count read where not given; given, CUDA asserts on the device
    ("umae/ops/_common.py", "device_constant"),  # the values of a CPU tensor of host data, filled in under capture
}
# what an op's forward and backward run, besides its kernels
OP_PATH = ["umae/ops/_common.py", "umae/ops/tube_mask_op.py", "umae/ops/visible_tokens_op.py",
           "umae/ops/decoder_tokens_op.py", "umae/patching.py", "umae/_mae.py",
           "umae/models/mae.py"] + sorted(
    {f"umae/ops/{op.public.__module__.split('.')[-1]}.py" for op in registry.OPS.values()}) + sorted(
    f"kernels/{f}" for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py"))


def _syncing_calls(path):
    """(function, line, call) of every syncing call in `path`, outside the bench cases."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name.startswith("bench_"):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SYNCING:
                found.append((fn.name, node.lineno, node.func.attr))
    return found


def test_no_syncing_call_on_the_ops_paths(tmp_path):
    bad = [(p, *c) for p in OP_PATH for c in _syncing_calls(p) if (p, c[0]) not in HOST_SIDE]
    assert not bad, f"host syncs on an op's path (not capturable in a CUDA graph): {bad}"
    # the scan can fail: a syncing call in a function is found
    probe = tmp_path / "probe.py"
    probe.write_text("def f(x):\n    return x.sum().item()\n\ndef bench_f(x):\n    return x.cpu()\n")
    assert _syncing_calls(str(probe)) == [("f", 2, "item")]


class _Dispatched(TorchDispatchMode):
    """The aten and umae ops dispatched (from Python and from the ops' C++ autograd)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# what a host read of a tensor dispatches (.item(), bool(t), .tolist() all reach _local_scalar_dense)
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.equal"}


@pytest.mark.parametrize("op", list(registry.OPS))
def test_fused_forward_and_backward_dispatch_no_host_read(op):
    torch.manual_seed(0)
    case = CASES[op](dict(N=2, img=16, p=8, C=3, D=16, Dd=16, B=5, clips=2, frames=4, ts=2, ratio=0.75), torch.float32,
                     "cpu")
    with umae.use_backend("fused"), _Dispatched() as seen:
        out = case.forward()
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.requires_grad]
        torch.autograd.grad(outs, case.grad_inputs, [torch.ones_like(t) for t in outs])
    assert any(n.startswith("umae.") for n in seen.names), seen.names  # the fused path ran
    assert not SYNC_OPS & set(seen.names), sorted(SYNC_OPS & set(seen.names))
    # the check can fail: a host read is seen
    with _Dispatched() as probe:
        torch.ones(2).sum().item()
    assert "aten._local_scalar_dense" in probe.names


# ---- on a GPU: capture and replay --------------------------------------------------------------

def _captured(step, warmups: int):
    """(a CUDA graph of `step`, what its capture returned), after `warmups` calls on a side stream (off the
    capture stream, as torch.cuda.graph wants)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the CPU tests above stand in)")
@pytest.mark.parametrize("op", list(registry.OPS))
def test_op_captured_in_a_cuda_graph_replays_as_eager(op):
    torch.manual_seed(0)
    case = CASES[op](dict(N=3, img=32, p=8, C=3, D=64, Dd=48, B=70), torch.bfloat16, "cuda")
    assert umae.ops.implementation(op, *case.grad_inputs) in ("cuda", "triton")

    def step():
        out = case.forward()
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.requires_grad]
        return [t.detach() for t in outs] + list(torch.autograd.grad(outs, case.grad_inputs,
                                                                     [torch.ones_like(t) for t in outs]))
    with umae.use_backend("fused"):
        eager = step()
        graph, static = _captured(step, warmups=2)
        graph.replay()
        torch.cuda.synchronize()
    for got, ref in zip(static, eager):
        assert_close(got.float(), ref.float(), name=f"{op} replayed", **TOL[torch.bfloat16])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the CPU tests above stand in)")
def test_training_step_captured_in_a_cuda_graph():
    # the whole U-MAE step (forward, backward, a capturable AdamW) in one graph, as MAE's static shapes allow
    import timm

    import umae.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("umae_vit_micro_patch4_32", fused=True, lamb=0.01).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)
    imgs = torch.randn(8, 3, 32, 32, device="cuda")
    noise = torch.rand(8, 64, device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs, noise=noise).loss
        loss.backward()
        opt.step()
        return loss.detach()
    graph, loss = _captured(step, warmups=3)
    losses = []
    for _ in range(3):
        graph.replay()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] != losses[0]  # it trains: the loss moves

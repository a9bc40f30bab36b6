"""uniformity_loss: every fused implementation (the C++ CPU kernel; the Triton Gram-square kernels,
interpreted on CPU, native on CUDA) vs the reference, the allocation pattern, and the global-batch
loss across 2 gloo processes."""
import math

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from umae_testing import (CREATE_GRAPH_WARNING, DTYPES, LAYOUT_SHAPES, LOSS_TOL, MATMUL_TOL,
                          assert_backward_reads_any_gradient_layout, assert_close, assert_forward_mode_ad_refused,
                          assert_grid_row, assert_runs, assert_second_order_refused, cpu_impls, cuda_only, fused_impls,
                          grid_params, needs_ext, randn, runs_impl, sampled, triton_cpu)

import umae
from umae import ops
from umae.ops.uniformity_op import uniformity_loss_reference

BS = [1, 2, 7, 64, 255, 1024]
DS = [16, 192, 384, 768, 1000]
# every B and every D, without the full cross product (the interpreter is slow)
SHAPES = [(1, 16), (2, 192), (7, 1000), (64, 384), (255, 16), (1024, 192), (64, 768), (2, 1000), (300, 257),
          (257, 300)]
IMPLS = fused_impls("uniformity_loss")
CPU_IMPLS = cpu_impls("uniformity_loss")


def _grad_tol(dtype):
    return MATMUL_TOL[dtype]


@sampled(key={"device,impl": IMPLS, "dtype": DTYPES}, crossed={"B,D": SHAPES},
         paired={"exclude_diagonal": [False, True], "normalize": [True, False]})
@runs_impl
def test_parity(device, impl, dtype, B, D, exclude_diagonal, normalize):
    if exclude_diagonal and B < 2:
        pytest.skip("exclude_diagonal needs B >= 2 (tested in test_bad_input)")
    f = (randn(B, D, device=device) * 0.3 + 0.1).to(dtype).requires_grad_()
    assert_runs("uniformity_loss", impl, f)
    loss = umae.uniformity_loss(f, normalize, exclude_diagonal)
    ref = uniformity_loss_reference(f, normalize, exclude_diagonal)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, name="loss", **MATMUL_TOL[dtype])
    (g,) = torch.autograd.grad(loss, f)
    (gr,) = torch.autograd.grad(ref, f)
    # relative to the gradient's size; B=1 normalized has a constant loss (gradient ~ rounding noise)
    scale = gr.float().abs().max().item()
    scale = scale if scale > 1e-4 else 1.0
    assert g.dtype == dtype
    assert_close(g.float() / scale, gr.float() / scale, name="grad", **_grad_tol(dtype))


@sampled(key={"device,impl": IMPLS, "dtype": [torch.bfloat16, torch.float16]},
         crossed={"B,D": [(2, 192), (2, 1000), (3, 300)]})
@runs_impl
def test_small_batch_grad_not_dominated_by_the_diagonal(device, impl, dtype, B, D):
    # At small B each row's own term |z_i|^2 z_i is most of Z G; it is radial, and the projection
    # of the normalized gradient cancels it. Multiplied from z rounded to bf16 (the tensor cores'
    # operands) it left that rounding (2^-9 of |z|, ~10x the tangential gradient here) in the
    # result: 3% of the gradient's max on an H200 (bench/results/h200/2026-11-27), 6-8% at
    # some seeds. Kept unrounded, what is left is G's rounding and the bf16 output: within MATMUL_TOL.
    gen = torch.Generator().manual_seed(1234)
    for _ in range(6):
        f = ((torch.randn(B, D, generator=gen) * 0.3 + 0.1).to(dtype)).to(device).requires_grad_()
        (g,) = torch.autograd.grad(umae.uniformity_loss(f), f)
        (gr,) = torch.autograd.grad(uniformity_loss_reference(f), f)
        scale = gr.float().abs().max()
        assert_close(g.float() / scale, gr.float() / scale, name="grad", **MATMUL_TOL[dtype])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@runs_impl
def test_default_equals_official_semantics(impl):
    f = randn(33, 48)
    z = torch.nn.functional.normalize(f, dim=1)
    official = (z @ z.T).pow(2).mean()
    assert_close(umae.uniformity_loss(f), official, **MATMUL_TOL[torch.float32])
    off = ((z @ z.T).pow(2).sum() - 33) / (33 * 32)
    assert_close(umae.uniformity_loss(f, exclude_diagonal=True), off, **MATMUL_TOL[torch.float32])


@pytest.mark.parametrize("B,D", [(5, 7), (9, 4)])  # both contractions of the C++ kernel (B <= D, B > D)
@pytest.mark.parametrize("exclude_diagonal", [False, True])
def test_gradcheck_float64(B, D, exclude_diagonal):
    # fp64: the C++ CPU kernel (the Triton kernels compute in fp32 and leave it to the reference)
    f = randn(B, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: umae.uniformity_loss(t, exclude_diagonal=exclude_diagonal), (f,))
    assert_close(umae.uniformity_loss(f), uniformity_loss_reference(f), **MATMUL_TOL[torch.float64])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@runs_impl
def test_zero_row_adds_nothing_and_nan_row_is_nan(impl):
    f = randn(6, 32)
    f[2] = 0
    assert_close(umae.uniformity_loss(f), uniformity_loss_reference(f), **MATMUL_TOL[torch.float32])
    f[3, 1] = float("nan")
    assert math.isnan(umae.uniformity_loss(f).item())


@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_non_contiguous(device, impl):
    f = randn(96, 2 * 40, device=device)[:, ::2].requires_grad_()
    ft = randn(40, 96, device=device).T.requires_grad_()
    for x in (f, ft):
        assert not x.is_contiguous()
        a, b = umae.uniformity_loss(x), uniformity_loss_reference(x)
        assert_close(a, b, **MATMUL_TOL[torch.float32])
        assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0], **MATMUL_TOL[torch.float32])


@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_opcheck(device, impl):
    f = randn(20, 24, device=device, requires_grad=True)
    from umae.ops.uniformity_op import NORM_EPS

    if impl == "cpp-cpu":
        op, extra = torch.ops.umae.uniformity_loss, [(NORM_EPS,)]
    else:  # keep_gram on and off: the forward with and without the Gram saved for the backward
        op, extra = torch.ops.umae.uniformity_loss, [(True,), (False,)]
    for e in extra:
        torch.library.opcheck(op.default, (f, True, False, *e))
        torch.library.opcheck(op.default, (f, False, True, *e))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@runs_impl
def test_deterministic(impl):
    f = randn(300, 80, requires_grad=True)
    a = umae.uniformity_loss(f)
    b = umae.uniformity_loss(f)
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a, f)[0], torch.autograd.grad(b, f)[0])


class _MaxAlloc(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@triton_cpu
def test_fused_allocates_O_BD_not_O_B2():
    # Every tensor the fused launchers allocate (through torch; the kernels allocate nothing)
    # is recorded: at B=2048, D=16 the largest must be ~B*D, where the reference makes B*B.
    from umae.ops import uniformity_op as u

    B, D = 2048, 16
    f = randn(B, D, requires_grad=True)
    with _MaxAlloc() as m:
        loss = u.uniformity_loss_fused(f, True, False)
        loss.backward()
    assert m.max_numel <= 2 * B * D + D * D, m.max_numel
    f = f.detach()
    with _MaxAlloc() as r:
        uniformity_loss_reference(f)
    assert r.max_numel >= B * B  # the check can fail: the reference does allocate B^2
    assert_close(loss, uniformity_loss_reference(f), **MATMUL_TOL[torch.float32])


@cuda_only
def test_cuda_peak_memory_O_BD():
    B, D = 16384, 768
    f = randn(B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    umae.uniformity_loss(f).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 8 * B * D * 4, peak  # a B x B fp32 matrix alone would be 1 GiB


P = lambda *s: randn(*s)  # noqa: E731


@pytest.mark.parametrize("call, match", [
    (lambda: umae.uniformity_loss(P(16)), "features must have 2 dims"),
    (lambda: umae.uniformity_loss(P(2, 3, 4)), "features must have 2 dims"),
    (lambda: umae.uniformity_loss(P(0, 8)), "empty batch"),
    (lambda: umae.uniformity_loss(P(1, 8), exclude_diagonal=True), "at least 2 rows"),
    (lambda: umae.uniformity_loss(torch.ones(4, 8, dtype=torch.int64)), "features must be float32"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---- across ranks ----------------------------------------------------------------------

# each variant: (backend, exact_ddp_grad, implementation); one spawn runs them all (a spawn is 2 processes
# importing torch: most of a variant's time)
DIST_VARIANTS = [("reference", True, None), ("reference", False, None)] + [
    ("fused", e, i.values[0]) for e in (True, False) for i in CPU_IMPLS]


def _worker(rank, world, store, out_dir, variants):
    import contextlib

    import torch.distributed as dist

    from umae import ops

    # a file store: no TCP port to race for
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for k, (backend, exact, impl) in enumerate(variants):
        umae.set_backend(backend)
        torch.manual_seed(0)
        model = torch.nn.Linear(12, 40)
        x = torch.randn(2 * 9, 12)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        feats = ddp(x[rank * 9:(rank + 1) * 9])
        feats.retain_grad()
        with ops.use_impl(impl) if impl else contextlib.nullcontext():
            if impl is not None and ops.implementation("uniformity_loss", feats) != impl:
                raise AssertionError(f"{impl} does not run: {ops.implementation('uniformity_loss', feats)}")
            loss = umae.uniformity_loss(feats, exclude_diagonal=True, process_group=dist.group.WORLD,
                                        exact_ddp_grad=exact)
        loss.backward()
        if rank == 0:
            torch.save(dict(loss=loss.detach(), wgrad=model.weight.grad, fgrad=feats.grad), f"{out_dir}/{k}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.dist
def test_distributed_matches_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), DIST_VARIANTS), nprocs=2,
                       join=True, start_method="spawn")
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 40)
    x = torch.randn(18, 12)
    feats = model(x)
    feats.retain_grad()
    with umae.use_backend("reference"):
        loss = umae.uniformity_loss(feats, exclude_diagonal=True)
    loss.backward()
    for k, (backend, exact, impl) in enumerate(DIST_VARIANTS):
        got, v = torch.load(tmp_path / f"{k}.pt"), f"{backend} {impl or ''} exact_ddp_grad={exact}: "
        assert_close(got["loss"], loss, name=v + "loss", **MATMUL_TOL[torch.float32])
        scale = 1.0 if exact else 0.5  # official GatherLayer: 1/world_size after DDP averaging
        assert_close(got["wgrad"], model.weight.grad * scale, name=v + "DDP weight grad", **MATMUL_TOL[torch.float32])
        assert_close(got["fgrad"], feats.grad[:9] * (2.0 if exact else 1.0), name=v + "rank 0 feature grad",
                     **MATMUL_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@triton_cpu
def test_interpreter_rounds_half_inputs_as_the_gpu_does(dtype):
    # the GPU kernel rounds z = f / |f| to the half dtype and multiplies with fp32 accumulation; the
    # interpreter path must reproduce that (not fp32 products of unrounded z, ~1e-3 away in bf16)
    from umae import ops
    from umae.kernels import uniformity as k

    f = randn(300, 80).to(dtype)
    rinv = 1.0 / torch.linalg.vector_norm(f.float(), dim=1)
    z = (f.float() * rinv[:, None]).to(dtype).float()  # the GPU's rounding of z
    g = k.gram(f, rinv)
    assert_close(g, z.T @ z, name="gram", **MATMUL_TOL[torch.float32])  # fp32 sums over B = 300
    z32 = f.float() * rinv[:, None]
    assert (g - z32.T @ z32).abs().max() > 1e-4  # the check can tell fp32 products apart
    assert_close(k.z_times_gram(f, rinv, g), z @ g.to(dtype).float(), name="Z @ G", **MATMUL_TOL[torch.float32])
    assert k.rounding_dtype(dtype) == dtype
    with ops.use_impl("triton-interpreter"):
        assert ops.implementation("uniformity_loss", f) == "triton-interpreter"
        loss = umae.uniformity_loss(f)
    assert_close(loss, (z.T @ z).pow(2).sum() / 300**2, **LOSS_TOL[torch.float32])


@triton_cpu
def test_batch_split_gram_is_exercised_and_exact():
    # (1024, 192) and (2048, 16) split the batch across programs (partial Grams summed in order)
    from umae.kernels import uniformity as k

    assert k.splits(1024, 192, "cpu") > 1 and k.splits(2048, 16, "cpu") > 1 and k.splits(64, 768, "cpu") == 1
    f = randn(2048, 16)
    rinv = torch.ones(2048)
    assert_close(k.gram(f, rinv), f.T @ f, **MATMUL_TOL[torch.float32])


@triton_cpu
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("B,D,kind", [(70, 130, "sim"), (130, 70, "gram")])
def test_forward_keeps_the_product_for_the_backward(monkeypatch, requires_grad, B, D, kind):
    # one square-sum launch per forward + backward: the forward stores the product the backward needs (S
    # = Z Z^T where B < D, the smaller; else G = Z^T Z) when a gradient will follow, and none when none will
    from umae.kernels import uniformity as k

    launches = []
    real_gram, real_sim = k._gram_launch, k._sim_launch
    monkeypatch.setattr(k, "_gram_launch", lambda f, rinv, gram, sq, **kw: (
        launches.append(("gram", gram is not None)), real_gram(f, rinv, gram, sq, **kw)))
    monkeypatch.setattr(k, "_sim_launch", lambda f, rinv, sim, sq, *a: (
        launches.append(("sim", sim is not None)), real_sim(f, rinv, sim, sq, *a)))
    f = randn(B, D, requires_grad=requires_grad)
    with ops.use_impl("triton-interpreter"):
        loss = umae.uniformity_loss(f)
        assert launches == [(kind, requires_grad)]
        if requires_grad:
            (grad,) = torch.autograd.grad(loss, f)
            assert launches == [(kind, True)]
            ref = f.detach().requires_grad_()
            assert_close(grad, torch.autograd.grad(uniformity_loss_reference(ref), ref)[0],
                         **MATMUL_TOL[torch.float32])


@pytest.mark.slow
@triton_cpu
def test_fp16_gram_of_a_collapsed_batch_does_not_overflow():
    # 70000 nearly identical rows: G[0, 0] ~ 0.986 B > 65504, fp16's largest value. The backward's
    # Z @ G rounds G to fp16 (tensor cores); unscaled it would be inf and the gradient NaN.
    B, D = 70000, 16
    f = torch.zeros(B, D)
    f[:, 0] = 1.0
    f = (f + 0.03 * torch.randn(B, D)).half().requires_grad_()
    with ops.use_impl("triton-interpreter"):
        loss = umae.uniformity_loss(f)
        (grad,) = torch.autograd.grad(loss, f)
    # the reference's B x B matrix would take 20 GB: the same loss through the D x D Gram, in fp64
    ref = f.detach().double().requires_grad_()
    z = torch.nn.functional.normalize(ref, dim=1)
    rloss = (z.T @ z).pow(2).sum() / B**2
    (rgrad,) = torch.autograd.grad(rloss, ref)
    assert rloss.item() > 0.5 and (z.T @ z)[0, 0] > 65504  # collapsed: the case is real
    assert torch.isfinite(grad).all()
    assert_close(loss, rloss, **MATMUL_TOL[torch.float16])
    # |grad| ~ 1/B is subnormal in fp16 (step 2^-24): compared at scale B, that step added to atol
    tol = MATMUL_TOL[torch.float16]
    assert_close(grad.float() * B, rgrad.half().float() * B, name="grad * B", atol=tol["atol"] + 2.0**-24 * B,
                 rtol=tol["rtol"])


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("B,D", [(300, 16), (10, 64)])
@runs_impl
def test_diagonal_free_loss_of_unnormalized_rows_keeps_its_accuracy(device, impl, B, D):
    # was: ||G||^2 - sum_i |z_i|^4 with one dominant row: 4.6e6 fused vs 1.1e7 reference (and negative
    # values); now the off-diagonal pairs are summed, against the reference in float64
    f = randn(B, D, device=device)
    f[0] *= 1e4
    f.requires_grad_()
    assert_runs("uniformity_loss", impl, f)
    got = umae.uniformity_loss(f, normalize=False, exclude_diagonal=True)
    f64 = f.detach().double().requires_grad_()
    ref = uniformity_loss_reference(f64, normalize=False, exclude_diagonal=True)
    tol = MATMUL_TOL[torch.float32]["rtol"]
    assert abs(float(got) - float(ref)) <= tol * float(ref), (float(got), float(ref))
    (g,) = torch.autograd.grad(got, f)
    (r,) = torch.autograd.grad(ref, f64)
    assert_close(g.double(), r, atol=tol * float(r.abs().max()), rtol=tol, name="grad")


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("uniformity_loss"))
@runs_impl
def test_uniformity_loss_grid(device, impl, dtype, variant):
    # shapes, flags, layouts (transposed, strided, expanded) and autocast: umae check's rows
    assert_grid_row("uniformity_loss", device, impl, dtype, variant)


@pytest.mark.parametrize("B,normalize,exclude_diagonal", [(16384, False, True), (65536, True, False),
                                                          (65536, True, True)])
def test_cpp_keeps_its_accuracy_for_nearly_parallel_rows_at_large_batches(B, normalize, exclude_diagonal):
    # was 2e-3 off at B = 16,384 (fp32 sums of 4M squared similarities) and 9e-3 at 65,536; and a BLAS that
    # sums a 65,536-row Gram entry in one fp32 accumulator (MKL's generic path on AMD) returned 1.000185 > 1.
    # Each fp32 sum now holds at most 1,024 terms (the Gram's partials) or D (S), the rest in double: the
    # loss within LOSS_TOL (the summation order), against float64
    D = 8
    f = torch.randn(1, D) + 1e-3 * torch.randn(B, D)
    assert_runs("uniformity_loss", "cpp-cpu", f)
    got = umae.uniformity_loss(f, normalize, exclude_diagonal)
    z = torch.nn.functional.normalize(f.double(), dim=1) if normalize else f.double()
    sq = z.pow(2).sum(1)
    truth = ((z.T @ z).pow(2).sum() - exclude_diagonal * sq.pow(2).sum()) / (B * (B - 1) if exclude_diagonal else B * B)
    assert_close(got, truth, **LOSS_TOL[torch.float32])
    assert not normalize or got <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("B", [10, 70])  # the similarity and the Gram of the C++ kernel
def test_compiles_fullgraph_under_autocast(B):
    # the Autocast kernel (the features cast to the autocast dtype, autocast off inside) traces without a break
    f = randn(B, 16, requires_grad=True)

    def fn(f):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return umae.uniformity_loss(f, exclude_diagonal=True)

    got = torch.compile(fn, fullgraph=True)(f)
    ref = fn(f)
    assert_close(got, ref, **MATMUL_TOL[torch.bfloat16])
    assert_close(torch.autograd.grad(got, f)[0], torch.autograd.grad(ref, f)[0], **MATMUL_TOL[torch.bfloat16])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [19, 70])  # the similarity and the Gram
@runs_impl
def test_under_autocast_is_the_op_on_features_in_the_autocast_dtype(impl, ac, B):
    # the exact semantics (the grid compares with the reference at the autocast dtype's tolerance): the op
    # casts the features as autocast casts a matmul's operands, and nothing else changes; fp64 is not cast
    f = randn(B, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=ac):
        got = umae.uniformity_loss(f, exclude_diagonal=True)
    want = umae.uniformity_loss(f.to(ac), exclude_diagonal=True)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, f)[0], torch.autograd.grad(want, f)[0])
    f64 = randn(B, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=ac):
        got = umae.uniformity_loss(f64)
    assert got.dtype == torch.float64 and torch.equal(got, umae.uniformity_loss(f64))


# ---- edges: second order, argument types, gradient layouts, forward-mode AD ----

@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_uniformity_double_backward_is_refused(device, impl):
    # the C++ op's first-order gradient did not require grad: terms built on it were dropped silently
    f = randn(6, 5, device=device, requires_grad=True)
    assert_runs("uniformity_loss", impl, f)
    with umae.use_backend("reference"):
        (ref,) = torch.autograd.grad(umae.uniformity_loss(f), f)
    assert_second_order_refused(umae.uniformity_loss, f, ref)


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
@pytest.mark.parametrize("impl", cpu_impls("uniformity_loss"))
@runs_impl
def test_uniformity_global_batch_double_backward_is_refused(impl, tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        f = randn(6, 5, requires_grad=True)
        with umae.use_backend("reference"):
            (ref,) = torch.autograd.grad(umae.uniformity_loss(f), f)
        assert_second_order_refused(lambda t: umae.uniformity_loss(t, process_group=dist.group.WORLD), f, ref)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", cpu_impls("uniformity_loss"))
@pytest.mark.parametrize("normalize", [True, False])
@runs_impl
def test_uniformity_refuses_zero_features(impl, normalize):
    # the Triton path raised ZeroDivisionError; every path refuses (a D = 0 row cannot be L2-normalized)
    f = torch.zeros(4, 0)
    assert_runs("uniformity_loss", impl, f)
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match=r"features must have at least one column \(D >= 1\): a 0-dimensional "
                           rf"feature has no {'direction to normalize' if normalize else 'similarity'}.*\(4, 0\)"):
            umae.uniformity_loss(f, normalize, backend=backend)


@needs_ext
def test_cpp_uniformity_refuses_zero_features():
    with pytest.raises(RuntimeError, match=r"features must have at least one column"):
        torch.ops.umae.uniformity_loss(torch.zeros(4, 0), True, False, 1e-12)


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=["tiny", "larger"])
@pytest.mark.parametrize("layout", ["sum", "strided"])
def test_backward_reads_any_gradient_layout(shape, layout):
    assert_backward_reads_any_gradient_layout("uniformity_loss", shape, layout)


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_forward_mode_ad_is_refused_not_zero(api):
    assert_forward_mode_ad_refused("uniformity_loss", api)

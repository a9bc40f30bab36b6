"""U-MAE's uniformity loss, sum_ij (z_i . z_j)^2 over L2-normalized rows z_i of F (B, D).

The B x B similarity matrix S = Z Z^T is never formed: sum_ij S_ij^2 = ||S||_F^2 =
||Z^T Z||_F^2, the squared Frobenius norm of the D x D Gram G = Z^T Z. So
- forward: one program per upper-triangular (D-tile, D-tile) pair of G accumulates the tile
  over the batch (large batches: over a slice of it, see `splits`) (tl.dot, fp32
  accumulation), squares it and reduces it in registers, writing
  one fp32 partial (off-diagonal tiles count twice: G is symmetric). The partials are summed
  in a fixed order: deterministic, no atomics. Normalization is folded in (row norms once).
- backward: dL/dZ = 4 c Z G (c = 1/B^2). When a gradient will be needed the forward's tile
  kernel also stores G (D x D fp32, which the backward gets saved with the row norms), so the
  backward is one more kernel, Z G tile by tile, and a few B x D elementwise ops.
Cost is 2 B D^2 FLOPs instead of 2 B^2 D, and memory O(B D + D^2), never O(B^2). Where the batch
is the smaller (B < D: U-MAE's per-rank batches of 64-256 at D = 768) the loss is summed from
the B x B similarity S = Z Z^T instead (||S||_F = ||G||_F), tile by tile in the same way, and the
backward is S Z: B/D of the Gram's FLOPs (`uses_similarity`, the C++ CPU kernel's rule). Either
way the gradient's epilogue (the diagonal terms, the normalization's Jacobian) is one kernel.

Precision: fp32 features use fp32 (IEEE) products; bf16 / fp16 features are normalized in
fp32, rounded once to their dtype and multiplied on the tensor cores with fp32 accumulation.
Under the interpreter (whose bf16 arithmetic is unreliable) the same rounding is done by torch
before the launch and the rounded values are multiplied in fp32: the GPU path's numerics.
The backward's Z G product rounds the fp32 G to the features' dtype too (the tensor cores take
both operands in it): a second bf16/fp16 rounding the reference (fp32 throughout) does not
have, covered by the MATMUL_TOL tolerances. G's entries reach the batch size for collapsed
features, past fp16's 65504, so G is scaled by a power of two to at most 1 before that
rounding and the product scaled back in fp32 (exact for bf16, which has fp32's range).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._util import INTERPRETED, cast_rn, on_device, sm_count

# DOT_DTYPE: the dtype z is rounded to before the products. FP32: IEEE fp32 products (fp32
# features, and every input under the interpreter, whose bf16 arithmetic is unreliable);
# BF16 / FP16: the tensor cores with fp32 accumulation.
DOT_IN_FP32 = tl.constexpr(0)
DOT_IN_BF16 = tl.constexpr(1)
DOT_IN_FP16 = tl.constexpr(2)
_GPU_DOT = {torch.float32: DOT_IN_FP32.value, torch.bfloat16: DOT_IN_BF16.value, torch.float16: DOT_IN_FP16.value}


@triton.jit
def _load_z(f_ptr, rinv_ptr, rows, cols, B, D, stride_f_b, stride_f_d, DOT_DTYPE: tl.constexpr):
    m = (rows < B)[:, None] & (cols < D)[None, :]
    f_off = rows[:, None].to(tl.int64) * stride_f_b + cols[None, :] * stride_f_d
    z = tl.load(f_ptr + f_off, mask=m, other=0.0).to(tl.float32)
    z = z * tl.load(rinv_ptr + rows, mask=rows < B, other=0.0)[:, None]
    if DOT_DTYPE == DOT_IN_BF16:
        z = z.to(tl.bfloat16)
    elif DOT_DTYPE == DOT_IN_FP16:
        z = z.to(tl.float16)
    return z


@triton.jit
def _gram_kernel(f_ptr, rinv_ptr, gram_ptr, sq_ptr, B, D, stride_f_b, stride_f_d, rows_per_split,
                 STORE_GRAM: tl.constexpr, SQUARE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    # program (pi, pj, ps): Gram tile (I, J) over batch rows [ps * rows_per_split, ...)
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    ps = tl.program_id(2)
    nt = tl.num_programs(0)
    if pi <= pj:
        di = pi * BLOCK_D + tl.arange(0, BLOCK_D)
        dj = pj * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        b_lo = ps * rows_per_split
        b_hi = tl.minimum(b_lo + rows_per_split, B)
        for b0 in range(b_lo, b_hi, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            b = tl.where(b < b_hi, b, B)  # rows of the next split read as padding
            a = _load_z(f_ptr, rinv_ptr, b, di, B, D, stride_f_b, stride_f_d, DOT_DTYPE)
            c = _load_z(f_ptr, rinv_ptr, b, dj, B, D, stride_f_b, stride_f_d, DOT_DTYPE)
            if DOT_DTYPE == DOT_IN_FP32:
                acc += tl.dot(tl.trans(a), c, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(a), c)
        if STORE_GRAM:  # G[I, J] and its mirror G[J, I], in this split's slice of gram
            m = (di < D)[:, None] & (dj < D)[None, :]
            g_ptr = gram_ptr + ps.to(tl.int64) * D * D
            tl.store(g_ptr + di[:, None] * D + dj[None, :], acc, mask=m)
            if pi != pj:
                tl.store(g_ptr + di[:, None] + dj[None, :] * D, acc, mask=m)
        if SQUARE:  # one split: this tile's share of ||G||^2 (off-diagonal tiles twice)
            w = tl.where(pi == pj, 1.0, 2.0)
            tl.store(sq_ptr + pi * nt + pj, tl.sum(tl.sum(acc * acc, axis=1), axis=0) * w)
    else:
        if SQUARE:
            tl.store(sq_ptr + pi * nt + pj, 0.0)


@triton.jit
def _z_times_gram_kernel(f_ptr, rinv_ptr, g_ptr, out_ptr, B, D, stride_f_b, stride_f_d,
                         DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[b, J] = sum_k z[b, k] G[k, J], fp32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        z = _load_z(f_ptr, rinv_ptr, rows, k, B, D, stride_f_b, stride_f_d, DOT_DTYPE)
        g = tl.load(g_ptr + k[:, None] * D + cols[None, :], mask=(k < D)[:, None] & (cols < D)[None, :], other=0.0)
        if DOT_DTYPE == DOT_IN_FP32:
            acc += tl.dot(z, g, input_precision="ieee")
        elif DOT_DTYPE == DOT_IN_BF16:
            acc += tl.dot(z, g.to(tl.bfloat16))
        else:
            acc += tl.dot(z, g.to(tl.float16))
    m = (rows < B)[:, None] & (cols < D)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], acc, mask=m)


@triton.jit
def _sim_kernel(f_ptr, rinv_ptr, sim_ptr, sq_ptr, B, D, stride_f_b, stride_f_d, STORE_SIM: tl.constexpr,
                EXCLUDE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (pi, pj): tile (I, J) of S = Z Z^T, the contraction over D in registers
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    nt = tl.num_programs(0)
    if pi <= pj:
        bi = pi * BLOCK_B + tl.arange(0, BLOCK_B)
        bj = pj * BLOCK_B + tl.arange(0, BLOCK_B)
        acc = tl.zeros([BLOCK_B, BLOCK_B], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _load_z(f_ptr, rinv_ptr, bi, k, B, D, stride_f_b, stride_f_d, DOT_DTYPE)
            c = _load_z(f_ptr, rinv_ptr, bj, k, B, D, stride_f_b, stride_f_d, DOT_DTYPE)
            if DOT_DTYPE == DOT_IN_FP32:
                acc += tl.dot(a, tl.trans(c), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(c))
        if EXCLUDE:  # the diagonal dropped exactly, in S itself (its backward then has no diagonal term)
            acc = tl.where(bi[:, None] == bj[None, :], 0.0, acc)
        if STORE_SIM:  # S[I, J] and its mirror S[J, I]
            m = (bi < B)[:, None] & (bj < B)[None, :]
            tl.store(sim_ptr + bi[:, None].to(tl.int64) * B + bj[None, :], acc, mask=m)
            if pi != pj:
                tl.store(sim_ptr + bi[:, None] + bj[None, :].to(tl.int64) * B, acc, mask=m)
        w = tl.where(pi == pj, 1.0, 2.0)  # S is symmetric: off-diagonal tiles twice
        tl.store(sq_ptr + pi * nt + pj, tl.sum(tl.sum(acc * acc, axis=1), axis=0) * w)
    else:
        tl.store(sq_ptr + pi * nt + pj, 0.0)


@triton.jit
def _sim_times_z_kernel(s_ptr, z_ptr, out_ptr, B, D, stride_z_b, stride_z_d,
                        DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[I, J] = sum_k S[I, k] z[k, J], fp32; z (B, D) as the dot takes it, read by its strides (formed from
    # f, it keeps f's layout: a transposed f gives a column-major z), S rounded to that dtype as G is in Z G.
    # B < D: B * B and B * D fit int32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, B, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        sv = tl.load(s_ptr + rows[:, None] * B + k[None, :], mask=(rows < B)[:, None] & (k < B)[None, :], other=0.0)
        z = tl.load(z_ptr + k[:, None] * stride_z_b + cols[None, :] * stride_z_d,
                    mask=(k < B)[:, None] & (cols < D)[None, :], other=0.0)
        if DOT_DTYPE == DOT_IN_FP32:
            acc += tl.dot(sv, z, input_precision="ieee")
        else:
            acc += tl.dot(sv.to(z.dtype), z)
    m = (rows < B)[:, None] & (cols < D)[None, :]
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc, mask=m)


@triton.jit
def _grad_rows_kernel(f_ptr, rinv_ptr, norms_ptr, zg_ptr, scale_ptr, out_ptr, B, D, stride_f_b, stride_f_d, c, eps,
                      HAS_SCALE: tl.constexpr, CORRECT: tl.constexpr, EXCLUDE: tl.constexpr, NORMALIZE: tl.constexpr,
                      ROUND_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # dL/df of rows [pid * BLOCK_R, ...) from zg = Z G (as z_times_gram left it): dz = c zg (zg / scale
    # where G was scaled), the diagonal terms (CORRECT: the rounded z's |zr|^2 zr out, and back unrounded
    # unless EXCLUDE), then through the normalization. What _grad_from_gram does in torch ops, in one pass.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < B
    m = rmask[:, None] & (cols < D)[None, :]
    f = tl.load(f_ptr + rows[:, None].to(tl.int64) * stride_f_b + cols[None, :] * stride_f_d, mask=m, other=0.0)
    rinv = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
    z = f.to(tl.float32) * rinv[:, None]
    off = rows[:, None].to(tl.int64) * D + cols[None, :]
    cz = c
    if HAS_SCALE:
        cz = c / tl.load(scale_ptr)
    dz = tl.load(zg_ptr + off, mask=m, other=0.0) * cz
    if CORRECT:
        zr = cast_rn(z, ROUND_DTYPE).to(tl.float32)
        dz -= (c * tl.sum(zr * zr, axis=1))[:, None] * zr
        if not EXCLUDE:
            dz += (c * tl.sum(z * z, axis=1))[:, None] * z
    if NORMALIZE:
        # the Jacobian of z = f / max(|f|, eps): (I - z z^T) / |f| above eps, I / eps below
        big = tl.load(norms_ptr + rows, mask=rmask, other=0.0) > eps
        radial = tl.where(big, tl.sum(z * dz, axis=1), 0.0)
        dz = rinv[:, None] * (dz - z * radial[:, None])
    tl.store(out_ptr + off, dz, mask=m)


# tile configurations, with their warps: the defaults, then the candidates the GPU check times at
# U-MAE's shapes in bf16 (`umae bench --tune`; each compiled for sm_90 and audited by the tests)
GRAM_CFG = dict(BLOCK_D=64, BLOCK_B=32, num_warps=4)  # BLOCK_B=64: 66-98 KB of pipelined operands, 12-19% occupancy
ZG_CFG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4)
SIM_CFG = dict(BLOCK_B=32, BLOCK_K=32, num_warps=4)  # the similarity's tiles (fp32 64 x 32: 19% occupancy on sm_90)
SZ_CFG = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4)  # S Z (fp32 64 x 64: 19% occupancy on sm_90)
NUM_WARPS = 4  # the gradient epilogue's
CANDIDATES = {
    # (BLOCK_D=128 at 8 warps: 12% occupancy on the audit)
    "GRAM_CFG": [GRAM_CFG, dict(BLOCK_D=64, BLOCK_B=32, num_warps=4, num_stages=4),
                 dict(BLOCK_D=64, BLOCK_B=64, num_warps=4, num_stages=2)],
    "ZG_CFG": [ZG_CFG, dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8)],
    "SIM_CFG": [SIM_CFG, dict(BLOCK_B=64, BLOCK_K=32, num_warps=4), dict(BLOCK_B=64, BLOCK_K=64, num_warps=8)],
    "SZ_CFG": [SZ_CFG, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4)],
}
# (B, D) the candidates are timed (and compiled) at: U-MAE's per-rank batch (the similarity) and a large
# one (the Gram)
TUNE_AT = ((256, 768), (16384, 768))
# which configurations serve which product: the forward's square sum and the backward's
PRODUCTS = {"gram": ("GRAM_CFG", "ZG_CFG"), "sim": ("SIM_CFG", "SZ_CFG")}


@contextlib.contextmanager
def configured(**cfgs):
    """The launchers use `cfgs` ({"GRAM_CFG": dict(...), ...}) while this holds (the tuning runs)."""
    g = globals()
    old = {k: g[k] for k in cfgs}
    g.update(cfgs)
    try:
        yield
    finally:
        g.update(old)


WAVES = 2  # Gram programs per SM the batch split aims for
MIN_ROWS_PER_SPLIT = 512


def dot_kind(dtype) -> int:
    # the import-time flag, as cast_rn's: a compile check records launches with the interpreter's
    # environment set but compiles for the GPU, whose dot kind this must be
    return DOT_IN_FP32.value if INTERPRETED.value else _GPU_DOT[dtype]


def rounding_dtype(dtype):
    """The dtype z is rounded to before the products: the input's for bf16 / fp16, on the GPU (the
    tensor cores) and under the interpreter alike (there by torch, before the launch: _as_on_gpu)."""
    return dtype if _GPU_DOT[dtype] != DOT_IN_FP32.value else torch.float32


def _as_on_gpu(f, rinv, g=None):
    """Under the interpreter, half inputs are rounded as the GPU kernel rounds them -- z = f * rinv
    to f's dtype (round to nearest even), and G too for Z @ G -- by torch before the launch, and
    the kernel multiplies those values in fp32: exact products with fp32 accumulation, as the
    tensor cores do (the interpreter's own bf16 conversion truncates). On the GPU: unchanged."""
    if not INTERPRETED.value or _GPU_DOT[f.dtype] == DOT_IN_FP32.value:
        return f, rinv, g
    z = (f.float() * rinv[:, None]).to(f.dtype)
    return z, torch.ones_like(rinv), (g.to(f.dtype).float() if g is not None else None)


def splits(B: int, D: int, device) -> int:
    """Batch splits for the Gram: enough programs for WAVES waves over the device's SMs (an
    H100's where no GPU is visible, so the interpreter runs what that GPU would), each split
    at least MIN_ROWS_PER_SPLIT rows."""
    nt = triton.cdiv(D, GRAM_CFG["BLOCK_D"])
    tiles = nt * (nt + 1) // 2
    return max(1, min(triton.cdiv(WAVES * sm_count(device), tiles), B // MIN_ROWS_PER_SPLIT))


def _gram_launch(f, rinv, gram, sq, *, n_split: int):
    """gram: (n_split, D, D) fp32 or None; sq: (nt * nt,) fp32 partials of ||G||^2 or None. An
    absent output gets the other's pointer, which the kernel does not write through."""
    f, rinv, _ = _as_on_gpu(f, rinv)
    B, D = f.shape
    nt = triton.cdiv(D, GRAM_CFG["BLOCK_D"])
    rows = triton.cdiv(triton.cdiv(B, n_split), GRAM_CFG["BLOCK_B"]) * GRAM_CFG["BLOCK_B"]
    store_gram, square = gram is not None, sq is not None
    with on_device(f):
        _gram_kernel[(nt, nt, n_split)](f, rinv, gram if store_gram else sq, sq if square else gram, B, D,
                                        f.stride(0), f.stride(1), rows, STORE_GRAM=store_gram, SQUARE=square,
                                        DOT_DTYPE=dot_kind(f.dtype), **GRAM_CFG)


def uses_similarity(B: int, D: int, exact_offdiagonal: bool = False) -> bool:
    """Whether the loss is summed from the B x B similarity S = Z Z^T rather than the D x D Gram: where
    S is the smaller (B < D), as the C++ CPU kernel chooses. ||S||_F = ||G||_F; S costs 2 B^2 D FLOPs
    to G's 2 B D^2 (U-MAE's per-rank batches of 64-256 at D = 768: 3-12x fewer), and its backward
    dZ = 4c S Z the same factor. Always for `exact_offdiagonal` (the diagonal-free loss of unnormalized
    rows): ||G||^2 - sum_i |z_i|^4 cancels catastrophically when one row's norm dominates; S drops
    its diagonal exactly (B x B, as the reference's)."""
    return B < D or exact_offdiagonal


def square_sum(f, rinv, *, keep: bool = False, exact_offdiagonal: bool = False):
    """(sum_ij (z_i . z_j)^2 as an fp32 scalar -- over i != j only with exact_offdiagonal --, the product
    the backward needs if `keep` else None: S (B, B) where uses_similarity, else G (D, D), fp32);
    z = f * rinv[:, None]. One launch."""
    B, D = f.shape
    if uses_similarity(B, D, exact_offdiagonal):
        return _sim_square_sum(f, rinv, keep=keep, exclude=exact_offdiagonal)
    return gram_square_sum(f, rinv, keep_gram=keep)


def _sim_launch(f, rinv, sim, sq, exclude: bool = False):
    """sq: (nt * nt,) fp32 partials of ||S||^2 (its diagonal dropped with `exclude`); sim: (B, B) fp32 or
    None (sq's pointer, not written)."""
    f, rinv, _ = _as_on_gpu(f, rinv)
    B, D = f.shape
    nt = triton.cdiv(B, SIM_CFG["BLOCK_B"])
    with on_device(f):
        _sim_kernel[(nt, nt)](f, rinv, sim if sim is not None else sq, sq, B, D, f.stride(0), f.stride(1),
                              STORE_SIM=sim is not None, EXCLUDE=exclude, DOT_DTYPE=dot_kind(f.dtype), **SIM_CFG)


def _sim_square_sum(f, rinv, *, keep: bool, exclude: bool = False):
    B = f.shape[0]
    nt = triton.cdiv(B, SIM_CFG["BLOCK_B"])
    sq = torch.empty((nt * nt,), device=f.device, dtype=torch.float32)
    sim = torch.empty((B, B), device=f.device, dtype=torch.float32) if keep else None
    _sim_launch(f, rinv, sim, sq, exclude)
    return sq.sum(), sim


def sim_times_z(f, rinv, s):
    """S @ Z (B, D) fp32. z is formed once, in the dtype the dot takes (the features' on the tensor
    cores, rounded as _load_z rounds it; fp32 otherwise): a row-scaled operand computed in the kernel
    cost it a quarter of its occupancy and spilled (the sm_90 audit)."""
    f, rinv, s = _as_on_gpu(f, rinv, s)
    B, D = f.shape
    kind = dot_kind(f.dtype)
    z = f.to(torch.float32) * rinv[:, None]
    if kind != DOT_IN_FP32.value:
        z = z.to(f.dtype)
    out = torch.empty((B, D), device=f.device, dtype=torch.float32)
    grid = (triton.cdiv(B, SZ_CFG["BLOCK_M"]), triton.cdiv(D, SZ_CFG["BLOCK_N"]))
    with on_device(f):
        _sim_times_z_kernel[grid](s, z, out, B, D, z.stride(0), z.stride(1), DOT_DTYPE=kind, **SZ_CFG)
    return out


def gram_square_sum(f, rinv, *, keep_gram: bool = False):
    """(sum_ij (z_i . z_j)^2 = ||Z^T Z||_F^2 as an fp32 scalar, G = Z^T Z (D, D) fp32 if keep_gram
    else None); z = f * rinv[:, None]. One launch.

    One split: the tiles are squared and reduced in registers (G stored beside only if kept).
    Large batches are split across programs; their partial Grams (n_split x D x D fp32) are summed
    in a fixed order before squaring (squares of partial sums would be wrong)."""
    B, D = f.shape
    n_split = splits(B, D, f.device)
    if n_split > 1:
        g = gram(f, rinv)
        return g.pow(2).sum(), (g if keep_gram else None)
    nt = triton.cdiv(D, GRAM_CFG["BLOCK_D"])
    sq = torch.empty((nt * nt,), device=f.device, dtype=torch.float32)
    g = torch.empty((D, D), device=f.device, dtype=torch.float32) if keep_gram else None
    _gram_launch(f, rinv, g, sq, n_split=1)
    return sq.sum(), g


def gram(f, rinv):
    """G = Z^T Z (D, D) fp32."""
    B, D = f.shape
    n_split = splits(B, D, f.device)
    out = torch.empty((n_split, D, D), device=f.device, dtype=torch.float32)
    _gram_launch(f, rinv, out, None, n_split=n_split)
    return out[0] if n_split == 1 else out.sum(0)


def gram_scale(g, dtype):
    """The power of two Z @ G's operand G is scaled by before its rounding to `dtype` (1 if not
    fp16): max |G| <= 1, so fp16 does not overflow. A device tensor: no host sync."""
    if rounding_dtype(dtype) != torch.float16:
        return None
    return torch.exp2(-torch.ceil(torch.log2(g.abs().amax().clamp_min(2.0 ** -100))))


def z_times_gram(f, rinv, g):
    """Z @ G (B, D) fp32."""
    f, rinv, g = _as_on_gpu(f, rinv, g)
    B, D = f.shape
    out = torch.empty((B, D), device=f.device, dtype=torch.float32)
    grid = (triton.cdiv(B, ZG_CFG["BLOCK_M"]), triton.cdiv(D, ZG_CFG["BLOCK_N"]))
    with on_device(f):
        _z_times_gram_kernel[grid](f, rinv, g, out, B, D, f.stride(0), f.stride(1), DOT_DTYPE=dot_kind(f.dtype),
                                   **ZG_CFG)
    return out


def grad_rows(f, rinv, norms, m, c: float, *, exclude_diagonal: bool, normalize: bool, eps: float,
              exact_offdiagonal: bool = False):
    """dL/df (B, D) fp32 of L = c/4 (||G||^2 - [exclude] sum_i |z_i|^4) from square_sum's kept product
    m: Z G (z_times_gram) or S Z (sim_times_z), the same rows, then the rest in one pass
    (_grad_rows_kernel), where torch ops took a dozen launches."""
    scale = gram_scale(m, f.dtype)  # fp16: G (or S) scaled to <= 1 before its rounding
    m = m if scale is None else m * scale
    B, D = f.shape
    zg = sim_times_z(f, rinv, m) if uses_similarity(B, D, exact_offdiagonal) else z_times_gram(f, rinv, m)
    out = torch.empty((B, D), device=f.device, dtype=torch.float32)
    if B * D == 0:
        return out
    round_dtype = rounding_dtype(f.dtype)
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(triton.next_power_of_2(B), 4096 // block_d))
    tl_round = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[round_dtype]
    with on_device(f):
        _grad_rows_kernel[(triton.cdiv(B, block_r),)](
            f, rinv, norms, zg, scale if scale is not None else rinv, out, B, D, f.stride(0), f.stride(1), c, eps,
            # S without its diagonal (exact_offdiagonal) leaves no diagonal term to correct
            HAS_SCALE=scale is not None,
            CORRECT=not exact_offdiagonal and (exclude_diagonal or round_dtype != torch.float32),
            EXCLUDE=exclude_diagonal, NORMALIZE=normalize, ROUND_DTYPE=tl_round, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=NUM_WARPS)
    return out

// MAE's random masking on CPU: a stable argsort of each noise row, then the gather of the
// kept rows of x (+ pos_embed) behind the cls token. Removed rows are never read.
// Backward writes grad x row by row from ids_restore and sums grad pos in the same pass.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "../common.h"
#include "token_rows.h"

namespace umae {
namespace {

constexpr int64_t kRowsPerTask = 16;  // token rows per parallel_for grain: enough to amortize a task

// An unsigned key in the order of torch's ascending sort: numbers ascending (-0.0 == 0.0), NaN last.
inline uint64_t order_key(double v) {
  if (std::isnan(v)) return ~uint64_t(0);
  if (v == 0) v = 0;  // -0.0 ties with 0.0
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits >> 63) ? ~bits : bits | (uint64_t(1) << 63);
}

// The argsort of each noise row (ids_restore, mask) and the gather of the kept rows of x (+ pos) into
// out[:, c0:], in xp. Needs N * L > 0.
void gather_kept(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& pos, at::Tensor& out, at::Tensor& mask,
                 at::Tensor& ids_restore, at::Tensor& shuffle, int64_t len_keep, int64_t c0, at::ScalarType xp) {
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2);
  // Doubles hold every floating noise value exactly, so the order is the noise's own.
  const at::Tensor nz = noise.to(at::kDouble).contiguous();
  const double* NZ = nz.const_data_ptr<double>();
  int64_t* IR = ids_restore.mutable_data_ptr<int64_t>();
  int64_t* SH = shuffle.mutable_data_ptr<int64_t>();
  float* M = mask.mutable_data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<std::pair<uint64_t, int64_t>> keys(L);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t l = 0; l < L; ++l) keys[l] = {order_key(NZ[n * L + l]), l};
      // (key, index) pairs are distinct: sorting them is torch.argsort(stable=True)
      std::sort(keys.begin(), keys.end());
      for (int64_t j = 0; j < L; ++j) {
        const int64_t l = keys[j].second;
        SH[n * L + j] = l;
        IR[n * L + l] = j;
        M[n * L + l] = j < len_keep ? 0.f : 1.f;
      }
    }
  });

  const int64_t sxn = x.stride(0), sxl = x.stride(1), sxd = x.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "random_masking_cpu", [&] {
    using x_t = scalar_t;
    const x_t* X = x.const_data_ptr<x_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xp, "random_masking_cpu", [&] {
      using xp_t = scalar_t;
      xp_t* O = out.mutable_data_ptr<xp_t>();
      const xp_t* P = pos.defined() ? pos.const_data_ptr<xp_t>() : nullptr;
      at::parallel_for(0, N * len_keep, kRowsPerTask, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t n = q / len_keep, j = q - n * len_keep, l = SH[n * L + j];
          xp_t* dst = O + (n * (len_keep + c0) + c0 + j) * D;
          const x_t* src = X + n * sxn + l * sxl;
          add_row(dst, src, sxd, P ? P + l * D : nullptr, D);
        }
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& x, const at::Tensor& noise,
                                                                  const std::optional<at::Tensor>& pos_embed,
                                                                  const std::optional<at::Tensor>& cls_token,
                                                                  int64_t len_keep) {
  TORCH_CHECK(x.dim() == 3 && is_float_type(x.scalar_type()), "random_masking: x must be a floating (N, L, D) tensor, got ",
              x.sizes(), " ", x.scalar_type());
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2);
  TORCH_CHECK(noise.dim() == 2 && noise.size(0) == N && noise.size(1) == L && is_float_type(noise.scalar_type()),
              "random_masking: noise must be a floating (N, L) = (", N, ", ", L, ") tensor, got ", noise.sizes());
  TORCH_CHECK(len_keep >= 0 && len_keep <= L, "random_masking: len_keep must be in [0, L=", L, "], got ", len_keep);
  check_same_device(x, noise, "random_masking", "noise");
  at::ScalarType xp = x.scalar_type();
  at::Tensor pos;
  if (pos_embed.has_value()) {
    pos = *pos_embed;
    TORCH_CHECK(pos.dim() == 3 && pos.size(0) == 1 && pos.size(1) == L && pos.size(2) == D &&
                    is_float_type(pos.scalar_type()),
                "random_masking: pos_embed must be a floating (1, L, D) = (1, ", L, ", ", D, ") tensor, got ", pos.sizes());
    check_same_device(x, pos, "random_masking", "pos_embed");
    xp = at::promote_types(xp, pos.scalar_type());
    pos = pos[0].to(xp).contiguous();  // (L, D), exact: xp holds pos's values
  }
  at::ScalarType out_type = xp;
  if (cls_token.has_value()) {
    const at::Tensor& c = *cls_token;
    TORCH_CHECK(c.dim() == 3 && c.size(0) == 1 && c.size(1) == 1 && c.size(2) == D && is_float_type(c.scalar_type()),
                "random_masking: cls_token must be a floating (1, 1, D) = (1, 1, ", D, ") tensor, got ", c.sizes());
    check_same_device(x, c, "random_masking", "cls_token");
    out_type = at::promote_types(xp, c.scalar_type());
  }
  const int64_t c0 = cls_token.has_value() ? 1 : 0;
  // Kept rows are written in xp (their one rounding); a wider cls dtype widens them afterwards.
  at::Tensor out = at::empty({N, len_keep + c0, D}, x.options().dtype(xp));
  at::Tensor mask = at::empty({N, L}, x.options().dtype(at::kFloat));
  at::Tensor ids_restore = at::empty({N, L}, x.options().dtype(at::kLong));
  at::Tensor shuffle = at::empty({N, L}, x.options().dtype(at::kLong));
  if (N * L > 0) gather_kept(x, noise, pos, out, mask, ids_restore, shuffle, len_keep, c0, xp);
  if (out_type != xp) out = out.to(out_type);
  // after the gather: with L == 0 (or len_keep == 0) the cls row is all there is, and it is written too
  if (c0) out.select(1, 0).copy_(cls_token->view({1, D}).expand({N, D}));
  return {out, mask, ids_restore};
}

// grad_out (N, c + keep, D) -> (grad of x + pos (N, L, D) in `dtype`, its sum over N
// (L, D) fp32 when need_pos). With the pos sum: parallel over token positions l, so the sum needs
// no atomics and its order (n ascending) does not depend on the thread count; without: over rows.
std::tuple<at::Tensor, at::Tensor> random_masking_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids_restore,
                                                               bool has_cls, bool need_pos, at::ScalarType dtype) {
  TORCH_CHECK(grad_out.dim() == 3 && is_float_type(grad_out.scalar_type()),
              "random_masking_backward: grad_out must be a floating (N, c + len_keep, D) tensor, got ", grad_out.sizes());
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.scalar_type() == at::kLong && ids_restore.size(0) == grad_out.size(0),
              "random_masking_backward: ids_restore must be int64 (N, L), got ", ids_restore.sizes(), " ",
              ids_restore.scalar_type());
  const int64_t N = ids_restore.size(0), L = ids_restore.size(1), D = grad_out.size(2), c0 = has_cls;
  const int64_t keep = grad_out.size(1) - c0;
  TORCH_CHECK(keep >= 0 && keep <= L, "random_masking_backward: grad_out has ", grad_out.size(1), " rows, expected ",
              c0, " + len_keep <= ", c0 + L);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor ids = ids_restore.contiguous();
  at::Tensor gx = at::empty({N, L, D}, g.options());
  at::Tensor gpos = at::empty({need_pos ? L : 0, D}, g.options().dtype(at::toOpMathType(g.scalar_type())));
  if (N * L * D == 0) return {gx.to(dtype), gpos.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "random_masking_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* G = g.const_data_ptr<scalar_t>();
    const int64_t* I = ids.const_data_ptr<int64_t>();
    scalar_t* GX = gx.mutable_data_ptr<scalar_t>();
    acc_t* GP = need_pos ? gpos.mutable_data_ptr<acc_t>() : nullptr;
    auto row = [&](int64_t n, int64_t l, acc_t* gp) {
      const int64_t r = I[n * L + l];
      TORCH_CHECK(r >= 0 && r < L, "random_masking_backward: ids_restore[", n, ", ", l, "] = ", r, " is out of [0, ", L, ")");
      scalar_t* dst = GX + (n * L + l) * D;
      if (r >= keep) {
        std::fill(dst, dst + D, scalar_t(0));
        return;
      }
      const scalar_t* src = G + (n * (keep + c0) + c0 + r) * D;
      std::copy(src, src + D, dst);
      if (gp) {
        _Pragma("omp simd")  // inside a dispatch macro: no #pragma
        for (int64_t d = 0; d < D; ++d) gp[d] += static_cast<acc_t>(src[d]);
      }
    };
    if (!GP) {  // grad x alone: rows in memory order
      at::parallel_for(0, N * L, kRowsPerTask, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) row(q / L, q % L, nullptr);
      });
      return;
    }
    at::parallel_for(0, L, std::max<int64_t>(1, kRowsPerTask / std::max<int64_t>(N, 1)), [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l) {
        acc_t* gp = GP + l * D;
        std::fill(gp, gp + D, acc_t(0));
        for (int64_t n = 0; n < N; ++n) row(n, l, gp);
      }
    });
  });
  return {gx.to(dtype), gpos};  // gpos summed the unrounded gradient
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key in csrc/cuda/ or, for the Triton
// ops, from umae/<op>_op.py). Semantics: the reference in umae/<op>_op.py.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // x (N, L, D), noise (N, L) -> (x_masked (N, c + len_keep, D), mask (N, L) fp32, ids_restore (N, L) int64).
  m.def("random_masking(Tensor x, Tensor noise, Tensor? pos_embed, Tensor? cls_token, int len_keep) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (grad of x + pos (N, L, D) stored in `dtype`, its sum over N (L, D) in the accumulation dtype
  // (fp32; fp64 for fp64) if need_pos, else (0, D)).
  m.def("random_masking_backward(Tensor grad_out, Tensor ids_restore, bool has_cls, bool need_pos, "
        "ScalarType dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("random_masking_backward", &random_masking_backward_cpu);
}

}  // namespace umae

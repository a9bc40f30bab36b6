// MAE's random masking on CPU: a stable argsort of each noise row, then the gather of the
// kept rows of x (+ pos_embed) behind the cls token. Removed rows are never read.
// Backward writes grad x row by row from ids_restore and sums grad pos in the same pass. Also the
// op's autograd, for every device.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "../common.h"

namespace umae {
namespace {

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
                 at::Tensor& ids_restore, int64_t len_keep, int64_t c0, at::ScalarType xp) {
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2);
  std::vector<int64_t> shuffle(N * L);
  int64_t* IR = ids_restore.mutable_data_ptr<int64_t>();
  int64_t* SH = shuffle.data();
  float* M = mask.mutable_data_ptr<float>();
  const int64_t snn = noise.stride(0), snl = noise.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "random_masking_sort", [&] {
    const scalar_t* NZ = noise.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(16 * L), [&](int64_t n0, int64_t n1) {  // a sort: ~L log L
      std::vector<std::pair<uint64_t, int64_t>> keys(L);
      for (int64_t n = n0; n < n1; ++n) {
        // doubles hold every floating noise value exactly, so the order is the noise's own
        for (int64_t l = 0; l < L; ++l) keys[l] = {order_key(static_cast<double>(NZ[n * snn + l * snl])), l};
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
  });

  const int64_t sxn = x.stride(0), sxl = x.stride(1), sxd = x.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "random_masking_cpu", [&] {
    using x_t = scalar_t;
    const x_t* X = x.const_data_ptr<x_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xp, "random_masking_cpu", [&] {
      using xp_t = scalar_t;
      xp_t* O = out.mutable_data_ptr<xp_t>();
      const xp_t* P = pos.defined() ? pos.const_data_ptr<xp_t>() : nullptr;
      at::parallel_for(0, N * len_keep, grain_for(D), [&](int64_t q0, int64_t q1) {
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
    if (pos.scalar_type() != xp) pos = pos.to(xp);  // exact: xp holds pos's values
    if (!pos.is_contiguous()) pos = pos.contiguous();  // read as (L, D)
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
  if (N * L > 0) gather_kept(x, noise, pos, out, mask, ids_restore, len_keep, c0, xp);
  if (out_type != xp) out = out.to(out_type);
  // after the gather: with L == 0 (or len_keep == 0) the cls row is all there is, and it is written too
  if (c0 && N * D > 0)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "random_masking_cls", [&] {
      const at::Tensor cls = cls_token->scalar_type() == out_type ? *cls_token : cls_token->to(out_type);
      const scalar_t* C = cls.const_data_ptr<scalar_t>();
      const int64_t sd = cls.stride(2);
      scalar_t* O = out.mutable_data_ptr<scalar_t>();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < D; ++d) O[n * (len_keep + 1) * D + d] = C[d * sd];
    });
  return {out, mask, ids_restore};
}

// grad_out (N, c + keep, D) -> (grad x (N, L, D) in x_dtype, grad pos_embed (1, L, D) in pos_dtype, grad
// cls_token (1, 1, D) in cls_dtype); each one empty (0,) where not needed. The pos and cls sums run over
// the unrounded gradient in the accumulation dtype. With the pos sum: parallel over token positions l, so
// the sum needs no atomics and its order (n ascending) does not depend on the thread count; without: over rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& ids_restore, bool has_cls, bool need_x, bool need_pos, bool need_cls,
    at::ScalarType x_dtype, at::ScalarType pos_dtype, at::ScalarType cls_dtype) {
  TORCH_CHECK(grad_out.dim() == 3 && is_float_type(grad_out.scalar_type()),
              "random_masking_backward: grad_out must be a floating (N, c + len_keep, D) tensor, got ", grad_out.sizes());
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.scalar_type() == at::kLong && ids_restore.size(0) == grad_out.size(0),
              "random_masking_backward: ids_restore must be int64 (N, L), got ", ids_restore.sizes(), " ",
              ids_restore.scalar_type());
  const int64_t N = ids_restore.size(0), L = ids_restore.size(1), D = grad_out.size(2), c0 = has_cls;
  const int64_t keep = grad_out.size(1) - c0;
  TORCH_CHECK(keep >= 0 && keep <= L, "random_masking_backward: grad_out has ", grad_out.size(1), " rows, expected ",
              c0, " + len_keep <= ", c0 + L);
  TORCH_CHECK(!need_cls || has_cls, "random_masking_backward: need_cls without a cls row");
  const at::Tensor& g = grad_out;  // read by its strides: no copy
  const at::Tensor ids = ids_restore.is_contiguous() ? ids_restore : ids_restore.contiguous();
  const auto acc_opts = g.options().dtype(at::toOpMathType(g.scalar_type()));
  at::Tensor gx = need_x ? at::empty({N, L, D}, g.options()) : at::empty({0}, g.options().dtype(x_dtype));
  at::Tensor gpos = need_pos ? at::zeros({1, L, D}, acc_opts) : at::empty({0}, g.options().dtype(pos_dtype));
  at::Tensor gcls = need_cls ? at::zeros({1, 1, D}, acc_opts) : at::empty({0}, g.options().dtype(cls_dtype));
  const int64_t sgn = g.stride(0), sgl = g.stride(1), sgd = g.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "random_masking_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* G = g.const_data_ptr<scalar_t>();
    const int64_t* I = ids.const_data_ptr<int64_t>();
    scalar_t* GX = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* GP = need_pos ? gpos.mutable_data_ptr<acc_t>() : nullptr;
    if (need_cls) {  // the cls rows' sum, n ascending
      acc_t* gc = gcls.mutable_data_ptr<acc_t>();
      for (int64_t n = 0; n < N; ++n) add_row_to(gc, G + n * sgn, sgd, D);
    }
    if (N * L * D == 0 || !(GX || GP)) return;
    auto row = [&](int64_t n, int64_t l, acc_t* gp) {
      const int64_t r = I[n * L + l];
      TORCH_CHECK(r >= 0 && r < L, "random_masking_backward: ids_restore[", n, ", ", l, "] = ", r, " is out of [0, ", L, ")");
      scalar_t* dst = GX ? GX + (n * L + l) * D : nullptr;
      if (r >= keep) {
        if (dst) std::fill(dst, dst + D, scalar_t(0));
        return;
      }
      const scalar_t* src = G + n * sgn + (c0 + r) * sgl;
      if (dst) copy_row(dst, src, sgd, D);
      if (gp) add_row_to(gp, src, sgd, D);
    };
    if (!GP) {  // grad x alone: rows in memory order
      at::parallel_for(0, N * L, grain_for(D), [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) row(q / L, q % L, nullptr);
      });
      return;
    }
    at::parallel_for(0, L, grain_for(N * D), [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l)
        for (int64_t n = 0; n < N; ++n) row(n, l, GP + l * D);
    });
  });
  return {as_dtype(gx, x_dtype), as_dtype(gpos, pos_dtype), as_dtype(gcls, cls_dtype)};
}

using MaskingSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const std::optional<at::Tensor>&,
                                                                  const std::optional<at::Tensor>&, int64_t);
using MaskingBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool,
                                                                          bool, bool, bool, at::ScalarType,
                                                                          at::ScalarType, at::ScalarType);

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_masking(const at::Tensor& x, const at::Tensor& noise,
                                                            const std::optional<at::Tensor>& pos,
                                                            const std::optional<at::Tensor>& cls, int64_t len_keep) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = find_op<MaskingSig>("umae::random_masking");
  return op.call(x, noise, pos, cls, len_keep);
}

// The op's autograd, for every device. The op is linear in x, pos_embed and cls_token: the backward is
// the kernel's scatter, or (create_graph=True) the same map by differentiable ATen ops, so that a
// gradient of the gradient (double backward) is derived by autograd.
class RandomMaskingFunction : public torch::autograd::Function<RandomMaskingFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& noise,
                               const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& cls,
                               int64_t len_keep) {
    auto [out, mask, ids] = call_masking(x, noise, pos, cls, len_keep);
    ctx->save_for_backward({ids});
    ctx->saved_data["x_dtype"] = x.scalar_type();
    // the edges of pos and cls: the tensor arguments that are there, counted from x = 0
    ctx->saved_data["pos_edge"] = pos.has_value() ? int64_t(2) : int64_t(-1);
    ctx->saved_data["cls_edge"] = cls.has_value() ? int64_t(2 + pos.has_value()) : int64_t(-1);
    ctx->saved_data["pos_dtype"] = pos.has_value() ? pos->scalar_type() : x.scalar_type();
    ctx->saved_data["cls_dtype"] = cls.has_value() ? cls->scalar_type() : x.scalar_type();
    ctx->mark_non_differentiable({mask, ids});
    return {out, mask, ids};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor ids = ctx->get_saved_variables()[0];
    const at::Tensor& grad_out = grads[0];
    const int64_t pos_edge = ctx->saved_data["pos_edge"].toInt(), cls_edge = ctx->saved_data["cls_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_pos = pos_edge >= 0 && ctx->needs_input_grad(pos_edge);
    const bool need_cls = cls_edge >= 0 && ctx->needs_input_grad(cls_edge);
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto pos_dtype = ctx->saved_data["pos_dtype"].toScalarType();
    const auto cls_dtype = ctx->saved_data["cls_dtype"].toScalarType();
    at::Tensor gx, gpos, gcls;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a gradient that can be differentiated again
      const int64_t N = ids.size(0), L = ids.size(1), D = grad_out.size(2), c0 = cls_edge >= 0;
      const at::ScalarType acc = at::promote_types(grad_out.scalar_type(), at::kFloat);
      const at::Tensor body = grad_out.narrow(1, c0, grad_out.size(1) - c0);  // row j: the token of rank j
      const at::Tensor padded = at::cat({body, body.new_zeros({N, L - body.size(1), D})}, 1);  // removed: 0
      const at::Tensor g = at::gather(padded, 1, ids.unsqueeze(-1).expand({N, L, D}));  // back to positions
      if (need_x) gx = g.to(x_dtype);
      if (need_pos) gpos = g.to(acc).sum(0, true).to(pos_dtype);
      if (need_cls) gcls = grad_out.narrow(1, 0, 1).to(acc).sum(0, true).to(cls_dtype);
    } else if (need_x || need_pos || need_cls) {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = find_op<MaskingBackwardSig>("umae::random_masking_backward");
      std::tie(gx, gpos, gcls) = op.call(grad_out, ids, cls_edge >= 0, need_x, need_pos, need_cls, x_dtype, pos_dtype,
                                         cls_dtype);
    }
    return {need_x ? gx : at::Tensor(), at::Tensor(), need_pos ? gpos : at::Tensor(), need_cls ? gcls : at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_autograd(const at::Tensor& x, const at::Tensor& noise,
                                                                       const std::optional<at::Tensor>& pos,
                                                                       const std::optional<at::Tensor>& cls,
                                                                       int64_t len_keep) {
  refuse_forward_ad("random_masking", x, pos, cls);
  if (!(records(x) || records(pos) || records(cls))) return call_masking(x, noise, pos, cls, len_keep);
  auto out = RandomMaskingFunction::apply(x, noise, pos, cls, len_keep);
  return {out[0], out[1], out[2]};
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key in csrc/cuda/ or, for the Triton
// ops, from umae/ops/<op>_op.py). Semantics: the reference in umae/ops/<op>_op.py.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // x (N, L, D), noise (N, L) -> (x_masked (N, c + len_keep, D), mask (N, L) fp32, ids_restore (N, L) int64).
  m.def("random_masking(Tensor x, Tensor noise, Tensor? pos_embed, Tensor? cls_token, int len_keep) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (grad x (N, L, D), grad pos_embed (1, L, D), grad cls_token (1, 1, D)), each in its input's dtype,
  // or empty (0,) where its need_ flag is false.
  m.def("random_masking_backward(Tensor grad_out, Tensor ids_restore, bool has_cls, bool need_x, bool need_pos, "
        "bool need_cls, ScalarType x_dtype, ScalarType pos_dtype, ScalarType cls_dtype) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(umae, Autograd, m) { m.impl("random_masking", &random_masking_autograd); }

UMAE_AUTOCAST_OFF("random_masking", "random_masking_backward")

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("random_masking_backward", &random_masking_backward_cpu);
}

}  // namespace umae

// The MAE decoder's restore on CPU in one pass: every output row is the cls row, a kept token
// (from x, at its rank) or the mask token, plus pos_embed. Backward scatters the kept rows'
// gradient to x and sums the pos and mask-token gradients in the same pass. Also the op's autograd,
// for every device.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace umae {
namespace {

constexpr int64_t kPositionsPerTask = 8;  // backward: token positions per task (a block's tok partial)

// ids_restore must be a permutation per row: the backward writes each kept row of grad x exactly once.
void check_permutation(const int64_t* ids, int64_t N, int64_t L) {
  at::parallel_for(0, N, grain_for(L), [&](int64_t n0, int64_t n1) {
    std::vector<char> seen(L);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t r = ids[n * L + l];
        TORCH_CHECK(r >= 0 && r < L && !seen[r], "restore_tokens: ids_restore[", n,
                    "] must be a permutation of 0..", L - 1, " (as random_masking returns), but has ", r, " at ", l);
        seen[r] = 1;
      }
    }
  });
}

at::Tensor restore_tokens_cpu(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                              const std::optional<at::Tensor>& pos_embed, bool has_cls) {
  TORCH_CHECK(x.dim() == 3 && is_float_type(x.scalar_type()), "restore_tokens: x must be a floating (N, c + len_keep, D) tensor, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.scalar_type() == at::kLong && ids_restore.size(0) == x.size(0),
              "restore_tokens: ids_restore must be int64 (N, L) with N = ", x.size(0), ", got ", ids_restore.sizes(), " ",
              ids_restore.scalar_type());
  const int64_t N = x.size(0), L = ids_restore.size(1), D = x.size(2), c0 = has_cls, R = L + c0;
  const int64_t keep = x.size(1) - c0;
  TORCH_CHECK(keep >= 0 && keep <= L, "restore_tokens: x must have between ", c0, " and ", R, " rows, got ", x.size(1));
  TORCH_CHECK(mask_token.numel() == D && is_float_type(mask_token.scalar_type()),
              "restore_tokens: mask_token must be a floating (1, 1, D) = (1, 1, ", D, ") tensor, got ", mask_token.sizes());
  check_same_device(x, ids_restore, "restore_tokens", "ids_restore");
  check_same_device(x, mask_token, "restore_tokens", "mask_token");
  // Each row's value is exact in promote(x, mask_token); the pos add rounds once to the output dtype.
  at::ScalarType out_type = at::promote_types(x.scalar_type(), mask_token.scalar_type());
  at::Tensor pos;
  if (pos_embed.has_value()) {
    TORCH_CHECK(pos_embed->numel() == R * D && pos_embed->size(-1) == D && is_float_type(pos_embed->scalar_type()),
                "restore_tokens: pos_embed must be a floating (1, ", R, ", ", D, ") tensor, got ", pos_embed->sizes());
    check_same_device(x, *pos_embed, "restore_tokens", "pos_embed");
    out_type = at::promote_types(out_type, pos_embed->scalar_type());
    pos = pos_embed->reshape({R, D}).to(out_type).contiguous();  // exact: out_type holds pos's values
  }
  const at::Tensor tok = mask_token.reshape({D}).to(out_type).contiguous();
  const at::Tensor ids = ids_restore.contiguous();
  at::Tensor out = at::empty({N, R, D}, x.options().dtype(out_type));
  if (out.numel() == 0) return out;
  const int64_t* I = ids.const_data_ptr<int64_t>();
  check_permutation(I, N, L);
  const int64_t sxn = x.stride(0), sxl = x.stride(1), sxd = x.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "restore_tokens_cpu", [&] {
    using x_t = scalar_t;
    const x_t* X = x.const_data_ptr<x_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "restore_tokens_cpu", [&] {
      using o_t = scalar_t;
      const o_t* T = tok.const_data_ptr<o_t>();
      const o_t* P = pos.defined() ? pos.const_data_ptr<o_t>() : nullptr;
      o_t* O = out.mutable_data_ptr<o_t>();
      at::parallel_for(0, N * R, grain_for(D), [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t n = q / R, o = q - n * R, l = o - c0;
          const int64_t r = l < 0 ? -1 : I[n * L + l];  // -1: the cls row
          o_t* dst = O + q * D;
          const o_t* pr = P ? P + o * D : nullptr;
          if (l >= 0 && r >= keep)  // a mask token
            add_row(dst, T, 1, pr, D);
          else
            add_row(dst, X + n * sxn + (l < 0 ? 0 : c0 + r) * sxl, sxd, pr, D);
        }
      });
    });
  });
  return out;
}

// grad_out (N, L + c, D) -> (grad x (N, len_x, D) in x_dtype, grad mask_token (1, 1, D) in tok_dtype, grad
// pos_embed (1, L + c, D) in pos_dtype, or empty (0,) without need_pos); both sums over the unrounded
// gradient in the accumulation dtype. Parallel over blocks of token positions: each block sums its
// mask-token rows into its own partial, and the partials are added in block order, so the result does not
// depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> restore_tokens_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& ids_restore, int64_t len_x, bool has_cls, bool need_pos,
    at::ScalarType x_dtype, at::ScalarType tok_dtype, at::ScalarType pos_dtype) {
  TORCH_CHECK(grad_out.dim() == 3 && is_float_type(grad_out.scalar_type()),
              "restore_tokens_backward: grad_out must be a floating (N, L + c, D) tensor, got ", grad_out.sizes());
  const int64_t N = ids_restore.size(0), L = ids_restore.size(1), D = grad_out.size(2), c0 = has_cls, R = L + c0;
  TORCH_CHECK(ids_restore.scalar_type() == at::kLong && grad_out.size(0) == N && grad_out.size(1) == R,
              "restore_tokens_backward: grad_out ", grad_out.sizes(), " does not match ids_restore ", ids_restore.sizes());
  const int64_t keep = len_x - c0;
  TORCH_CHECK(keep >= 0 && keep <= L, "restore_tokens_backward: len_x must be in [", c0, ", ", R, "], got ", len_x);
  const at::Tensor& g = grad_out;  // read by its strides: no copy
  const at::Tensor ids = ids_restore.is_contiguous() ? ids_restore : ids_restore.contiguous();
  const auto acc_opts = g.options().dtype(at::toOpMathType(g.scalar_type()));
  const int64_t sgn = g.stride(0), sgl = g.stride(1), sgd = g.stride(2);
  at::Tensor gx = at::empty({N, len_x, D}, g.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gpos = need_pos ? at::empty({1, R, D}, acc_opts) : at::empty({0}, g.options().dtype(pos_dtype));
  at::Tensor gtok = at::zeros({1, 1, D}, acc_opts);
  const int64_t blocks = (R + kPositionsPerTask - 1) / kPositionsPerTask;
  if (N > 0 && D > 0) {
    at::Tensor parts = at::zeros({blocks, D}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "restore_tokens_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* G = g.const_data_ptr<scalar_t>();
      const int64_t* I = ids.const_data_ptr<int64_t>();
      scalar_t* GX = gx.mutable_data_ptr<scalar_t>();
      acc_t* GP = need_pos ? gpos.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* PT = parts.mutable_data_ptr<acc_t>();
      at::parallel_for(0, blocks, grain_for(kPositionsPerTask * N * D), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          acc_t* part = PT + b * D;
          for (int64_t o = b * kPositionsPerTask; o < std::min(R, (b + 1) * kPositionsPerTask); ++o) {
            const int64_t l = o - c0;
            acc_t* gp = GP ? GP + o * D : nullptr;
            if (gp) std::fill(gp, gp + D, acc_t(0));
            for (int64_t n = 0; n < N; ++n) {
              const scalar_t* src = G + n * sgn + o * sgl;
              const int64_t r = l < 0 ? -1 : I[n * L + l];
              if (gp) add_row_to(gp, src, sgd, D);
              if (l >= 0 && r >= keep)
                add_row_to(part, src, sgd, D);
              else
                copy_row(GX + (n * len_x + (l < 0 ? 0 : c0 + r)) * D, src, sgd, D);
            }
          }
        }
      });
      acc_t* GT = gtok.mutable_data_ptr<acc_t>();
      for (int64_t b = 0; b < blocks; ++b)  // the partials in block order
        for (int64_t d = 0; d < D; ++d) GT[d] += PT[b * D + d];
    });
  } else if (need_pos) {
    gpos.zero_();
  }
  return {as_dtype(gx, x_dtype), as_dtype(gtok, tok_dtype), as_dtype(gpos, pos_dtype)};
}

using RestoreSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              bool);
using RestoreBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                          bool, bool, at::ScalarType, at::ScalarType,
                                                                          at::ScalarType);

at::Tensor call_restore(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& tok,
                        const std::optional<at::Tensor>& pos, bool has_cls) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = find_op<RestoreSig>("umae::restore_tokens");
  return op.call(x, ids, tok, pos, has_cls);
}

// The op's autograd, for every device. Linear in x, mask_token and pos_embed: the backward is the
// kernel's scatter, or (create_graph=True) the same map by differentiable ATen ops, so that a gradient
// of the gradient (double backward) is derived by autograd. ids_restore is a permutation (both kernels
// check it in the forward).
class RestoreTokensFunction : public torch::autograd::Function<RestoreTokensFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& ids,
                            const at::Tensor& tok, const std::optional<at::Tensor>& pos, bool has_cls) {
    at::Tensor out = call_restore(x, ids, tok, pos, has_cls);
    ctx->save_for_backward({ids});
    ctx->saved_data["len_x"] = x.size(1);
    ctx->saved_data["has_cls"] = has_cls;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["tok_dtype"] = tok.scalar_type();
    ctx->saved_data["pos_dtype"] = pos.has_value() ? pos->scalar_type() : x.scalar_type();
    ctx->saved_data["has_pos"] = pos.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor ids = ctx->get_saved_variables()[0];
    const at::Tensor& grad_out = grads[0];
    // edges: x 0, ids_restore 1, mask_token 2, pos_embed 3 (when given)
    const bool need_x = ctx->needs_input_grad(0), need_tok = ctx->needs_input_grad(2);
    const bool need_pos = ctx->saved_data["has_pos"].toBool() && ctx->needs_input_grad(3);
    const int64_t len_x = ctx->saved_data["len_x"].toInt();
    const bool has_cls = ctx->saved_data["has_cls"].toBool();
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto tok_dtype = ctx->saved_data["tok_dtype"].toScalarType();
    const auto pos_dtype = ctx->saved_data["pos_dtype"].toScalarType();
    at::Tensor gx, gtok, gpos;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a gradient that can be differentiated again
      const int64_t N = ids.size(0), L = ids.size(1), D = grad_out.size(2), c0 = has_cls, keep = len_x - c0;
      const at::ScalarType acc = at::promote_types(grad_out.scalar_type(), at::kFloat);
      const at::Tensor body = grad_out.narrow(1, c0, L);
      // output row c + l came from row ids_restore[l] of (x[:, c:] ++ mask tokens): scatter it back there
      const at::Tensor src = at::zeros_like(body).scatter(1, ids.unsqueeze(-1).expand({N, L, D}), body);
      if (need_x) gx = at::cat({grad_out.narrow(1, 0, c0), src.narrow(1, 0, keep)}, 1).to(x_dtype);
      if (need_tok) gtok = src.narrow(1, keep, L - keep).to(acc).sum(at::IntArrayRef{0, 1}).view({1, 1, D}).to(tok_dtype);
      if (need_pos) gpos = grad_out.to(acc).sum(0, true).to(pos_dtype);
    } else if (need_x || need_tok || need_pos) {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = find_op<RestoreBackwardSig>("umae::restore_tokens_backward");
      std::tie(gx, gtok, gpos) = op.call(grad_out, ids, len_x, has_cls, need_pos, x_dtype, tok_dtype, pos_dtype);
    }
    return {need_x ? gx : at::Tensor(), at::Tensor(), need_tok ? gtok : at::Tensor(),
            need_pos ? gpos : at::Tensor(), at::Tensor()};
  }
};

at::Tensor restore_tokens_autograd(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& tok,
                                   const std::optional<at::Tensor>& pos, bool has_cls) {
  refuse_forward_ad("restore_tokens", x, tok, pos);
  if (!(records(x) || records(tok) || records(pos))) return call_restore(x, ids, tok, pos, has_cls);
  return RestoreTokensFunction::apply(x, ids, tok, pos, has_cls);
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key in csrc/cuda/ or, for the Triton
// ops, from umae/ops/<op>_op.py). Semantics: the reference in umae/ops/<op>_op.py.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // x (N, c + len_keep, D) -> (N, c + L, D): kept tokens at their positions, the mask token elsewhere.
  m.def("restore_tokens(Tensor x, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed, bool has_cls) "
        "-> Tensor");
  // -> (grad x (N, len_x, D), grad mask_token (1, 1, D), grad pos_embed (1, c + L, D) or, without need_pos,
  // empty (0,)), each in its input's dtype.
  m.def("restore_tokens_backward(Tensor grad_out, Tensor ids_restore, int len_x, bool has_cls, bool need_pos, "
        "ScalarType x_dtype, ScalarType tok_dtype, ScalarType pos_dtype) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(umae, Autograd, m) { m.impl("restore_tokens", &restore_tokens_autograd); }

UMAE_AUTOCAST_OFF("restore_tokens", "restore_tokens_backward")

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("restore_tokens", &restore_tokens_cpu);
  m.impl("restore_tokens_backward", &restore_tokens_backward_cpu);
}

}  // namespace umae

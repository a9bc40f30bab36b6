// MAE's masked (normalized) squared error on CPU, forward and backward, one pass over each row: the
// target row is gathered once into a small fp32 buffer. Also the loss's autograd, for every device.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"

namespace umae {
namespace {

// Calls fn(r, trow) for every patch row r in [0, R) with trow the target row as acc_t.
// Image targets are read one strip of patches (n, hi) at a time: whole image rows,
// contiguous, scattered into w patch buffers, so the prefetcher sees long streams.
template <typename tgt_t, typename acc_t, typename Fn>
void for_each_target_row(const tgt_t* tgt, const ImageIndex* img, int64_t R, int64_t K, const Fn& fn) {
  if (!img) {
    at::parallel_for(0, R, grain_for(K), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(std::is_same_v<tgt_t, acc_t> ? 0 : K);
      for (int64_t r = r0; r < r1; ++r) {
        if constexpr (std::is_same_v<tgt_t, acc_t>) {
          fn(r, tgt + r * K);
        } else {
          for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<acc_t>(tgt[r * K + k]);
          fn(r, buf.data());
        }
      }
    });
    return;
  }
  const int64_t w = img->w, h = img->L / w;
  at::parallel_for(0, R / img->L * h, grain_for(w * K), [&](int64_t q0, int64_t q1) {
    std::vector<acc_t> strip(w * K);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / h, hi = q - n * h;
      gather_strip(tgt + n * img->sN, *img, hi, strip.data());
      for (int64_t wi = 0; wi < w; ++wi) fn(n * img->L + hi * w + wi, strip.data() + wi * K);
    }
  });
}

// (mean, 1/std) of a target row, two-pass; (0, 1) without norm_pix.
template <typename acc_t>
std::pair<acc_t, acc_t> row_stats(const acc_t* t, int64_t K, bool norm_pix, acc_t eps) {
  if (!norm_pix) return {acc_t(0), acc_t(1)};
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < K; ++k) sum += t[k];
  const acc_t mean = sum / K;
  acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < K; ++k) ss += (t[k] - mean) * (t[k] - mean);
  const acc_t var = ss / (K - 1);  // unbiased, as MAE's target.var(dim=-1)
  return {mean, acc_t(1) / std::sqrt(var + eps)};
}

// Operands made contiguous (patchified target) or addressed by strides (pred rows, images).
struct Args {
  at::Tensor pred, target;
  ImageIndex img;
  bool from_images;
  int64_t R, K;
};

Args prepare(const at::Tensor& pred, const at::Tensor& target, int64_t patch_size, bool norm_pix) {
  check_patch_mse_args(pred, target, patch_size, norm_pix);
  Args a;
  a.pred = pred.stride(2) == 1 ? pred : pred.contiguous();  // strided rows are read in place
  a.from_images = patch_size > 0;
  a.target = a.from_images ? target : target.contiguous();
  if (a.from_images) a.img = image_index(target, patch_size);
  a.R = pred.size(0) * pred.size(1);
  a.K = pred.size(2);
  return a;
}

// Row r = n * L + l of pred (N, L, K), whose rows may be strided (the decoder's x[:, 1:] view).
template <typename T>
inline const T* pred_row(const T* P, const Args& a, int64_t r) {
  const int64_t L = a.pred.size(1);
  return P + (r / L) * a.pred.stride(0) + (r % L) * a.pred.stride(1);
}

// The mask as the accumulation dtype's values, contiguous (a copy only when it is not that already).
at::Tensor mask_values(const at::Tensor& mask, const at::Tensor& pred) {
  check_patch_mask(mask, pred);
  const at::ScalarType acc = at::toOpMathType(pred.scalar_type());
  const at::Tensor m = mask.scalar_type() == acc ? mask : mask.to(acc);
  return m.is_contiguous() ? m : m.contiguous();
}

// The masked mean's denominator: sum(mask), or 1 where that is 0 (the loss is then 0, not 0/0).
template <typename acc_t>
acc_t safe_denominator(const acc_t* M, int64_t R) {
  double den = 0;
  for (int64_t r = 0; r < R; ++r) den += M[r];
  return den != 0 ? static_cast<acc_t>(den) : acc_t(1);
}

// -> (the loss: sum(rows * mask) / sum(mask), a 0-dim tensor; rows: the per-patch errors (N, L)), in the
// accumulation dtype (fp32; fp64 for fp64 pred, as gradcheck calls it).
std::tuple<at::Tensor, at::Tensor> patch_mse_with_rows_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                           const at::Tensor& mask, int64_t patch_size, bool norm_pix,
                                                           double eps) {
  Args a = prepare(pred, target, patch_size, norm_pix);
  const at::Tensor m = mask_values(mask, pred);
  const auto acc_opts = pred.options().dtype(at::toOpMathType(pred.scalar_type()));
  at::Tensor out = at::empty({pred.size(0), pred.size(1)}, acc_opts);
  at::Tensor loss = at::empty({}, acc_opts);
  UMAE_DISPATCH_PRED_TARGET(a.pred.scalar_type(), a.target.scalar_type(), "patch_mse_cpu", [&] {
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* P = a.pred.const_data_ptr<pred_t>();
    const tgt_t* T = a.target.const_data_ptr<tgt_t>();
    using out_t = std::conditional_t<std::is_same_v<pred_t, double>, double, float>;
    out_t* O = out.mutable_data_ptr<out_t>();
    const int64_t K = a.K;
    if (a.R > 0)
      for_each_target_row<tgt_t, acc_t>(T, a.from_images ? &a.img : nullptr, a.R, K, [&](int64_t r, const acc_t* t) {
        auto [mean, rstd] = row_stats(t, K, norm_pix, static_cast<acc_t>(eps));
        const pred_t* prow = pred_row(P, a, r);
        acc_t s = 0;
        _Pragma("omp simd reduction(+ : s)")  // inside a dispatch macro: no #pragma
        for (int64_t k = 0; k < K; ++k) {
          const acc_t d = static_cast<acc_t>(prow[k]) - (t[k] - mean) * rstd;
          s += d * d;
        }
        O[r] = static_cast<out_t>(s / K);
      });
    // the masked mean: (N, L) values, summed in order in double (NaN rows stay NaN, as in the reference)
    const out_t* M = m.const_data_ptr<out_t>();
    double num = 0;
    for (int64_t r = 0; r < a.R; ++r) num += static_cast<double>(O[r]) * M[r];
    *loss.mutable_data_ptr<out_t>() = static_cast<out_t>(num / safe_denominator(M, a.R));
  });
  return {loss, out};
}

at::Tensor patch_mse_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                         int64_t patch_size, bool norm_pix, double eps) {
  return std::get<0>(patch_mse_with_rows_cpu(pred, target, mask, patch_size, norm_pix, eps));
}

// d(loss) / d(pred) for an upstream gradient `grad` (0-dim): row r's error weighted by grad * mask_r / denominator.
at::Tensor patch_mse_backward_cpu(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& pred,
                                  const at::Tensor& target, int64_t patch_size, bool norm_pix, double eps) {
  Args a = prepare(pred, target, patch_size, norm_pix);
  TORCH_CHECK(grad.numel() == 1, "patch_mse_backward: grad must be a scalar, got ", grad.sizes());
  const at::Tensor m = mask_values(mask, pred);
  at::Tensor grad_pred = at::empty(a.pred.sizes(), a.pred.options());
  if (a.R == 0) return grad_pred;
  const at::ScalarType acc = at::toOpMathType(pred.scalar_type());
  const at::Tensor g = grad.scalar_type() == acc ? grad : grad.to(acc);
  UMAE_DISPATCH_PRED_TARGET(a.pred.scalar_type(), a.target.scalar_type(), "patch_mse_backward_cpu", [&] {
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* P = a.pred.const_data_ptr<pred_t>();
    const tgt_t* T = a.target.const_data_ptr<tgt_t>();
    const acc_t* M = m.const_data_ptr<acc_t>();
    pred_t* D = grad_pred.mutable_data_ptr<pred_t>();
    const int64_t K = a.K;
    const acc_t coef = *g.const_data_ptr<acc_t>() / safe_denominator(M, a.R) * acc_t(2) / K;
    for_each_target_row<tgt_t, acc_t>(T, a.from_images ? &a.img : nullptr, a.R, K, [&](int64_t r, const acc_t* t) {
      auto [mean, rstd] = row_stats(t, K, norm_pix, static_cast<acc_t>(eps));
      const acc_t scale = coef * M[r];
      const pred_t* prow = pred_row(P, a, r);
      pred_t* drow = D + r * K;
      _Pragma("omp simd")
      for (int64_t k = 0; k < K; ++k)
        drow[k] = static_cast<pred_t>(scale * (static_cast<acc_t>(prow[k]) - (t[k] - mean) * rstd));
    });
  });
  return grad_pred;
}

using WithRowsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      int64_t, bool, double);
using LossSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, double);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                               bool, double);

// The loss's autograd, for every device: pred's gradient by the backward kernel; the mask's (a float
// mask that requires grad) from the saved rows, d loss / d m_r = (rows_r - loss) / sum(mask).
class PatchMseFunction : public torch::autograd::Function<PatchMseFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                            const at::Tensor& mask, int64_t patch_size, bool norm_pix, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<WithRowsSig>("umae::patch_mse_with_rows");
    auto [loss, rows] = op.call(pred, target, mask, patch_size, norm_pix, eps);
    ctx->save_for_backward({pred, target, mask, mask.requires_grad() ? rows : at::Tensor(), loss});
    ctx->saved_data["patch_size"] = patch_size;
    ctx->saved_data["norm_pix"] = norm_pix;
    ctx->saved_data["eps"] = eps;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &pred = s[0], &target = s[1], &mask = s[2], &rows = s[3], &loss = s[4];
    const at::Tensor& grad = grads[0];
    at::Tensor gpred, gmask;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = find_op<BackwardSig>("umae::patch_mse_backward");
      if (ctx->needs_input_grad(0))
        gpred = op.call(grad, mask, pred, target, ctx->saved_data["patch_size"].toInt(),
                        ctx->saved_data["norm_pix"].toBool(), ctx->saved_data["eps"].toDouble());
      if (rows.defined() && ctx->needs_input_grad(2)) {
        const at::Tensor den = mask.to(rows.scalar_type()).sum();
        const at::Tensor nonzero = den.ne(0);
        gmask = (grad * (rows - loss * nonzero) / at::where(nonzero, den, at::ones_like(den))).to(mask.scalar_type());
      }
    }
    auto out = first_order_only("patch_mse (mae_loss, masked_mse_loss)", {gpred, gmask}, {grad, pred, target, mask});
    return {out[0], at::Tensor(), out[1], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// MAE's target is data: the fused loss gives it no gradient, so it says so instead of returning none.
void refuse_target_grad(const at::Tensor& target, int64_t patch_size) {
  const char* name = patch_size > 0 ? "imgs" : "target";
  TORCH_CHECK_VALUE(!records(target), name, " requires grad, but the fused loss differentiates pred only; detach ",
                    name, " or use umae.use_backend('reference')");
}

at::Tensor patch_mse_autograd(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                              int64_t patch_size, bool norm_pix, double eps) {
  refuse_target_grad(target, patch_size);
  refuse_forward_ad("patch_mse (mae_loss, masked_mse_loss)", pred, target, mask);
  if (records(pred) || records(mask)) return PatchMseFunction::apply(pred, target, mask, patch_size, norm_pix, eps);
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = find_op<LossSig>("umae::patch_mse");
  return op.call(pred, target, mask, patch_size, norm_pix, eps);
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key in csrc/cuda/ or, for the Triton
// ops, from umae/ops/<op>_op.py). Semantics: the reference in umae/ops/<op>_op.py.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // MAE's loss, a 0-dim fp32 tensor (fp64 for fp64 pred): the per-patch squared error between pred
  // (N, L, K) and the (optionally per-patch normalized) target, averaged over K, then over the patches
  // where mask (N, L) is nonzero, weighted by it (0 when the mask is all 0). patch_size == 0: target is
  // patchified (N, L, K); patch_size > 0: target is the image batch (N, C, H, W), patchified on the fly.
  // norm_pix divides by sqrt(unbiased var + eps); eps is given by the caller (umae/ops/masked_mse_op.py).
  // Autograd: csrc/cpu/masked_mse.cpp, every device.
  m.def("patch_mse(Tensor pred, Tensor target, Tensor mask, int patch_size, bool norm_pix, float eps) -> Tensor");
  // -> (the loss, the per-patch errors (N, L)), as the autograd saves them.
  m.def("patch_mse_with_rows(Tensor pred, Tensor target, Tensor mask, int patch_size, bool norm_pix, float eps) "
        "-> (Tensor, Tensor)");
  // d(grad * loss) / d(pred), in pred's dtype; grad 0-dim.
  m.def("patch_mse_backward(Tensor grad, Tensor mask, Tensor pred, Tensor target, int patch_size, bool norm_pix, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(umae, Autograd, m) { m.impl("patch_mse", &patch_mse_autograd); }

UMAE_AUTOCAST_OFF("patch_mse", "patch_mse_with_rows", "patch_mse_backward")

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("patch_mse", &patch_mse_cpu);
  m.impl("patch_mse_with_rows", &patch_mse_with_rows_cpu);
  m.impl("patch_mse_backward", &patch_mse_backward_cpu);
}

}  // namespace umae

// Per-patch (normalized) squared error on CPU, forward and backward, one pass over
// each row: the target row is gathered once into a small fp32 buffer.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "patch_strip.h"

namespace umae {
namespace {

// Calls fn(r, trow) for every patch row r in [0, R) with trow the target row as acc_t.
// Image targets are read one strip of patches (n, hi) at a time: whole image rows,
// contiguous, scattered into w patch buffers, so the prefetcher sees long streams.
template <typename tgt_t, typename acc_t, typename Fn>
void for_each_target_row(const tgt_t* tgt, const ImageIndex* img, int64_t R, int64_t K, const Fn& fn) {
  if (!img) {
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
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
  at::parallel_for(0, R / img->L * h, 1, [&](int64_t q0, int64_t q1) {
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

at::Tensor patch_mse_cpu(const at::Tensor& pred, const at::Tensor& target, int64_t patch_size,
                         bool norm_pix, double eps) {
  Args a = prepare(pred, target, patch_size, norm_pix);
  // float64 callers (gradcheck) get float64 back; everyone else fp32.
  at::Tensor out = at::empty({pred.size(0), pred.size(1)}, pred.options().dtype(at::toOpMathType(pred.scalar_type())));
  if (a.R == 0) return out;
  UMAE_DISPATCH_PRED_TARGET(a.pred.scalar_type(), a.target.scalar_type(), "patch_mse_cpu", [&] {
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* P = a.pred.const_data_ptr<pred_t>();
    const tgt_t* T = a.target.const_data_ptr<tgt_t>();
    using out_t = std::conditional_t<std::is_same_v<pred_t, double>, double, float>;
    out_t* O = out.mutable_data_ptr<out_t>();
    const int64_t K = a.K;
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
  });
  return out;
}

at::Tensor patch_mse_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& pred,
                                  const at::Tensor& target, int64_t patch_size, bool norm_pix, double eps) {
  Args a = prepare(pred, target, patch_size, norm_pix);
  TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == pred.size(0) && grad_rows.size(1) == pred.size(1),
              "patch_mse_backward: grad_rows must be (N, L), got ", grad_rows.sizes());
  at::Tensor g = grad_rows.to(at::toOpMathType(pred.scalar_type())).contiguous();
  at::Tensor grad = at::empty(a.pred.sizes(), a.pred.options());
  if (a.R == 0) return grad;
  UMAE_DISPATCH_PRED_TARGET(a.pred.scalar_type(), a.target.scalar_type(), "patch_mse_backward_cpu", [&] {
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* P = a.pred.const_data_ptr<pred_t>();
    const tgt_t* T = a.target.const_data_ptr<tgt_t>();
    const acc_t* G = g.const_data_ptr<acc_t>();
    pred_t* D = grad.mutable_data_ptr<pred_t>();
    const int64_t K = a.K;
    for_each_target_row<tgt_t, acc_t>(T, a.from_images ? &a.img : nullptr, a.R, K, [&](int64_t r, const acc_t* t) {
      auto [mean, rstd] = row_stats(t, K, norm_pix, static_cast<acc_t>(eps));
      const acc_t scale = G[r] * acc_t(2) / K;
      const pred_t* prow = pred_row(P, a, r);
      pred_t* drow = D + r * K;
      _Pragma("omp simd")
      for (int64_t k = 0; k < K; ++k)
        drow[k] = static_cast<pred_t>(scale * (static_cast<acc_t>(prow[k]) - (t[k] - mean) * rstd));
    });
  });
  return grad;
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key in csrc/cuda/ or, for the Triton
// ops, from umae/<op>_op.py). Semantics: the reference in umae/<op>_op.py.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // Per-patch squared error (N, L) in fp32 between pred (N, L, K) and the (optionally
  // per-patch normalized) target. patch_size == 0: target is patchified (N, L, K);
  // patch_size > 0: target is the image batch (N, C, H, W), patchified on the fly.
  // norm_pix divides by sqrt(unbiased var + eps); eps is given by the caller (umae/masked_mse_op.py).
  m.def("patch_mse(Tensor pred, Tensor target, int patch_size, bool norm_pix, float eps) -> Tensor");
  // d(sum(grad_rows * patch_mse)) / d(pred), in pred's dtype.
  m.def("patch_mse_backward(Tensor grad_rows, Tensor pred, Tensor target, int patch_size, bool norm_pix, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("patch_mse", &patch_mse_cpu);
  m.impl("patch_mse_backward", &patch_mse_backward_cpu);
}

}  // namespace umae

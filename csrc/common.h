// Shared by the CPU and CUDA implementations: the argument checks, so both backends refuse the
// same inputs with the same messages; and the image geometry the CPU strips read
// (csrc/cpu/patch_strip.h; the CUDA strips have theirs in csrc/cuda/patch_strip.cuh).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace umae {

// An image batch's strides and patch grid: element k = (pi*p + pj)*C + c of patch row
// l = hi*w + wi of sample n is at n*sN + c*sC + (hi*p + pi)*sH + (wi*p + pj)*sW.
struct ImageIndex {
  int64_t sN, sC, sH, sW;
  int64_t L, w, p, C;
};

inline ImageIndex image_index(const at::Tensor& imgs, int64_t p) {
  const int64_t h = imgs.size(2) / p, w = imgs.size(3) / p;
  return ImageIndex{imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
                    h * w, w, p, imgs.size(1)};
}

// The grain of a parallel_for over items of `work` values each: a task gets at least ATen's GRAIN_SIZE
// values, so a small call runs inline on the caller's thread. Waking the pool costs more than a tiny
// op's whole work (tens of microseconds on a 2-core machine).
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1));
}

// One value broadcast (every stride 0, as the backward of a sum or mean gives a gradient).
inline bool broadcast_value(const at::Tensor& t) {
  if (t.numel() == 0) return false;
  for (const int64_t s : t.strides())
    if (s != 0) return false;
  return true;
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ",
              ref.device());
}

inline void check_patchify_args(const at::Tensor& imgs, int64_t p) {
  TORCH_CHECK(imgs.dim() == 4, "patchify: imgs must be (N, C, H, W), got ", imgs.dim(), " dims");
  TORCH_CHECK(is_float_type(imgs.scalar_type()), "patchify: imgs must be a floating tensor, got ",
              imgs.scalar_type());
  TORCH_CHECK(p > 0, "patchify: patch size p must be positive, got ", p);
  TORCH_CHECK(imgs.size(2) % p == 0 && imgs.size(3) % p == 0, "patchify: imgs H and W (",
              imgs.size(2), ", ", imgs.size(3), ") must be divisible by the patch size ", p);
}

inline void check_unpatchify_args(const at::Tensor& x, int64_t p, int64_t h, int64_t w, int64_t c) {
  TORCH_CHECK(x.dim() == 3, "unpatchify: x must be (N, L, p*p*C), got ", x.dim(), " dims");
  TORCH_CHECK(is_float_type(x.scalar_type()), "unpatchify: x must be a floating tensor, got ",
              x.scalar_type());
  TORCH_CHECK(p > 0 && h > 0 && w > 0 && c > 0, "unpatchify: p, h, w, c must be positive");
  TORCH_CHECK(x.size(1) == h * w, "unpatchify: x has L=", x.size(1), " patches, expected h*w=", h * w);
  TORCH_CHECK(x.size(2) == p * p * c, "unpatchify: x last dim is ", x.size(2), ", expected p*p*C=",
              p * p * c);
}

// pred (N, L, K); target (N, L, K) or, with patch_size > 0, images (N, C, H, W).
inline void check_patch_mse_args(const at::Tensor& pred, const at::Tensor& target, int64_t patch_size,
                                 bool norm_pix) {
  TORCH_CHECK(pred.dim() == 3, "patch_mse: pred must be (N, L, K), got ", pred.dim(), " dims");
  TORCH_CHECK(is_float_type(pred.scalar_type()) && is_float_type(target.scalar_type()),
              "patch_mse: pred and target must be floating tensors, got ", pred.scalar_type(), " and ",
              target.scalar_type());
  TORCH_CHECK((pred.scalar_type() == at::kDouble) == (target.scalar_type() == at::kDouble),
              "patch_mse: float64 pred needs a float64 target and vice versa");
  TORCH_CHECK(pred.device() == target.device(), "patch_mse: pred is on ", pred.device(),
              " but target is on ", target.device());
  if (patch_size == 0) {
    TORCH_CHECK(target.sizes() == pred.sizes(), "patch_mse: target shape ", target.sizes(),
                " must equal pred shape ", pred.sizes());
  } else {
    TORCH_CHECK(target.dim() == 4, "patch_mse: target images must be (N, C, H, W), got ", target.dim(),
                " dims");
    check_patchify_args(target, patch_size);
    const int64_t L = (target.size(2) / patch_size) * (target.size(3) / patch_size);
    TORCH_CHECK(target.size(0) == pred.size(0) && L == pred.size(1) &&
                    patch_size * patch_size * target.size(1) == pred.size(2),
                "patch_mse: pred shape ", pred.sizes(), " does not match images ", target.sizes(),
                " at patch size ", patch_size, " (expected (N, L, p*p*C))");
  }
  TORCH_CHECK(!norm_pix || pred.size(2) >= 2,
              "patch_mse: norm_pix needs at least 2 values per patch (unbiased variance), got K=",
              pred.size(2));
}

// mask (N, L) of pred, floating or bool (1 = removed), on pred's device.
inline void check_patch_mask(const at::Tensor& mask, const at::Tensor& pred) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == pred.size(0) && mask.size(1) == pred.size(1),
              "patch_mse: mask must be (N, L) = (", pred.size(0), ", ", pred.size(1), "), got ", mask.sizes());
  TORCH_CHECK(is_float_type(mask.scalar_type()) || mask.scalar_type() == at::kBool,
              "patch_mse: mask must be a floating or bool tensor, got ", mask.scalar_type());
  check_same_device(pred, mask, "patch_mse", "mask");
}

}  // namespace umae

// pred and target dtypes: double with double (gradcheck), else any of f32/f16/bf16 each.
#define UMAE_DISPATCH_PRED_TARGET(PRED_T, TGT_T, NAME, ...)                                   \
  [&] {                                                                                       \
    if ((PRED_T) == at::kDouble) {                                                            \
      using pred_t = double;                                                                  \
      using tgt_t = double;                                                                   \
      return __VA_ARGS__();                                                                   \
    }                                                                                         \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, PRED_T, NAME, [&] {             \
      using pred_t = scalar_t;                                                                \
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TGT_T, NAME, [&] {            \
        using tgt_t = scalar_t;                                                               \
        if constexpr (!std::is_same_v<tgt_t, double> && !std::is_same_v<pred_t, double>) {    \
          return __VA_ARGS__();                                                               \
        }                                                                                     \
      });                                                                                     \
    });                                                                                       \
  }()

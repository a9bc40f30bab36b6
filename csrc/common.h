// What the ops' C++ and CUDA files share. For both devices: the argument checks (both backends refuse
// the same inputs with the same messages), the image geometry, the dtype dispatch. For the CPU side
// only (the .cpp files: nvcc never sees it): the autograd and autocast helpers every op's Function uses
// (each op's Function lives beside its CPU kernel, in csrc/cpu/<op>.cpp, and serves every device),
// the token rows the token ops' CPU kernels write, and the patch strips of patchify and the masked MSE
// (the CUDA strips are csrc/cuda/patch_strip.cuh).
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

// videos (B, C, T, H, W): T divisible by the tubelet size ts, H and W by the patch size p.
inline void check_tubelet_patchify_args(const at::Tensor& videos, int64_t p, int64_t ts) {
  TORCH_CHECK(videos.dim() == 5, "tubelet_patchify: videos must be (B, C, T, H, W), got ", videos.dim(), " dims");
  TORCH_CHECK(is_float_type(videos.scalar_type()), "tubelet_patchify: videos must be a floating tensor, got ",
              videos.scalar_type());
  TORCH_CHECK(p > 0 && ts > 0, "tubelet_patchify: patch size p and tubelet size ts must be positive, got ", p,
              " and ", ts);
  TORCH_CHECK(videos.size(2) % ts == 0, "tubelet_patchify: videos frames (", videos.size(2),
              ") must be divisible by the tubelet size ", ts);
  TORCH_CHECK(videos.size(3) % p == 0 && videos.size(4) % p == 0, "tubelet_patchify: videos H and W (",
              videos.size(3), ", ", videos.size(4), ") must be divisible by the patch size ", p);
}

// x (B, t*h*w, ts*p*p*c) -> videos (B, c, t*ts, h*p, w*p).
inline void check_tubelet_unpatchify_args(const at::Tensor& x, int64_t p, int64_t ts, int64_t t, int64_t h,
                                          int64_t w, int64_t c) {
  TORCH_CHECK(x.dim() == 3, "tubelet_unpatchify: x must be (B, N, ts*p*p*C), got ", x.dim(), " dims");
  TORCH_CHECK(is_float_type(x.scalar_type()), "tubelet_unpatchify: x must be a floating tensor, got ",
              x.scalar_type());
  TORCH_CHECK(p > 0 && ts > 0 && t > 0 && h > 0 && w > 0 && c > 0, "tubelet_unpatchify: p, ts, t, h, w, c must be positive");
  TORCH_CHECK(x.size(1) == t * h * w, "tubelet_unpatchify: x has N=", x.size(1), " tokens, expected t*h*w=", t * h * w);
  TORCH_CHECK(x.size(2) == ts * p * p * c, "tubelet_unpatchify: x last dim is ", x.size(2), ", expected ts*p*p*C=",
              ts * p * p * c);
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

#ifndef __CUDACC__
#include <ATen/OpMathType.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

// ==== autograd and autocast ======================================================================
// What every op's C++ autograd and autocast kernels share (each op's Function lives beside its CPU
// kernel, in csrc/cpu/<op>.cpp, and serves every device). A call is one dispatcher entry: the Autograd
// kernel records the node and calls the device kernel below autograd; no Python runs between the
// public function and the kernel, nor in the backward.
namespace umae {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A kernel op of the umae namespace, found once per call site (keep the result in a static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Whether a call records a node: a forward that does not skips Function::apply (and its bookkeeping).
inline bool records(const at::Tensor& t) { return t.requires_grad() && at::GradMode::is_enabled(); }
inline bool records(const std::optional<at::Tensor>& t) { return t.has_value() && records(*t); }

// Forward-mode AD (dual tensors: torch.func.jvp, torch.autograd.forward_ad) has no rule in the fused
// ops: refused, naming the op, where it gave a zero tangent without a word.
template <typename... Ts>
inline void refuse_forward_ad(const char* op, const Ts&... tensors) {
  TORCH_CHECK(!(torch::autograd::isFwGradDefined(tensors) || ...), "umae::", op,
              ": forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by the fused kernel; "
              "use the reference: umae.use_backend(\"reference\"), backend=\"reference\" or UMAE_BACKEND=reference");
}

inline std::string double_backward_message(const std::string& op) {
  return "umae::" + op +
         ": double backward (a gradient of its gradient, e.g. a gradient penalty through "
         "torch.autograd.grad(..., create_graph=True)) is not supported by the fused kernel; use the reference: "
         "umae.use_backend(\"reference\"), backend=\"reference\" or UMAE_BACKEND=reference";
}

// Copies of a kernel's gradients, made functions of what they depend on (the saved inputs, the
// incoming gradient), whose own backward raises. A gradient computed by a kernel is a constant to
// autograd: without this, a gradient of it (a gradient penalty) would be silently 0 or "not used in
// the graph". Raising at the second backward leaves create_graph=True usable while the first-order
// gradient is only read.
class RefuseDoubleBackward : public torch::autograd::Function<RefuseDoubleBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const std::string& op, at::TensorList grads,
                               at::TensorList /*deps*/) {
    ctx->saved_data["op"] = op;
    variable_list out;
    out.reserve(grads.size());
    for (const at::Tensor& g : grads) out.push_back(g.clone());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, double_backward_message(ctx->saved_data["op"].toStringRef()));
    return {};
  }
};

// `grads` (a backward's results; undefined where none) as they leave the backward: as they are,
// or with create_graph=True (grad mode on in the backward) wrapped by RefuseDoubleBackward.
inline variable_list first_order_only(const std::string& op, variable_list grads, at::TensorList deps) {
  if (!at::GradMode::is_enabled()) return grads;
  std::vector<size_t> live;
  variable_list values, needed;
  for (size_t i = 0; i < grads.size(); ++i)
    if (grads[i].defined()) {
      live.push_back(i);
      values.push_back(grads[i].detach());
    }
  for (const at::Tensor& d : deps)
    if (d.defined() && d.requires_grad()) needed.push_back(d);
  // as TensorLists: Function::apply sees the tensors of these, not of a std::vector
  const variable_list wrapped = RefuseDoubleBackward::apply(op, at::TensorList(values), at::TensorList(needed));
  for (size_t k = 0; k < live.size(); ++k) grads[live[k]] = wrapped[k];
  return grads;
}

// Autocast. The fused kernels compute in their own precision (fp32 accumulation whatever the input
// dtype), so autocast must not re-cast the ATen calls inside them: the default fallthrough leaves it on
// there, and an at::mm inside a kernel then returned bf16 where the kernel read fp32. Every op of the
// namespace registers this at the Autocast keys (UMAE_AUTOCAST_OFF), except where its reference has
// an op autocast changes (uniformity_loss's matmul): that op registers its own cast.
inline void autocast_off(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

inline void register_autocast_off(torch::Library& m, std::initializer_list<const char*> ops) {
  for (const char* op : ops) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_off>());
}

}  // namespace umae

// The ops named (string literals) run with autocast off inside, on CPU and CUDA.
#define UMAE_AUTOCAST_OFF(...)                                                                      \
  TORCH_LIBRARY_IMPL(umae, AutocastCPU, m) { umae::register_autocast_off(m, {__VA_ARGS__}); }       \
  TORCH_LIBRARY_IMPL(umae, AutocastCUDA, m) { umae::register_autocast_off(m, {__VA_ARGS__}); }


// ==== token rows =================================================================================
// Token rows as the token ops' CPU kernels (random_masking, restore_tokens) read and write them.
// A token row of D values written by the token ops' CPU kernels (random_masking's kept rows,
// restore_tokens' rows): dst = out_t(src + pos), the add in out_t's opmath type and one rounding
// to out_t, as the references' `x + pos_embed` in the promoted dtype; without pos, a cast.
namespace umae {

// src strided by `s` (any layout of x), pos contiguous or nullptr.
template <typename src_t, typename out_t>
inline void add_row(out_t* dst, const src_t* src, int64_t s, const out_t* pos, int64_t D) {
  using acc_t = at::opmath_type<out_t>;
  if (pos && s == 1) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<out_t>(static_cast<acc_t>(src[d]) + static_cast<acc_t>(pos[d]));
  } else if (pos) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<out_t>(static_cast<acc_t>(src[d * s]) + static_cast<acc_t>(pos[d]));
  } else if (s == 1) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<out_t>(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<out_t>(src[d * s]);
  }
}

// dst = the D values of src strided by `s` (a gradient of any layout: the backward of a sum is one
// value broadcast, every stride 0).
template <typename T>
inline void copy_row(T* dst, const T* src, int64_t s, int64_t D) {
  if (s == 1) {
    std::copy(src, src + D, dst);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d * s];
  }
}

// acc += src strided by `s`, in acc_t.
template <typename acc_t, typename T>
inline void add_row_to(acc_t* acc, const T* src, int64_t s, int64_t D) {
  if (s == 1) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d * s]);
  }
}

// A backward kernel's sum or gradient (held in the accumulation dtype or the gradient's) as its
// input's dtype: a copy only where they differ.
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

}  // namespace umae


// ==== patch strips ===============================================================================
// One strip of patches (n, hi): the w patches of patch row hi of image n, whose K = p*p*C values
// are ordered (row-in-patch, col-in-patch, channel), laid out as w consecutive rows of K.
// Gather (image -> patches) and scatter (patches -> image) walk whole image rows, contiguous for
// unit W stride, and the patch side in order, so both streams are sequential. fp32 RGB, the common
// case, interleaves (deinterleaves) four pixels at a time in SIMD registers; the rest is scalar.
// Shared by patchify / unpatchify and the masked MSE's image target.
namespace umae {

#if defined(__GNUC__) && !defined(__clang__)
#define UMAE_RGB_SIMD 1
typedef float f32x4 __attribute__((vector_size(16)));
typedef int i32x4 __attribute__((vector_size(16)));

inline f32x4 load4(const float* p) {
  f32x4 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, f32x4 v) { __builtin_memcpy(p, &v, sizeof v); }

// (R0..R3, G0..G3, B0..B3) -> R0 G0 B0 R1 | G1 B1 R2 G2 | B2 R3 G3 B3
inline void interleave_rgb4(const float* r, const float* g, const float* b, float* out) {
  const f32x4 R = load4(r), G = load4(g), B = load4(b);
  const f32x4 rg01 = __builtin_shuffle(R, G, i32x4{0, 4, 1, 5});  // R0 G0 R1 G1
  const f32x4 rg23 = __builtin_shuffle(R, G, i32x4{2, 6, 3, 7});  // R2 G2 R3 G3
  store4(out, __builtin_shuffle(rg01, B, i32x4{0, 1, 4, 2}));
  store4(out + 4, __builtin_shuffle(__builtin_shuffle(rg01, B, i32x4{3, 5, 0, 0}), rg23, i32x4{0, 1, 4, 5}));
  store4(out + 8, __builtin_shuffle(rg23, B, i32x4{6, 2, 3, 7}));
}

// the inverse
inline void deinterleave_rgb4(const float* in, float* r, float* g, float* b) {
  const f32x4 a = load4(in), m = load4(in + 4), z = load4(in + 8);
  store4(r, __builtin_shuffle(__builtin_shuffle(a, m, i32x4{0, 3, 6, 0}), z, i32x4{0, 1, 2, 5}));
  store4(g, __builtin_shuffle(__builtin_shuffle(a, m, i32x4{1, 4, 7, 0}), z, i32x4{0, 1, 2, 6}));
  store4(b, __builtin_shuffle(__builtin_shuffle(a, m, i32x4{2, 5, 0, 0}), z, i32x4{0, 1, 4, 7}));
}
#endif

// dst[wi * K + (pi * p + pj) * C + c] = image[n, c, hi * p + pi, wi * p + pj], cast to dst_t; rows of
// K = p*p*C values, or `row` apart where given (a frame's part of a tubelet: ts parts per token row).
template <typename src_t, typename dst_t>
inline void gather_strip(const src_t* img_n, const ImageIndex& idx, int64_t hi, dst_t* dst, int64_t row = 0) {
  const int64_t p = idx.p, w = idx.w, C = idx.C, K = row ? row : p * p * C, pC = p * C, sC = idx.sC, sW = idx.sW;
  for (int64_t pi = 0; pi < p; ++pi) {
    const src_t* row = img_n + (hi * p + pi) * idx.sH;
    dst_t* out = dst + pi * pC;
#ifdef UMAE_RGB_SIMD
    if constexpr (std::is_same_v<src_t, float> && std::is_same_v<dst_t, float>) {
      if (C == 3 && sW == 1 && p % 4 == 0) {
        for (int64_t wi = 0; wi < w; ++wi)
          for (int64_t pj = 0; pj < p; pj += 4) {
            const float* r = row + wi * p + pj;
            interleave_rgb4(r, r + sC, r + 2 * sC, out + wi * K + pj * 3);
          }
        continue;
      }
    }
#endif
    for (int64_t wi = 0; wi < w; ++wi)
      for (int64_t pj = 0; pj < p; ++pj)
        for (int64_t c = 0; c < C; ++c) out[wi * K + pj * C + c] = static_cast<dst_t>(row[c * sC + (wi * p + pj) * sW]);
  }
}

// image[n, c, hi * p + pi, wi * p + pj] = src[wi * sR + ((pi * p + pj) * C + c) * sK] (any patch strides).
template <typename scalar_t>
inline void scatter_strip(const scalar_t* src, int64_t sR, int64_t sK, const ImageIndex& idx, int64_t hi,
                          scalar_t* img_n) {
  const int64_t p = idx.p, w = idx.w, C = idx.C, pC = p * C, sC = idx.sC, sW = idx.sW;
  for (int64_t pi = 0; pi < p; ++pi) {
    scalar_t* row = img_n + (hi * p + pi) * idx.sH;
    const scalar_t* in = src + pi * pC * sK;
#ifdef UMAE_RGB_SIMD
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (C == 3 && sW == 1 && sK == 1 && p % 4 == 0) {
        for (int64_t wi = 0; wi < w; ++wi)
          for (int64_t pj = 0; pj < p; pj += 4) {
            float* r = row + wi * p + pj;
            deinterleave_rgb4(in + wi * sR + pj * 3, r, r + sC, r + 2 * sC);
          }
        continue;
      }
    }
#endif
    for (int64_t c = 0; c < C; ++c)
      for (int64_t wi = 0; wi < w; ++wi)
        for (int64_t pj = 0; pj < p; ++pj) row[c * sC + (wi * p + pj) * sW] = in[wi * sR + (pj * C + c) * sK];
  }
}

}  // namespace umae

#endif  // __CUDACC__

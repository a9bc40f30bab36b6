// Per-patch (normalized) squared error on CUDA: one block per strip of patch rows
// (patch_strip.cuh). The target strip is staged in shared memory in patchified order (gathered
// from the images with 16-byte accesses along W, or copied from the patchified target), so the
// mean / variance / loss passes read it from there; pred is read once, 16 bytes per access, one
// warp per patch row. Forward and backward share the kernel; the masked mean over the (N, L) errors is
// a few ATen reductions on the device (no host sync).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "patch_strip.cuh"

namespace umae {
namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct MseArgs {
  bool from_images, norm_pix;
  float eps;
  const float* grad_rows;  // backward: d loss / d per-patch loss
  float* out;              // forward: per-patch loss (N*L)
};

// VEC: 16-byte accesses to pred / grad and to the target side (else scalar).
template <typename pred_t, typename tgt_t, bool VEC, bool BACKWARD>
__global__ void __launch_bounds__(kWarps * 32) patch_mse_kernel(strip::Rows<pred_t> pred,
                                                                 pred_t* __restrict__ grad, strip::Image<tgt_t> img,
                                                                 strip::Rows<tgt_t> tgt, strip::Geom g, MseArgs a) {
  constexpr int VT = VEC ? 16 / sizeof(tgt_t) : 1, VP = VEC ? 16 / sizeof(pred_t) : 1;
  extern __shared__ __align__(16) unsigned char smem[];
  tgt_t* sm = reinterpret_cast<tgt_t*>(smem);
  const strip::Strip s = g.at(blockIdx.x);
  if (a.from_images) {
    strip::image_strip<tgt_t, VT, true>(g, s, img, sm);
  } else {
    strip::rows_strip<tgt_t, VT, true>(g, s, tgt, sm);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, K = g.K;
  for (int wl = threadIdx.x / 32; wl < s.wn; wl += kWarps) {
    const tgt_t* t = sm + wl * K;
    const int64_t r = g.row0(s) + wl;
    float mean = 0.f, rstd = 1.f;
    if (a.norm_pix) {  // two passes over the staged row, as the reference's mean and unbiased var
      float sum = 0.f;
      for (int k = lane; k < K; k += 32) sum += static_cast<float>(t[k]);
      mean = warp_sum(sum) / K;
      float ss = 0.f;
      for (int k = lane; k < K; k += 32) {
        const float d = static_cast<float>(t[k]) - mean;
        ss += d * d;
      }
      rstd = 1.f / sqrtf(warp_sum(ss) / (K - 1) + a.eps);
    }
    // pred rows may be strided (the decoder's x[:, 1:] view); grad is contiguous
    const pred_t* __restrict__ prow = pred.ptr + s.n * pred.s0 + (static_cast<int64_t>(s.hi) * g.w + s.w0 + wl) * pred.s1;
    const int64_t base = r * K;
    const float scale = BACKWARD ? a.grad_rows[r] * 2.f / K : 0.f;
    float acc = 0.f;
    for (int k = lane * VP; k < K; k += 32 * VP) {  // VP divides K when VEC
      strip::Pack<pred_t, VP> pv, gv;
      if constexpr (VP > 1) pv = strip::load<pred_t, VP>(prow + k); else pv.v[0] = prow[k];
#pragma unroll
      for (int u = 0; u < VP; ++u) {
        const float d = static_cast<float>(pv.v[u]) - (static_cast<float>(t[k + u]) - mean) * rstd;
        if constexpr (BACKWARD) gv.v[u] = static_cast<pred_t>(scale * d); else acc += d * d;
      }
      if constexpr (BACKWARD) {
        if constexpr (VP > 1) strip::store<pred_t, VP>(grad + base + k, gv); else grad[base + k] = gv.v[0];
      }
    }
    if constexpr (!BACKWARD) {
      acc = warp_sum(acc);
      if (lane == 0) a.out[r] = acc / K;
    }
  }
}

struct Launch {
  at::Tensor pred, target;
  bool from_images;
  strip::Geom g;
  int64_t N;
};

Launch prepare(const at::Tensor& pred, const at::Tensor& target, int64_t patch_size, bool norm_pix) {
  check_patch_mse_args(pred, target, patch_size, norm_pix);
  TORCH_CHECK(pred.scalar_type() != at::kDouble, "patch_mse: float64 is supported on CPU only");
  Launch a;
  a.pred = pred.stride(2) == 1 ? pred : pred.contiguous();  // strided rows are read in place
  a.from_images = patch_size > 0;
  a.target = a.from_images ? target : target.contiguous();
  a.N = pred.size(0);
  const size_t elt = a.target.element_size();
  if (a.from_images) {
    const int64_t p = patch_size;
    a.g = strip::geometry(target.size(2) / p, target.size(3) / p, p, target.size(1), pred.size(2), elt);
  } else {
    a.g = strip::geometry(1, pred.size(1), 1, 1, pred.size(2), elt);
  }
  return a;
}

template <bool BACKWARD>
void run(const Launch& a, const float* grad_rows, float* out, at::Tensor* grad, bool norm_pix, double eps,
         const char* op) {
  UMAE_DISPATCH_PRED_TARGET(a.pred.scalar_type(), a.target.scalar_type(), "patch_mse_cuda", [&] {
    if constexpr (!std::is_same_v<pred_t, double>) {
      const at::Tensor& t = a.target;
      strip::Image<tgt_t> img{};
      strip::Rows<tgt_t> rows{};
      bool vec;
      if (a.from_images) {
        img = {const_cast<tgt_t*>(t.const_data_ptr<tgt_t>()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
        vec = strip::image_vectorizable(img, a.g.p);
      } else {
        rows = {const_cast<tgt_t*>(t.const_data_ptr<tgt_t>()), t.stride(0), t.stride(1), 1};
        vec = strip::rows_vectorizable(rows, a.g.K);
      }
      strip::Rows<pred_t> prow{const_cast<pred_t*>(a.pred.const_data_ptr<pred_t>()), a.pred.stride(0),
                               a.pred.stride(1), 1};
      vec = vec && strip::rows_vectorizable(prow, a.g.K) && (!BACKWARD || strip::aligned(grad->data_ptr(), 16));
      pred_t* g = BACKWARD ? grad->mutable_data_ptr<pred_t>() : nullptr;
      const MseArgs args{a.from_images, norm_pix, static_cast<float>(eps), grad_rows, out};
      auto k = vec ? patch_mse_kernel<pred_t, tgt_t, true, BACKWARD> : patch_mse_kernel<pred_t, tgt_t, false, BACKWARD>;
      strip::launch(k, a.g, a.N, kWarps * 32, sizeof(tgt_t), op, prow, g, img, rows, a.g, args);
    }
  });
}

at::Tensor patch_rows_cuda(const at::Tensor& pred, const at::Tensor& target, int64_t patch_size, bool norm_pix,
                           double eps) {
  const Launch a = prepare(pred, target, patch_size, norm_pix);
  at::Tensor out = at::empty({pred.size(0), pred.size(1)}, pred.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  run<false>(a, nullptr, out.mutable_data_ptr<float>(), nullptr, norm_pix, eps, "patch_mse");
  return out;
}

// The mask in fp32 and its sum, or 1 where that is 0 (the loss is then 0, not 0/0), on the device: no sync.
std::pair<at::Tensor, at::Tensor> mask_and_denominator(const at::Tensor& mask, const at::Tensor& pred) {
  check_patch_mask(mask, pred);
  at::Tensor m = mask.to(at::kFloat);
  at::Tensor den = m.sum();
  return {m, at::where(den.ne(0), den, at::ones_like(den))};
}

std::tuple<at::Tensor, at::Tensor> patch_mse_with_rows_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                            const at::Tensor& mask, int64_t patch_size, bool norm_pix,
                                                            double eps) {
  c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor rows = patch_rows_cuda(pred, target, patch_size, norm_pix, eps);
  auto [m, den] = mask_and_denominator(mask, pred);
  return {rows.mul(m).sum().div_(den), rows};
}

at::Tensor patch_mse_cuda(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                          int64_t patch_size, bool norm_pix, double eps) {
  return std::get<0>(patch_mse_with_rows_cuda(pred, target, mask, patch_size, norm_pix, eps));
}

at::Tensor patch_mse_backward_cuda(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& pred,
                                   const at::Tensor& target, int64_t patch_size, bool norm_pix, double eps) {
  c10::cuda::CUDAGuard guard(pred.device());
  const Launch a = prepare(pred, target, patch_size, norm_pix);
  TORCH_CHECK(grad.numel() == 1, "patch_mse_backward: grad must be a scalar, got ", grad.sizes());
  check_same_device(pred, grad, "patch_mse_backward", "grad");
  auto [m, den] = mask_and_denominator(mask, pred);
  const at::Tensor g = m.mul(grad.to(at::kFloat).div(den)).contiguous();  // each row's weight
  at::Tensor out = at::empty(a.pred.sizes(), a.pred.options());
  if (out.numel() == 0) return out;
  run<true>(a, g.const_data_ptr<float>(), nullptr, &out, norm_pix, eps, "patch_mse_backward");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(umae, CUDA, m) {
  m.impl("patch_mse", &patch_mse_cuda);
  m.impl("patch_mse_with_rows", &patch_mse_with_rows_cuda);
  m.impl("patch_mse_backward", &patch_mse_backward_cuda);
}

}  // namespace umae

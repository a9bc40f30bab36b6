// Per-patch (normalized) squared error on CUDA: one warp per patch row, one kernel
// for the forward and one for the backward. Each row is read from DRAM once; the
// mean/variance/loss passes re-read it from L1/L2.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

namespace umae {
namespace {

constexpr int kWarpsPerBlock = 8;
// Grid cap: the rows loop grid-strided, so more blocks than a few waves only add scheduling.
constexpr int64_t kMaxBlocks = 65535 * 4;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Target row r as a (patchified, contiguous) row or gathered from images.
template <typename tgt_t>
struct Target {
  const tgt_t* ptr;
  ImageIndex img;
  bool from_images;
  int64_t K;
  __device__ __forceinline__ float load(int64_t r, int64_t k) const {
    return static_cast<float>(ptr[from_images ? img.offset(r, k) : r * K + k]);
  }
};

// (mean, rstd) of row r, two-pass for accuracy; (0, 1) without norm_pix.
template <typename tgt_t, typename acc_t>
__device__ __forceinline__ void row_stats(const Target<tgt_t>& t, int64_t r, bool norm_pix, acc_t eps, int lane,
                                          acc_t& mean, acc_t& rstd) {
  mean = 0;
  rstd = 1;
  if (!norm_pix) return;
  const int64_t K = t.K;
  acc_t s = 0;
  for (int64_t k = lane; k < K; k += 32) s += static_cast<acc_t>(t.load(r, k));
  mean = warp_sum(s) / K;
  acc_t ss = 0;
  for (int64_t k = lane; k < K; k += 32) {
    const acc_t d = static_cast<acc_t>(t.load(r, k)) - mean;
    ss += d * d;
  }
  rstd = acc_t(1) / sqrt(warp_sum(ss) / (K - 1) + eps);
}

template <typename pred_t, typename tgt_t>
__global__ void patch_mse_fwd_kernel(const pred_t* __restrict__ pred, Target<tgt_t> t, float* __restrict__ out,
                                     int64_t R, bool norm_pix, float eps) {
  using acc_t = float;
  const int lane = threadIdx.x & 31;
  const int64_t K = t.K;
  for (int64_t r = blockIdx.x * (int64_t)kWarpsPerBlock + threadIdx.x / 32; r < R;
       r += (int64_t)gridDim.x * kWarpsPerBlock) {
    acc_t mean, rstd;
    row_stats<tgt_t, acc_t>(t, r, norm_pix, eps, lane, mean, rstd);
    acc_t s = 0;
    for (int64_t k = lane; k < K; k += 32) {
      const acc_t d = static_cast<acc_t>(pred[r * K + k]) - (t.load(r, k) - mean) * rstd;
      s += d * d;
    }
    s = warp_sum(s);
    if (lane == 0) out[r] = s / K;
  }
}

template <typename pred_t, typename tgt_t>
__global__ void patch_mse_bwd_kernel(const float* __restrict__ grad_rows, const pred_t* __restrict__ pred,
                                     Target<tgt_t> t, pred_t* __restrict__ grad, int64_t R, bool norm_pix,
                                     float eps) {
  using acc_t = float;
  const int lane = threadIdx.x & 31;
  const int64_t K = t.K;
  for (int64_t r = blockIdx.x * (int64_t)kWarpsPerBlock + threadIdx.x / 32; r < R;
       r += (int64_t)gridDim.x * kWarpsPerBlock) {
    acc_t mean, rstd;
    row_stats<tgt_t, acc_t>(t, r, norm_pix, eps, lane, mean, rstd);
    const acc_t scale = grad_rows[r] * acc_t(2) / K;
    for (int64_t k = lane; k < K; k += 32) {
      const acc_t d = static_cast<acc_t>(pred[r * K + k]) - (t.load(r, k) - mean) * rstd;
      grad[r * K + k] = static_cast<pred_t>(scale * d);
    }
  }
}

struct Launch {
  at::Tensor pred, target;
  ImageIndex img{};
  bool from_images;
  int64_t R, K;
  int blocks;
};

Launch prepare(const at::Tensor& pred, const at::Tensor& target, int64_t patch_size, bool norm_pix) {
  check_patch_mse_args(pred, target, patch_size, norm_pix);
  TORCH_CHECK(pred.scalar_type() != at::kDouble, "patch_mse: float64 is supported on CPU only");
  Launch a;
  a.pred = pred.contiguous();
  a.from_images = patch_size > 0;
  a.target = a.from_images ? target : target.contiguous();
  if (a.from_images) a.img = image_index(target, patch_size);
  a.R = pred.size(0) * pred.size(1);
  a.K = pred.size(2);
  a.blocks = (int)std::min<int64_t>((a.R + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks);
  return a;
}

at::Tensor patch_mse_cuda(const at::Tensor& pred, const at::Tensor& target, int64_t patch_size, bool norm_pix,
                          double eps) {
  c10::cuda::CUDAGuard guard(pred.device());
  Launch a = prepare(pred, target, patch_size, norm_pix);
  at::Tensor out = at::empty({pred.size(0), pred.size(1)}, pred.options().dtype(at::kFloat));
  if (a.R == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  UMAE_DISPATCH_PRED_TARGET(a.pred.scalar_type(), a.target.scalar_type(), "patch_mse_cuda", [&] {
    if constexpr (!std::is_same_v<pred_t, double>) {
      Target<tgt_t> t{a.target.const_data_ptr<tgt_t>(), a.img, a.from_images, a.K};
      patch_mse_fwd_kernel<pred_t, tgt_t><<<a.blocks, kWarpsPerBlock * 32, 0, stream>>>(
          a.pred.const_data_ptr<pred_t>(), t, out.mutable_data_ptr<float>(), a.R, norm_pix, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor patch_mse_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& pred, const at::Tensor& target,
                                   int64_t patch_size, bool norm_pix, double eps) {
  c10::cuda::CUDAGuard guard(pred.device());
  Launch a = prepare(pred, target, patch_size, norm_pix);
  TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == pred.size(0) && grad_rows.size(1) == pred.size(1),
              "patch_mse_backward: grad_rows must be (N, L), got ", grad_rows.sizes());
  at::Tensor g = grad_rows.to(at::kFloat).contiguous();
  at::Tensor grad = at::empty_like(a.pred);
  if (a.R == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  UMAE_DISPATCH_PRED_TARGET(a.pred.scalar_type(), a.target.scalar_type(), "patch_mse_backward_cuda", [&] {
    if constexpr (!std::is_same_v<pred_t, double>) {
      Target<tgt_t> t{a.target.const_data_ptr<tgt_t>(), a.img, a.from_images, a.K};
      patch_mse_bwd_kernel<pred_t, tgt_t><<<a.blocks, kWarpsPerBlock * 32, 0, stream>>>(
          g.const_data_ptr<float>(), a.pred.const_data_ptr<pred_t>(), t, grad.mutable_data_ptr<pred_t>(), a.R,
          norm_pix, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(umae, CUDA, m) {
  m.impl("patch_mse", &patch_mse_cuda);
  m.impl("patch_mse_backward", &patch_mse_backward_cuda);
}

}  // namespace umae

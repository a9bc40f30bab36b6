// patchify / unpatchify on CUDA: one thread per output element, so the writes are
// coalesced; the strided side is read through L2 (neighbouring threads share lines).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

namespace umae {
namespace {

constexpr int kThreads = 256;

// Grid cap: the elements loop grid-strided, so more blocks than a few waves only add scheduling.
constexpr int64_t kMaxBlocks = 65535 * 8;
inline int64_t blocks_for(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks); }

template <typename scalar_t>
__global__ void patchify_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, ImageIndex idx,
                                int64_t K, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / K, k = i - r * K;
    dst[i] = src[idx.offset(r, k)];
  }
}

template <typename scalar_t>
__global__ void unpatchify_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t s0,
                                  int64_t s1, int64_t s2, int64_t C, int64_t H, int64_t W, int64_t p,
                                  int64_t w, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    // i indexes the contiguous (N, C, H, W) output.
    const int64_t x = i % W, y = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
    const int64_t l = (y / p) * w + x / p, k = ((y % p) * p + x % p) * C + c;
    dst[i] = src[n * s0 + l * s1 + k * s2];
  }
}

at::Tensor patchify_cuda(const at::Tensor& imgs, int64_t p) {
  check_patchify_args(imgs, p);
  c10::cuda::CUDAGuard guard(imgs.device());
  const ImageIndex idx = image_index(imgs, p);
  const int64_t K = p * p * imgs.size(1);
  at::Tensor out = at::empty({imgs.size(0), idx.L, K}, imgs.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, imgs.scalar_type(), "patchify_cuda", [&] {
    patchify_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        imgs.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx, K, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpatchify_cuda(const at::Tensor& x, int64_t p, int64_t h, int64_t w, int64_t c) {
  check_unpatchify_args(x, p, h, w, c);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), c, h * p, w * p}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unpatchify_cuda", [&] {
    unpatchify_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), c,
        h * p, w * p, p, w, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(umae, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
}

}  // namespace umae

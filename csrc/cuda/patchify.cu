// patchify / unpatchify on CUDA: one block per strip of patches (patch_strip.cuh), staged in
// shared memory so the image and the patchified rows are both accessed along their contiguous
// dimension, 16 bytes at a time when aligned.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "patch_strip.cuh"

namespace umae {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) patchify_kernel(strip::Image<T> img, strip::Rows<T> out,
                                                            strip::Geom g) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sm = reinterpret_cast<T*>(smem);
  const strip::Strip s = g.at(blockIdx.x);
  strip::image_strip<T, VEC, true>(g, s, img, sm);
  __syncthreads();
  strip::rows_strip<T, VEC, false>(g, s, out, sm);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) unpatchify_kernel(strip::Rows<T> x, strip::Image<T> img,
                                                              strip::Geom g) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sm = reinterpret_cast<T*>(smem);
  const strip::Strip s = g.at(blockIdx.x);
  strip::rows_strip<T, VEC, true>(g, s, x, sm);
  __syncthreads();
  strip::image_strip<T, VEC, false>(g, s, img, sm);
}

// One launch of `kernel<T, VEC>` (VEC = 16 bytes, or 1 when `vec` is false) over all strips.
template <typename T, template <typename, int> class Launch, typename... Args>
void launch(bool vec, const strip::Geom& g, int64_t N, const char* op, Args... args) {
  const size_t smem = strip::smem_bytes(g, sizeof(T));
  const unsigned blocks = strip::blocks(g, N, op);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    auto k = Launch<T, 16 / sizeof(T)>::kernel;
    strip::allow_smem(k, smem, op);
    k<<<blocks, kThreads, smem, stream>>>(args..., g);
  } else {
    auto k = Launch<T, 1>::kernel;
    strip::allow_smem(k, smem, op);
    k<<<blocks, kThreads, smem, stream>>>(args..., g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
struct Patchify {
  static constexpr auto kernel = patchify_kernel<T, VEC>;
};
template <typename T, int VEC>
struct Unpatchify {
  static constexpr auto kernel = unpatchify_kernel<T, VEC>;
};

at::Tensor patchify_cuda(const at::Tensor& imgs, int64_t p) {
  check_patchify_args(imgs, p);
  c10::cuda::CUDAGuard guard(imgs.device());
  const int64_t N = imgs.size(0), C = imgs.size(1), h = imgs.size(2) / p, w = imgs.size(3) / p;
  at::Tensor out = at::empty({N, h * w, p * p * C}, imgs.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, imgs.scalar_type(), "patchify_cuda", [&] {
    const strip::Geom g = strip::geometry(h, w, p, C, p * p * C, sizeof(scalar_t));
    strip::Image<scalar_t> img{const_cast<scalar_t*>(imgs.const_data_ptr<scalar_t>()), imgs.stride(0),
                               imgs.stride(1), imgs.stride(2), imgs.stride(3)};
    strip::Rows<scalar_t> rows{out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1), 1};
    const bool vec = strip::image_vectorizable(img, p) && strip::rows_vectorizable(rows, g.K);
    launch<scalar_t, Patchify>(vec, g, N, "patchify", img, rows);
  });
  return out;
}

at::Tensor unpatchify_cuda(const at::Tensor& x, int64_t p, int64_t h, int64_t w, int64_t c) {
  check_unpatchify_args(x, p, h, w, c);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0);
  at::Tensor out = at::empty({N, c, h * p, w * p}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unpatchify_cuda", [&] {
    const strip::Geom g = strip::geometry(h, w, p, c, p * p * c, sizeof(scalar_t));
    strip::Rows<scalar_t> rows{const_cast<scalar_t*>(x.const_data_ptr<scalar_t>()), x.stride(0), x.stride(1),
                               x.stride(2)};
    strip::Image<scalar_t> img{out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1), out.stride(2), 1};
    const bool vec = strip::image_vectorizable(img, p) && strip::rows_vectorizable(rows, g.K);
    launch<scalar_t, Unpatchify>(vec, g, N, "unpatchify", rows, img);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(umae, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
}

}  // namespace umae

// patchify / unpatchify on CUDA: one block per strip of patches (patch_strip.cuh), staged in
// shared memory so the image and the patchified rows are both accessed along their contiguous
// dimension, 16 bytes at a time when aligned.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "patch_strip.cuh"

namespace umae {
namespace {

constexpr int kThreads = 256;

// TO_ROWS: image -> shared memory -> patchified rows (patchify); else the way back (unpatchify).
template <typename T, int VEC, bool TO_ROWS>
__device__ __forceinline__ void copy_strip(strip::Image<T> img, strip::Rows<T> rows, const strip::Geom& g) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sm = reinterpret_cast<T*>(smem);
  const strip::Strip s = g.at(blockIdx.x);
  if constexpr (TO_ROWS) {
    strip::image_strip<T, VEC, true>(g, s, img, sm);
    __syncthreads();
    strip::rows_strip<T, VEC, false>(g, s, rows, sm);
  } else {
    strip::rows_strip<T, VEC, true>(g, s, rows, sm);
    __syncthreads();
    strip::image_strip<T, VEC, false>(g, s, img, sm);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) patchify_kernel(strip::Image<T> img, strip::Rows<T> rows, strip::Geom g) {
  copy_strip<T, VEC, true>(img, rows, g);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) unpatchify_kernel(strip::Image<T> img, strip::Rows<T> rows, strip::Geom g) {
  copy_strip<T, VEC, false>(img, rows, g);
}

// The 16-byte instantiation (VEC = 16 / sizeof(T)) where both sides allow it, else the scalar one.
template <typename T, bool TO_ROWS>
void copy(strip::Image<T> img, strip::Rows<T> rows, const strip::Geom& g, int64_t N, const char* op) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = strip::image_vectorizable(img, g.p) && strip::rows_vectorizable(rows, g.K);
  auto k = TO_ROWS ? (vec ? patchify_kernel<T, V> : patchify_kernel<T, 1>)
                   : (vec ? unpatchify_kernel<T, V> : unpatchify_kernel<T, 1>);
  strip::launch(k, g, N, kThreads, sizeof(T), op, img, rows, g);
}

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
    copy<scalar_t, true>(img, rows, g, N, "patchify");
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
    copy<scalar_t, false>(img, rows, g, N, "unpatchify");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(umae, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
}

}  // namespace umae

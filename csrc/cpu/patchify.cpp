// patchify / unpatchify on CPU: one strip of patches (n, hi) per task, image rows streamed in
// order and the channel interleave done in registers (csrc/cpu/patch_strip.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "patch_strip.h"

namespace umae {
namespace {

at::Tensor patchify_cpu(const at::Tensor& imgs, int64_t p) {
  check_patchify_args(imgs, p);
  const int64_t N = imgs.size(0), C = imgs.size(1);
  const ImageIndex idx = image_index(imgs, p);
  const int64_t K = p * p * C;
  at::Tensor out = at::empty({N, idx.L, K}, imgs.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t h = imgs.size(2) / p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, imgs.scalar_type(), "patchify_cpu", [&] {
    const scalar_t* I = imgs.const_data_ptr<scalar_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * h, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / h, hi = q - n * h;
        gather_strip(I + n * idx.sN, idx, hi, O + (n * idx.L + hi * idx.w) * K);
      }
    });
  });
  return out;
}

at::Tensor unpatchify_cpu(const at::Tensor& x, int64_t p, int64_t h, int64_t w, int64_t c) {
  check_unpatchify_args(x, p, h, w, c);
  const int64_t N = x.size(0);
  at::Tensor out = at::empty({N, c, h * p, w * p}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const ImageIndex idx = image_index(out, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unpatchify_cpu", [&] {
    const scalar_t* X = x.const_data_ptr<scalar_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * h, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / h, hi = q - n * h;
        scatter_strip(X + n * x.stride(0) + hi * w * x.stride(1), x.stride(1), x.stride(2), idx, hi,
                      O + n * idx.sN);
      }
    });
  });
  return out;
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key in csrc/cuda/ or, for the Triton
// ops, from umae/<op>_op.py). Semantics: the reference in umae/<op>_op.py.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // imgs (N, C, H, W) -> (N, L, p*p*C), last dim ordered (row-in-patch, col-in-patch, channel).
  m.def("patchify(Tensor imgs, int p) -> Tensor");
  // x (N, L, p*p*C) -> (N, C, h*p, w*p) with L == h*w; the exact inverse of patchify.
  m.def("unpatchify(Tensor x, int p, int h, int w, int c) -> Tensor");
}

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
}

}  // namespace umae

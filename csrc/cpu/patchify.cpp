// patchify / unpatchify on CPU: a strided gather (scatter) parallel over patch rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace umae {
namespace {

// Both directions walk one row of patches (n, hi) at a time, image rows outermost, so the
// image side streams contiguously (for unit W stride) and the patch side is written with stride C.
template <bool kToPatches, typename scalar_t>
void copy_patch_rows(scalar_t* patches, int64_t sP0, int64_t sP1, int64_t sP2, scalar_t* image,
                     const ImageIndex& idx, int64_t N, int64_t h) {
  const int64_t p = idx.p, C = idx.C, w = idx.w;
  at::parallel_for(0, N * h, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / h, hi = q - n * h;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t pi = 0; pi < p; ++pi) {
          scalar_t* img_row = image + n * idx.sN + c * idx.sC + (hi * p + pi) * idx.sH;
          for (int64_t wi = 0; wi < w; ++wi) {
            scalar_t* prow = patches + n * sP0 + (hi * w + wi) * sP1 + (pi * p * C + c) * sP2;
            scalar_t* irow = img_row + wi * p * idx.sW;
            for (int64_t pj = 0; pj < p; ++pj) {
              if constexpr (kToPatches)
                prow[pj * C * sP2] = irow[pj * idx.sW];
              else
                irow[pj * idx.sW] = prow[pj * C * sP2];
            }
          }
        }
    }
  });
}

at::Tensor patchify_cpu(const at::Tensor& imgs, int64_t p) {
  check_patchify_args(imgs, p);
  const int64_t N = imgs.size(0), C = imgs.size(1);
  const ImageIndex idx = image_index(imgs, p);
  const int64_t K = p * p * C;
  at::Tensor out = at::empty({N, idx.L, K}, imgs.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, imgs.scalar_type(), "patchify_cpu", [&] {
    copy_patch_rows<true>(out.mutable_data_ptr<scalar_t>(), idx.L * K, K, int64_t(1),
                          const_cast<scalar_t*>(imgs.const_data_ptr<scalar_t>()), idx, N, imgs.size(2) / p);
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
    copy_patch_rows<false>(const_cast<scalar_t*>(x.const_data_ptr<scalar_t>()), x.stride(0), x.stride(1),
                           x.stride(2), out.mutable_data_ptr<scalar_t>(), idx, N, h);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
}

}  // namespace umae

// One strip of patches (n, hi): the w patches of patch row hi of image n, whose K = p*p*C values
// are ordered (row-in-patch, col-in-patch, channel), laid out as w consecutive rows of K.
// Gather (image -> patches) and scatter (patches -> image) walk whole image rows, contiguous for
// unit W stride, and the patch side in order, so both streams are sequential. fp32 RGB, the common
// case, interleaves (deinterleaves) four pixels at a time in SIMD registers; the rest is scalar.
// Shared by patchify / unpatchify and the masked MSE's image target.
#pragma once
#include <type_traits>

#include "../common.h"

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

// dst[wi * K + (pi * p + pj) * C + c] = image[n, c, hi * p + pi, wi * p + pj], cast to dst_t.
template <typename src_t, typename dst_t>
inline void gather_strip(const src_t* img_n, const ImageIndex& idx, int64_t hi, dst_t* dst) {
  const int64_t p = idx.p, w = idx.w, C = idx.C, K = p * p * C, pC = p * C, sC = idx.sC, sW = idx.sW;
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

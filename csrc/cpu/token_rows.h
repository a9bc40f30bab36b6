// Token rows as the token ops' CPU kernels (random_masking, restore_tokens) read and write them.
// A token row of D values written by the token ops' CPU kernels (random_masking's kept rows,
// restore_tokens' rows): dst = out_t(src + pos), the add in out_t's opmath type and one rounding
// to out_t, as the references' `x + pos_embed` in the promoted dtype; without pos, a cast.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

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

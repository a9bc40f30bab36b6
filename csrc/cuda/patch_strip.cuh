// Patch strips on CUDA, shared by patchify / unpatchify and the masked MSE.
//
// A thread block owns a strip: image rows [hi*p, hi*p + p) and patch columns [w0, w0 + wn) of
// sample n, i.e. the wn consecutive patch rows l = hi*w + w0 + i of the patchified (N, L, K)
// tensor, which are one contiguous run of wn*K elements. The strip is staged in shared memory
// in patchified order (k = (pi*p + pj)*C + c), so both global sides are read and written along
// their contiguous dimension, 16 bytes per access where alignment allows (VEC > 1). The index
// arithmetic is 32-bit inside a strip, a few divisions per VEC elements, none per element.
#pragma once
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace umae {
namespace strip {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// 16 bytes moved as one v4 access, read through the read-only path (__ldg) and written with an
// explicit st.global.v4: plain assignments (of a Pack, or through a uint4 pointer) were split into
// 32- or 16-bit accesses in some unrolled copies of the loops, and __stwb compiles to a strong
// store (the static audit caught all three). The shared-memory side of a move (SMEM) uses plain
// accesses, which compile to LDS.128 / STS.128: the global forms, given a shared address, fault
// with cudaErrorInvalidAddressSpace.
template <typename T, int VEC, bool SMEM = false>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  static_assert(sizeof(T) * VEC == 16, "load: 16-byte packs only");
  uint4 u;
  if constexpr (SMEM)
    u = *reinterpret_cast<const uint4*>(p);
  else
    u = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T, VEC> v;
  memcpy(&v, &u, 16);
  return v;
}

template <typename T, int VEC, bool SMEM = false>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& v) {
  static_assert(sizeof(T) * VEC == 16, "store: 16-byte packs only");
  uint4 u;
  memcpy(&u, &v, 16);
  if constexpr (SMEM)
    *reinterpret_cast<uint4*>(p) = u;
  else
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
                 : "memory");
}

// Which strip block b is: sample n, patch row hi, first patch column w0, wn patches.
struct Strip {
  int64_t n;
  int hi, w0, wn;
};

// Geometry of the strips: h strips of w patches per sample, at most WB patches per block.
struct Geom {
  int h, w, p, C, K, WB, chunks;
  __device__ __forceinline__ Strip at(int64_t b) const {
    const int chunk = static_cast<int>(b % chunks);
    const int64_t rest = b / chunks;
    Strip s;
    s.hi = static_cast<int>(rest % h);
    s.n = rest / h;
    s.w0 = chunk * WB;
    s.wn = min(WB, w - s.w0);
    return s;
  }
  // the strip's first patch row in the (N, L, K) tensor
  __device__ __forceinline__ int64_t row0(const Strip& s) const { return (s.n * h + s.hi) * w + s.w0; }
};

// Image side (N, C, H, W), any strides.
template <typename T>
struct Image {
  T* ptr;
  int64_t sN, sC, sH, sW;
};

// Strip (image, VEC pixels of one image row per step) <-> shared memory in patchified order.
// TO_SMEM: read the image into sm; else write sm to the image.
template <typename T, int VEC, bool TO_SMEM>
__device__ __forceinline__ void image_strip(const Geom& g, const Strip& s, Image<T> img, T* sm) {
  const int p = g.p, C = g.C, K = g.K;
  const int nv = s.wn * p / VEC;  // VEC divides p when VEC > 1
  const int total = C * p * nv;
  for (int t = threadIdx.x; t < total; t += blockDim.x) {
    const int row = t / nv, xl = (t - row * nv) * VEC;
    const int c = row / p, pi = row - c * p;
    const int wl = xl / p, pj = xl - wl * p;
    T* px = img.ptr + s.n * img.sN + c * img.sC + static_cast<int64_t>(s.hi * p + pi) * img.sH +
            static_cast<int64_t>(s.w0 * p + xl) * img.sW;
    T* q = sm + wl * K + (pi * p + pj) * C + c;  // pixel pj + u of the patch is q[u * C]
    if constexpr (TO_SMEM) {
      Pack<T, VEC> v;
      if constexpr (VEC > 1) v = load<T, VEC>(px); else v.v[0] = *px;
#pragma unroll
      for (int u = 0; u < VEC; ++u) q[u * C] = v.v[u];
    } else {
      Pack<T, VEC> v;
#pragma unroll
      for (int u = 0; u < VEC; ++u) v.v[u] = q[u * C];
      if constexpr (VEC > 1) store<T, VEC>(px, v); else *px = v.v[0];
    }
  }
}

// Patchified side (N, L, K) rows, strides (s0, s1, s2) <-> shared memory (wn rows of K).
template <typename T>
struct Rows {
  T* ptr;
  int64_t s0, s1, s2;
};

template <typename T, int VEC, bool TO_SMEM>
__device__ __forceinline__ void rows_strip(const Geom& g, const Strip& s, Rows<T> x, T* sm) {
  const int K = g.K, kv = K / VEC;  // VEC divides K when VEC > 1
  const int64_t l0 = static_cast<int64_t>(s.hi) * g.w + s.w0;
  for (int t = threadIdx.x; t < s.wn * kv; t += blockDim.x) {
    const int wl = t / kv, k = (t - wl * kv) * VEC;
    T* px = x.ptr + s.n * x.s0 + (l0 + wl) * x.s1 + k * x.s2;
    T* q = sm + wl * K + k;
    if constexpr (VEC > 1) {
      if constexpr (TO_SMEM) store<T, VEC, true>(q, load<T, VEC>(px)); else store<T, VEC>(px, load<T, VEC, true>(q));
    } else {
      if constexpr (TO_SMEM) *q = *px; else *px = *q;
    }
  }
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 16-byte accesses on both sides need the contiguous dimension unit-strided, every other
// stride and the patch width a multiple of the vector, and 16-byte-aligned pointers.
template <typename T>
bool image_vectorizable(const Image<T>& img, int p) {
  constexpr int V = 16 / sizeof(T);
  return img.sW == 1 && p % V == 0 && img.sH % V == 0 && img.sC % V == 0 && img.sN % V == 0 &&
         aligned(img.ptr, 16);
}

template <typename T>
bool rows_vectorizable(const Rows<T>& x, int K) {
  constexpr int V = 16 / sizeof(T);
  return x.s2 == 1 && K % V == 0 && x.s1 % V == 0 && x.s0 % V == 0 && aligned(x.ptr, 16);
}

constexpr int kStripBytes = 32 * 1024;  // shared memory per block: 6-7 blocks per H100 SM

// Strips of at most kStripBytes (at least one patch row of K; one over 48 KB opts in to more),
// balanced so the chunks of a patch row are equal. Rows that are not from an image: h = 1, w = L.
inline Geom geometry(int64_t h, int64_t w, int64_t p, int64_t C, int64_t K, size_t elt) {
  TORCH_CHECK(h * w < (int64_t{1} << 31) && K * 8 < (int64_t{1} << 31), "patch strips: L=", h * w, " or K=", K,
              " too large for 32-bit strip indices");
  Geom g{static_cast<int>(h), static_cast<int>(w), static_cast<int>(p), static_cast<int>(C), static_cast<int>(K), 1, 1};
  const int most = std::max<int>(1, static_cast<int>(kStripBytes / (static_cast<size_t>(g.K) * elt)));
  g.chunks = (g.w + most - 1) / most;
  g.WB = (g.w + g.chunks - 1) / g.chunks;
  return g;
}

inline unsigned num_blocks(const Geom& g, int64_t N, const char* op) {
  const int64_t b = N * g.h * g.chunks;
  TORCH_CHECK(b < (int64_t{1} << 31), op, ": too many patch strips (", b, ") for one launch");
  return static_cast<unsigned>(b);
}

inline size_t smem_bytes(const Geom& g, size_t elt) { return static_cast<size_t>(g.WB) * g.K * elt; }

// Lets `kernel` take `bytes` of dynamic shared memory (beyond 48 KB only for patches over 48 KB).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, ": one patch takes ", bytes,
              " bytes of shared memory, more than this GPU's ", optin, " per block: use a smaller patch size");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Launches `kernel(args...)` with one block of `threads` per strip of the N samples and the
// strip's dynamic shared memory (`elt` bytes per staged element), on the current stream.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, const Geom& g, int64_t N, int threads, size_t elt, const char* op, Args... args) {
  const size_t smem = smem_bytes(g, elt);
  allow_smem(kernel, smem, op);
  kernel<<<num_blocks(g, N, op), threads, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace strip
}  // namespace umae

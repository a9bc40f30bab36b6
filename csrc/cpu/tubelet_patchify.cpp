// tubelet_patchify / tubelet_unpatchify on CPU. A tubelet token is ts image patches of consecutive
// frames, one after another: a strip of tokens (b, ti, hi) is ts strips of frame patches
// (csrc/common.h gather_strip / scatter_strip), each written `ts*p*p*C` apart. Also the ops'
// autograd, for every device: each is the other's backward.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace umae {
namespace {

// A frame (c, H, W) of videos (B, C, T, H, W) as the strips see an image.
ImageIndex frame_index(const at::Tensor& v, int64_t p) {
  const int64_t h = v.size(3) / p, w = v.size(4) / p;
  return ImageIndex{0, v.stride(1), v.stride(3), v.stride(4), h * w, w, p, v.size(1)};
}

at::Tensor tubelet_patchify_cpu(const at::Tensor& videos, int64_t p, int64_t ts) {
  check_tubelet_patchify_args(videos, p, ts);
  const int64_t B = videos.size(0), C = videos.size(1), t = videos.size(2) / ts, h = videos.size(3) / p;
  const ImageIndex idx = frame_index(videos, p);
  const int64_t Kf = p * p * C, K = ts * Kf, N = t * idx.L;
  at::Tensor out = at::empty({B, N, K}, videos.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t sB = videos.stride(0), sT = videos.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, videos.scalar_type(), "tubelet_patchify_cpu", [&] {
    const scalar_t* V = videos.const_data_ptr<scalar_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    if (broadcast_value(videos)) return std::fill(O, O + out.numel(), V[0]);
    at::parallel_for(0, B * t * h, grain_for(idx.w * K), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / (t * h), ti = (q / h) % t, hi = q % h;
        scalar_t* dst = O + (b * N + (ti * h + hi) * idx.w) * K;
        for (int64_t p0 = 0; p0 < ts; ++p0)
          gather_strip(V + b * sB + (ti * ts + p0) * sT, idx, hi, dst + p0 * Kf, K);
      }
    });
  });
  return out;
}

at::Tensor tubelet_unpatchify_cpu(const at::Tensor& x, int64_t p, int64_t ts, int64_t t, int64_t h, int64_t w,
                                  int64_t c) {
  check_tubelet_unpatchify_args(x, p, ts, t, h, w, c);
  const int64_t B = x.size(0), Kf = p * p * c;
  at::Tensor out = at::empty({B, c, t * ts, h * p, w * p}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const ImageIndex idx = frame_index(out, p);
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tubelet_unpatchify_cpu", [&] {
    const scalar_t* X = x.const_data_ptr<scalar_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    if (broadcast_value(x)) return std::fill(O, O + out.numel(), X[0]);
    at::parallel_for(0, B * t * h, grain_for(w * ts * Kf), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / (t * h), ti = (q / h) % t, hi = q % h;
        const scalar_t* src = X + b * s0 + (ti * h + hi) * w * s1;
        for (int64_t p0 = 0; p0 < ts; ++p0)
          scatter_strip(src + p0 * Kf * s2, s1, s2, idx, hi, O + b * out.stride(0) + (ti * ts + p0) * out.stride(2));
      }
    });
  });
  return out;
}

using TubeletPatchifySig = at::Tensor(const at::Tensor&, int64_t, int64_t);
using TubeletUnpatchifySig = at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

// Both ops through the dispatcher with autograd: a backward run with create_graph=True is recorded.
at::Tensor call_tubelet_patchify(const at::Tensor& videos, int64_t p, int64_t ts) {
  static const auto op = find_op<TubeletPatchifySig>("umae::tubelet_patchify");
  return op.call(videos, p, ts);
}

at::Tensor call_tubelet_unpatchify(const at::Tensor& x, int64_t p, int64_t ts, int64_t t, int64_t h, int64_t w, int64_t c) {
  static const auto op = find_op<TubeletUnpatchifySig>("umae::tubelet_unpatchify");
  return op.call(x, p, ts, t, h, w, c);
}

class TubeletPatchifyFunction : public torch::autograd::Function<TubeletPatchifyFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& videos, int64_t p, int64_t ts) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = call_tubelet_patchify(videos, p, ts);  // checks the arguments first
    ctx->saved_data["geom"] = std::vector<int64_t>{p, ts, videos.size(2) / ts, videos.size(3) / p,
                                                   videos.size(4) / p, videos.size(1)};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->saved_data["geom"].toIntVector();
    return {call_tubelet_unpatchify(grads[0], s[0], s[1], s[2], s[3], s[4], s[5]), at::Tensor(), at::Tensor()};
  }
};

class TubeletUnpatchifyFunction : public torch::autograd::Function<TubeletUnpatchifyFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t p, int64_t ts, int64_t t, int64_t h,
                            int64_t w, int64_t c) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["p_ts"] = std::vector<int64_t>{p, ts};
    return call_tubelet_unpatchify(x, p, ts, t, h, w, c);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->saved_data["p_ts"].toIntVector();
    return {call_tubelet_patchify(grads[0], s[0], s[1]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor tubelet_patchify_autograd(const at::Tensor& videos, int64_t p, int64_t ts) {
  refuse_forward_ad("tubelet_patchify", videos);
  if (records(videos)) return TubeletPatchifyFunction::apply(videos, p, ts);
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_tubelet_patchify(videos, p, ts);
}

at::Tensor tubelet_unpatchify_autograd(const at::Tensor& x, int64_t p, int64_t ts, int64_t t, int64_t h, int64_t w,
                                       int64_t c) {
  refuse_forward_ad("tubelet_unpatchify", x);
  if (records(x)) return TubeletUnpatchifyFunction::apply(x, p, ts, t, h, w, c);
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_tubelet_unpatchify(x, p, ts, t, h, w, c);
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key from
// umae/ops/tubelet_patchify_op.py: Triton). Semantics: the reference in that module.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // videos (B, C, T, H, W) -> (B, t*h*w, ts*p*p*C): tokens ordered (t, h, w), values (p0, p1, p2, c).
  m.def("tubelet_patchify(Tensor videos, int p, int ts) -> Tensor");
  // x (B, t*h*w, ts*p*p*c) -> (B, c, t*ts, h*p, w*p); the exact inverse of tubelet_patchify.
  m.def("tubelet_unpatchify(Tensor x, int p, int ts, int t, int h, int w, int c) -> Tensor");
}

TORCH_LIBRARY_IMPL(umae, Autograd, m) {
  m.impl("tubelet_patchify", &tubelet_patchify_autograd);
  m.impl("tubelet_unpatchify", &tubelet_unpatchify_autograd);
}

UMAE_AUTOCAST_OFF("tubelet_patchify", "tubelet_unpatchify")

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("tubelet_patchify", &tubelet_patchify_cpu);
  m.impl("tubelet_unpatchify", &tubelet_unpatchify_cpu);
}

}  // namespace umae

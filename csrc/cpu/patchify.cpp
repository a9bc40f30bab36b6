// patchify / unpatchify on CPU: one strip of patches (n, hi) per task, image rows streamed in
// order and the channel interleave done in registers (csrc/common.h). Also the ops'
// autograd, for every device: each is the other's backward (linear maps, so double backward works).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

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
    if (broadcast_value(imgs)) return std::fill(O, O + out.numel(), I[0]);  // every patch value is that one
    at::parallel_for(0, N * h, grain_for(idx.w * idx.p * idx.p * idx.C), [&](int64_t q0, int64_t q1) {
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
    if (broadcast_value(x)) return std::fill(O, O + out.numel(), X[0]);  // every pixel is that one value
    at::parallel_for(0, N * h, grain_for(idx.w * idx.p * idx.p * idx.C), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / h, hi = q - n * h;
        scatter_strip(X + n * x.stride(0) + hi * w * x.stride(1), x.stride(1), x.stride(2), idx, hi,
                      O + n * idx.sN);
      }
    });
  });
  return out;
}

using PatchifySig = at::Tensor(const at::Tensor&, int64_t);
using UnpatchifySig = at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, int64_t);

// Both ops through the dispatcher with autograd: a backward run with create_graph=True is recorded.
at::Tensor call_patchify(const at::Tensor& imgs, int64_t p) {
  static const auto op = find_op<PatchifySig>("umae::patchify");
  return op.call(imgs, p);
}

at::Tensor call_unpatchify(const at::Tensor& x, int64_t p, int64_t h, int64_t w, int64_t c) {
  static const auto op = find_op<UnpatchifySig>("umae::unpatchify");
  return op.call(x, p, h, w, c);
}

class PatchifyFunction : public torch::autograd::Function<PatchifyFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& imgs, int64_t p) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = call_patchify(imgs, p);  // checks the arguments first
    ctx->saved_data["hwc"] = std::vector<int64_t>{p, imgs.size(2) / p, imgs.size(3) / p, imgs.size(1)};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->saved_data["hwc"].toIntVector();
    return {call_unpatchify(grads[0], s[0], s[1], s[2], s[3]), at::Tensor()};
  }
};

class UnpatchifyFunction : public torch::autograd::Function<UnpatchifyFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t p, int64_t h, int64_t w, int64_t c) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["p"] = p;
    return call_unpatchify(x, p, h, w, c);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_patchify(grads[0], ctx->saved_data["p"].toInt()), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor patchify_autograd(const at::Tensor& imgs, int64_t p) {
  refuse_forward_ad("patchify", imgs);
  if (records(imgs)) return PatchifyFunction::apply(imgs, p);
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_patchify(imgs, p);
}

at::Tensor unpatchify_autograd(const at::Tensor& x, int64_t p, int64_t h, int64_t w, int64_t c) {
  refuse_forward_ad("unpatchify", x);
  if (records(x)) return UnpatchifyFunction::apply(x, p, h, w, c);
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_unpatchify(x, p, h, w, c);
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key in csrc/cuda/ or, for the Triton
// ops, from umae/ops/<op>_op.py). Semantics: the reference in umae/ops/<op>_op.py.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // imgs (N, C, H, W) -> (N, L, p*p*C), last dim ordered (row-in-patch, col-in-patch, channel).
  m.def("patchify(Tensor imgs, int p) -> Tensor");
  // x (N, L, p*p*C) -> (N, C, h*p, w*p) with L == h*w; the exact inverse of patchify.
  m.def("unpatchify(Tensor x, int p, int h, int w, int c) -> Tensor");
}

TORCH_LIBRARY_IMPL(umae, Autograd, m) {
  m.impl("patchify", &patchify_autograd);
  m.impl("unpatchify", &unpatchify_autograd);
}

UMAE_AUTOCAST_OFF("patchify", "unpatchify")

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
}

}  // namespace umae

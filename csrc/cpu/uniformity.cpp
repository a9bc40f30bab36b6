// U-MAE's uniformity loss on CPU: c * sum_ij (z_i . z_j)^2 over L2-normalized rows z_i of F (B, D),
// c = 1 / B^2 (or 1 / (B (B - 1)) without the diagonal). The B x B similarity S = Z Z^T is never
// formed whole: sum S_ij^2 = ||Z^T Z||_F^2 is summed from whichever contraction is smaller, by BLAS:
// - B > D: the D x D Gram G = Z^T Z (as the Triton kernel), backward dZ = 4c Z G;
// - B <= D: S in blocks of kRowBlock rows (at most kRowBlock x B), backward dZ = 4c S Z by blocks
//   (B <= kSmallBatch: by direct dot products).
// Math in fp32 (fp64 for fp64 features), as the reference's.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"

namespace umae {
namespace {

constexpr int64_t kRowBlock = 256;  // rows of S per BLAS call: S is never more than 256 x B

struct Normalized {
  at::Tensor z;      // (B, D) acc dtype, contiguous
  at::Tensor norms;  // (B,) the rows' L2 norms (before normalization)
};

// One pass over F: the row norms and z = f / max(|f|, eps), as F.normalize divides.
Normalized normalize_rows(const at::Tensor& features, bool normalize, double eps) {
  const at::ScalarType acc = at::toOpMathType(features.scalar_type());
  const int64_t B = features.size(0), D = features.size(1);
  Normalized r{at::empty({B, D}, features.options().dtype(acc)), at::empty({B}, features.options().dtype(acc))};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "uniformity_normalize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* F = features.const_data_ptr<scalar_t>();
    const int64_t sb = features.stride(0), sd = features.stride(1);
    acc_t* Z = r.z.mutable_data_ptr<acc_t>();
    acc_t* NR = r.norms.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain_for(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* z = Z + b * D;
        const scalar_t* f = F + b * sb;
        for (int64_t d = 0; d < D; ++d) z[d] = static_cast<acc_t>(f[d * sd]);
        acc_t ss = 0;
        _Pragma("omp simd reduction(+ : ss)")  // inside a dispatch macro: no #pragma
        for (int64_t d = 0; d < D; ++d) ss += z[d] * z[d];
        NR[b] = std::sqrt(ss);
        if (normalize) {
          const acc_t den = std::max(NR[b], static_cast<acc_t>(eps));
          _Pragma("omp simd")
          for (int64_t d = 0; d < D; ++d) z[d] /= den;
        }
      }
    });
  });
  return r;
}

void check_features(const at::Tensor& features, const char* op) {
  TORCH_CHECK(features.dim() == 2 && is_float_type(features.scalar_type()), op,
              ": features must be a floating (B, D) tensor, got ", features.sizes(), " ", features.scalar_type());
  TORCH_CHECK(features.size(1) > 0, op, ": features must have at least one column (D >= 1) to be L2-normalized, got shape ",
              features.sizes());
}

double denominator(int64_t B, bool exclude_diagonal) {
  return exclude_diagonal ? double(B) * double(B - 1) : double(B) * double(B);
}

// Summed in double: a block of S holds up to 256 x B squares (4M at B = 16,384), and one fp32
// accumulator per SIMD lane lost 2e-3 of them for nearly parallel rows.
template <typename acc_t>
double sum_squares(const at::Tensor& t) {
  const acc_t* v = t.const_data_ptr<acc_t>();
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < t.numel(); ++i) s += static_cast<double>(v[i]) * static_cast<double>(v[i]);
  return s;
}

// G = Z^T Z with each fp32 entry summing at most kGramRows products, the partial Grams summed in double:
// nearly parallel rows add the same product B times, and a BLAS that accumulates them in one fp32 sum
// (MKL's generic path on AMD CPUs) erred by 2e-4 at B = 65,536. The reference's S sums D products per
// entry; at most 1,024 per entry here, whatever the BLAS. Returns G in double.
constexpr int64_t kGramRows = 1024;

at::Tensor gram_double(const at::Tensor& z) {
  const int64_t B = z.size(0), D = z.size(1);
  if (B <= kGramRows) return at::mm(z.t(), z).to(at::kDouble);
  at::Tensor acc = at::zeros({D, D}, z.options().dtype(at::kDouble));
  at::Tensor part = at::empty({D, D}, z.options());
  for (int64_t b0 = 0; b0 < B; b0 += kGramRows) {
    const at::Tensor zb = z.narrow(0, b0, std::min(kGramRows, B - b0));
    at::mm_out(part, zb.t(), zb);
    acc.add_(part);
  }
  return acc;
}

// S rows [b0, b0 + rows) against every row, its diagonal entries zeroed when excluded.
at::Tensor similarity_block(const at::Tensor& z, int64_t b0, int64_t rows, bool exclude_diagonal, at::Tensor& buf) {
  at::Tensor s = buf.narrow(0, 0, rows);
  at::mm_out(s, z.narrow(0, b0, rows), z.t());
  if (exclude_diagonal) s.narrow(1, b0, rows).diagonal().zero_();
  return s;
}

// The D x D Gram where it is the smaller, but never for the diagonal-free loss of unnormalized rows:
// ||G||^2 - sum_i |z_i|^4 cancels catastrophically when one row's norm dominates (40x off, or negative);
// S's blocks drop the diagonal exactly (B^2 D FLOPs, as the reference's B x B).
bool uses_gram(int64_t B, int64_t D, bool exact_offdiagonal) { return B > D && !exact_offdiagonal; }

// Small batches: S from its upper triangle by direct dot products, with no BLAS call or ATen
// temporaries (at B = 16 those cost more than the arithmetic).
constexpr int64_t kSmallBatch = 64;

// 16 independent partial sums: a single accumulator would wait on each add's latency.
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t part[16] = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int k = 0; k < 16; ++k) part[k] += a[d + k] * b[d + k];
  acc_t s = 0;
  for (; d < D; ++d) s += a[d] * b[d];
  for (int k = 0; k < 16; ++k) s += part[k];
  return s;
}

template <typename acc_t>
std::vector<acc_t> small_similarity(const acc_t* Z, int64_t B, int64_t D, bool exclude_diagonal) {
  std::vector<acc_t> S(B * B);
  at::parallel_for(0, B, grain_for(B * D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = i; j < B; ++j)
        S[i * B + j] = S[j * B + i] = (exclude_diagonal && i == j) ? acc_t(0) : dot(Z + i * D, Z + j * D, D);
  });
  return S;
}

bool uses_small_path(int64_t B, int64_t D) { return B <= kSmallBatch && B <= D; }

// dL/df from dL/dz = c dz, through z = f / max(|f|, eps): its Jacobian is (I - z z^T) / |f| above eps,
// I / eps below.
at::Tensor through_normalization(const Normalized& nz, const at::Tensor& dz, double c, bool normalize, double eps) {
  const at::Tensor& z = nz.z;
  const int64_t B = z.size(0), D = z.size(1);
  at::Tensor df = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "uniformity_grad_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* Z = z.const_data_ptr<acc_t>();
    const acc_t* DZ = dz.const_data_ptr<acc_t>();
    const acc_t* NR = nz.norms.const_data_ptr<acc_t>();
    acc_t* DF = df.mutable_data_ptr<acc_t>();
    const acc_t cc = static_cast<acc_t>(c);
    at::parallel_for(0, B, grain_for(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t* zr = Z + b * D;
        const acc_t* g = DZ + b * D;
        acc_t* out = DF + b * D;
        acc_t radial = 0, scale = cc;
        if (normalize) {
          if (NR[b] > static_cast<acc_t>(eps)) {
            _Pragma("omp simd reduction(+ : radial)")
            for (int64_t d = 0; d < D; ++d) radial += zr[d] * g[d];
          }
          scale = cc / std::max(NR[b], static_cast<acc_t>(eps));
        }
        _Pragma("omp simd")
        for (int64_t d = 0; d < D; ++d) out[d] = scale * (g[d] - zr[d] * radial);
      }
    });
  });
  return df;
}

// The loss and, when asked, its gradient dL/dF (acc dtype, for an upstream gradient of 1), from one
// normalization and one contraction: S (or G) is formed once for both.
std::tuple<at::Tensor, at::Tensor> loss_and_grad(const at::Tensor& features, bool normalize, bool exclude_diagonal,
                                                 double eps, bool want_grad) {
  const int64_t B = features.size(0), D = features.size(1);
  const Normalized nz = normalize_rows(features, normalize, eps);
  const at::Tensor& z = nz.z;
  at::Tensor loss = at::empty({}, z.options());
  at::Tensor dz = want_grad ? at::empty_like(z) : at::Tensor();  // sum_j S_ij z_j = (z G)_i
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "uniformity_cpu", [&] {
    const scalar_t* Z = z.const_data_ptr<scalar_t>();
    double total = 0;  // block partials added in a fixed order
    if (uses_small_path(B, D)) {
      const std::vector<scalar_t> S = small_similarity(Z, B, D, exclude_diagonal);
      for (const scalar_t v : S) total += static_cast<double>(v) * static_cast<double>(v);
      if (want_grad) {
        scalar_t* DZ = dz.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, B, grain_for(B * D), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            scalar_t* out = DZ + i * D;
            std::fill(out, out + D, scalar_t(0));
            for (int64_t j = 0; j < B; ++j) {
              const scalar_t sij = S[i * B + j];
              const scalar_t* zj = Z + j * D;
              _Pragma("omp simd")  // inside a dispatch macro: no #pragma
              for (int64_t d = 0; d < D; ++d) out[d] += sij * zj[d];
            }
          }
        });
      }
    } else if (uses_gram(B, D, exclude_diagonal && !normalize)) {
      const at::Tensor Gd = gram_double(z);
      total = sum_squares<double>(Gd);
      at::Tensor sq = exclude_diagonal ? z.mul(z).sum(1, true) : at::Tensor();
      if (exclude_diagonal) total -= sum_squares<scalar_t>(sq);
      const at::Tensor G = want_grad ? Gd.to(z.scalar_type()) : at::Tensor();
      if (want_grad) {
        at::mm_out(dz, z, G);
        if (exclude_diagonal) dz.sub_(sq.mul(z));
      }
    } else {
      at::Tensor buf = at::empty({std::min(B, kRowBlock), B}, z.options());
      for (int64_t b0 = 0; b0 < B; b0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, B - b0);
        const at::Tensor S = similarity_block(z, b0, rows, exclude_diagonal, buf);
        total += sum_squares<scalar_t>(S);
        if (want_grad) {
          at::Tensor out = dz.narrow(0, b0, rows);
          at::mm_out(out, S, z);
        }
      }
    }
    loss.fill_(static_cast<scalar_t>(total / denominator(B, exclude_diagonal)));
  });
  if (!want_grad) return {loss, at::Tensor()};
  // dL/dz = 4c dz, c = 1 / denominator; then through the normalization
  return {loss, through_normalization(nz, dz, 4.0 / denominator(B, exclude_diagonal), normalize, eps)};
}

at::Tensor uniformity_cpu(const at::Tensor& features, bool normalize, bool exclude_diagonal, double eps) {
  check_features(features, "uniformity_loss");
  return std::get<0>(loss_and_grad(features, normalize, exclude_diagonal, eps, false));
}

std::tuple<at::Tensor, at::Tensor> uniformity_with_grad_cpu(const at::Tensor& features, bool normalize,
                                                            bool exclude_diagonal, double eps) {
  check_features(features, "uniformity_loss");
  return loss_and_grad(features, normalize, exclude_diagonal, eps, true);
}

// Autograd in C++, for every device (the CUDA kernels are Triton's, registered from Python at the
// CUDA key of the same two ops): at the small batches U-MAE sees per rank the op costs tens of microseconds,
// as much as a Python autograd wrapper would add. A scalar loss's gradient is a B x D tensor, so the
// forward computes it with the loss (one contraction instead of two) and the backward scales it.
class UniformityFunction : public torch::autograd::Function<UniformityFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& features, bool normalize,
                            bool exclude_diagonal, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool, bool, double)>("umae::uniformity_loss_with_grad");
    auto [loss, grad] = op.call(features, normalize, exclude_diagonal, eps);
    ctx->save_for_backward({grad, features});
    ctx->saved_data["dtype"] = features.scalar_type();
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    at::Tensor df;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      df = grads[0].mul(saved[0]);
      if (df.scalar_type() != dtype) df = df.to(dtype);
    }
    // G and the norms are constants of the saved gradient: differentiated again it would miss their terms
    return {first_order_only("uniformity_loss", {df}, {saved[1], grads[0]})[0], at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor uniformity_autograd(const at::Tensor& features, bool normalize, bool exclude_diagonal, double eps) {
  refuse_forward_ad("uniformity_loss", features);
  if (records(features))
    return UniformityFunction::apply(features, normalize, exclude_diagonal, eps);
  // no gradient will follow (e.g. plain MAE logging the term detached): the loss alone
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto plain = find_op<at::Tensor(const at::Tensor&, bool, bool, double)>("umae::uniformity_loss");
  return plain.call(features, normalize, exclude_diagonal, eps);
}

// Under autocast the reference's similarity matmul runs in the autocast dtype (z rounded to it, fp32
// accumulation): the op takes the features in that dtype, cast as autocast casts a matmul's operands
// (fp64 stays), and its kernels run with autocast off (their own ATen calls are not re-cast).
template <c10::DeviceType device>
at::Tensor uniformity_autocast(const at::Tensor& features, bool normalize, bool exclude_diagonal, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static const auto op = find_op<at::Tensor(const at::Tensor&, bool, bool, double)>("umae::uniformity_loss");
  const at::Tensor f =
      at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(device), features, device);
  return op.call(f, normalize, exclude_diagonal, eps);
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key in csrc/cuda/ or, for the Triton
// ops, from umae/ops/<op>_op.py). Semantics: the reference in umae/ops/<op>_op.py.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // features (B, D) -> the uniformity loss, a 0-dim fp32 (fp64 for fp64 features) tensor. Its autograd
  // (csrc/cpu/uniformity.cpp, every device) runs uniformity_loss_with_grad when features need a gradient.
  // eps: the normalization's (F.normalize's), given by the caller (umae/ops/uniformity_op.py).
  m.def("uniformity_loss(Tensor features, bool normalize, bool exclude_diagonal, float eps) -> Tensor");
  // -> (the loss, dL/dfeatures for an upstream gradient of 1 in the accumulation dtype (B, D)).
  m.def("uniformity_loss_with_grad(Tensor features, bool normalize, bool exclude_diagonal, float eps) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(umae, Autograd, m) { m.impl("uniformity_loss", &uniformity_autograd); }

TORCH_LIBRARY_IMPL(umae, AutocastCPU, m) {
  m.impl("uniformity_loss", &uniformity_autocast<c10::DeviceType::CPU>);
  register_autocast_off(m, {"uniformity_loss_with_grad"});
}

TORCH_LIBRARY_IMPL(umae, AutocastCUDA, m) {
  m.impl("uniformity_loss", &uniformity_autocast<c10::DeviceType::CUDA>);
  register_autocast_off(m, {"uniformity_loss_with_grad"});
}

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("uniformity_loss", &uniformity_cpu);
  m.impl("uniformity_loss_with_grad", &uniformity_with_grad_cpu);
}

}  // namespace umae

// VideoMAE's reconstruction loss on CPU, forward and backward, one pass: each masked token is gathered
// from the videos once (read by their strides: HF's (B, T, C, H, W) as a view), unnormalized and
// normalized per channel in a small planar fp32 buffer, and compared with its pred row (its rank among
// the row's masked tokens). Also the loss's autograd, for every device.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"

namespace umae {
namespace {

// The videos' geometry and the pred row of each masked token.
struct Video {
  int64_t B, C, ts, p, t, h, w, N, J, K, Nm;
  int64_t sB, sC, sT, sH, sW;
  std::vector<int64_t> rank;  // (B, N): the token's row in pred (its order among the masked), or -1
};

Video video_of(const at::Tensor& pred, const at::Tensor& videos, const at::Tensor& mask, int64_t p, int64_t ts,
               bool norm_pix, const std::optional<at::Tensor>& stats) {
  check_tubelet_patchify_args(videos, p, ts);
  Video v;
  v.B = videos.size(0), v.C = videos.size(1), v.ts = ts, v.p = p;
  v.t = videos.size(2) / ts, v.h = videos.size(3) / p, v.w = videos.size(4) / p;
  v.N = v.t * v.h * v.w, v.J = ts * p * p, v.K = v.J * v.C;
  v.sB = videos.stride(0), v.sC = videos.stride(1), v.sT = videos.stride(2), v.sH = videos.stride(3),
  v.sW = videos.stride(4);
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == v.B && pred.size(2) == v.K, "videomae_loss: pred must be (B, ",
              "masked tokens, ts*p*p*C) = (", v.B, ", *, ", v.K, "), got ", pred.sizes());
  TORCH_CHECK(is_float_type(pred.scalar_type()), "videomae_loss: pred must be a floating tensor, got ",
              pred.scalar_type());
  TORCH_CHECK((pred.scalar_type() == at::kDouble) == (videos.scalar_type() == at::kDouble),
              "videomae_loss: float64 pred needs float64 videos and vice versa");
  check_same_device(pred, videos, "videomae_loss", "videos");
  check_same_device(pred, mask, "videomae_loss", "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == v.B && mask.size(1) == v.N,
              "videomae_loss: mask must be bool (B, N) = (", v.B, ", ", v.N, "), got ", mask.scalar_type(), " ",
              mask.sizes());
  TORCH_CHECK(!stats.has_value() || (stats->dim() == 2 && stats->size(0) == 2 && stats->size(1) == v.C &&
                                     (stats->scalar_type() == at::kFloat || stats->scalar_type() == at::kDouble) &&
                                     stats->device() == videos.device()),
              "videomae_loss: stats must be float32 or float64 (2, C) = (2, ", v.C,
              ") (mean; std) on the videos' device");
  TORCH_CHECK(!norm_pix || v.J >= 2, "videomae_loss: norm_pix needs at least 2 values per token and channel");
  v.Nm = pred.size(1);
  return v;
}

// Ranks read from a CPU mask (the count of every row checked: pred has one row per masked token).
void rank_tokens(Video& v, const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous();
  const bool* M = m.const_data_ptr<bool>();
  v.rank.assign(v.B * v.N, -1);
  for (int64_t b = 0; b < v.B; ++b) {
    int64_t r = 0;
    for (int64_t l = 0; l < v.N; ++l)
      if (M[b * v.N + l]) v.rank[b * v.N + l] = r++;
    TORCH_CHECK_VALUE(r == v.Nm, "videomae_loss: mask row ", b, " masks ", r, " tokens, but pred has ", v.Nm,
                " rows per sample: every row must mask the same count");
  }
}

// Calls fn(b, r, z) for each masked token: r its pred row, z its label (K values in pred's order
// (p0, p1, p2, c), acc_t): the pixels unnormalized, then normalized per channel, (x - mean) / (sqrt(unbiased
// var) + eps). The channels are gathered as planes (contiguous image rows, vectorized), their statistics
// taken there, and the normalized values interleaved into z, so that the comparison with the pred row
// runs contiguous.
template <typename vid_t, typename acc_t, typename Fn>
void for_each_label(const vid_t* V, const Video& v, bool norm_pix, const std::vector<acc_t>& mean,
                    const std::vector<acc_t>& std, acc_t eps, const Fn& fn) {
  const int64_t p = v.p, J = v.J, C = v.C;
  at::parallel_for(0, v.B * v.t * v.h, grain_for(v.w * v.K), [&](int64_t q0, int64_t q1) {
    std::vector<acc_t> y(C * J), z(C * J);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = q / (v.t * v.h), ti = (q / v.h) % v.t, hi = q % v.h;
      for (int64_t wi = 0; wi < v.w; ++wi) {
        const int64_t r = v.rank[b * v.N + (ti * v.h + hi) * v.w + wi];
        if (r < 0) continue;
        for (int64_t c = 0; c < C; ++c) {
          acc_t* yc = y.data() + c * J;
          const acc_t s = std.empty() ? acc_t(1) : std[c], m = std.empty() ? acc_t(0) : mean[c];
          for (int64_t p0 = 0; p0 < v.ts; ++p0)
            for (int64_t p1 = 0; p1 < p; ++p1) {
              const vid_t* src = V + b * v.sB + c * v.sC + (ti * v.ts + p0) * v.sT + (hi * p + p1) * v.sH + wi * p * v.sW;
              acc_t* dst = yc + (p0 * p + p1) * p;
              if (v.sW == 1) {
#pragma omp simd
                for (int64_t p2 = 0; p2 < p; ++p2) dst[p2] = static_cast<acc_t>(src[p2]) * s + m;
              } else {
                for (int64_t p2 = 0; p2 < p; ++p2) dst[p2] = static_cast<acc_t>(src[p2 * v.sW]) * s + m;
              }
            }
          acc_t mu = 0, rden = 1;
          if (norm_pix) {
            acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < J; ++j) sum += yc[j];
            mu = sum / J;
            // the sum's rounding corrected once (so a constant token's mean is its value and its labels 0,
            // not rounding noise scaled by 1 / eps), with the squares about the first mean
            acc_t resid = 0, ss = 0;
#pragma omp simd reduction(+ : resid, ss)
            for (int64_t j = 0; j < J; ++j) {
              const acc_t d = yc[j] - mu;
              resid += d;
              ss += d * d;
            }
            mu += resid / J;
            ss = std::max(ss - resid * resid / J, acc_t(0));
            rden = acc_t(1) / (std::sqrt(ss / (J - 1)) + eps);  // VideoMAE adds eps to the std
          }
          for (int64_t j = 0; j < J; ++j) z[j * C + c] = (yc[j] - mu) * rden;
        }
        fn(b, r, z.data());
      }
    }
  });
}

// Row `row` of stats (0: mean, 1: std) as acc_t values; none without stats.
template <typename acc_t>
std::vector<acc_t> values(const std::optional<at::Tensor>& stats, int64_t row) {
  if (!stats.has_value()) return {};
  const at::Tensor s = stats->contiguous();
  const int64_t C = s.size(1);
  if (s.scalar_type() == at::kDouble) {
    const double* d = s.const_data_ptr<double>() + row * C;
    return std::vector<acc_t>(d, d + C);
  }
  const float* f = s.const_data_ptr<float>() + row * C;
  return std::vector<acc_t>(f, f + C);
}

at::Tensor videomae_loss_cpu(const at::Tensor& pred_in, const at::Tensor& videos, const at::Tensor& mask,
                             const std::optional<at::Tensor>& stats, int64_t p, int64_t ts, bool norm_pix, double eps) {
  Video v = video_of(pred_in, videos, mask, p, ts, norm_pix, stats);
  rank_tokens(v, mask);
  const at::Tensor pred = pred_in.stride(2) == 1 ? pred_in : pred_in.contiguous();
  const auto acc_opts = pred.options().dtype(at::toOpMathType(pred.scalar_type()));
  at::Tensor loss = at::empty({}, acc_opts);
  UMAE_DISPATCH_PRED_TARGET(pred.scalar_type(), videos.scalar_type(), "videomae_loss_cpu", [&] {
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* P = pred.const_data_ptr<pred_t>();
    const int64_t s0 = pred.stride(0), s1 = pred.stride(1), K = v.K;
    std::vector<acc_t> rows(v.B * v.Nm);  // each token's sum of squares, summed in order below
    for_each_label<tgt_t, acc_t>(videos.const_data_ptr<tgt_t>(), v, norm_pix, values<acc_t>(stats, 0), values<acc_t>(stats, 1),
                                 static_cast<acc_t>(eps), [&](int64_t b, int64_t r, const acc_t* z) {
      const pred_t* row = P + b * s0 + r * s1;
      acc_t s = 0;
      _Pragma("omp simd reduction(+ : s)")  // inside a dispatch macro: no #pragma
      for (int64_t k = 0; k < K; ++k) {
        const acc_t d = static_cast<acc_t>(row[k]) - z[k];
        s += d * d;
      }
      rows[b * v.Nm + r] = s;
    });
    double total = 0;
    for (const acc_t s : rows) total += s;
    // the mean over B * Nm * K values: 0 / 0 (NaN) for no masked token, as the reference's empty mean
    *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total / static_cast<double>(v.B * v.Nm * v.K));
  });
  return loss;
}

// d(grad * loss) / d(pred), in pred's dtype (contiguous): 2 * grad * (pred - label) / (B * Nm * K).
at::Tensor videomae_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred_in, const at::Tensor& videos,
                                      const at::Tensor& mask, const std::optional<at::Tensor>& stats, int64_t p,
                                      int64_t ts, bool norm_pix, double eps) {
  Video v = video_of(pred_in, videos, mask, p, ts, norm_pix, stats);
  TORCH_CHECK(grad.numel() == 1, "videomae_loss_backward: grad must be a scalar, got ", grad.sizes());
  rank_tokens(v, mask);
  const at::Tensor pred = pred_in.stride(2) == 1 ? pred_in : pred_in.contiguous();
  at::Tensor gpred = at::empty(pred.sizes(), pred.options().memory_format(at::MemoryFormat::Contiguous));
  if (gpred.numel() == 0) return gpred;
  const at::ScalarType acc = at::toOpMathType(pred.scalar_type());
  const at::Tensor g = as_dtype(grad, acc);
  UMAE_DISPATCH_PRED_TARGET(pred.scalar_type(), videos.scalar_type(), "videomae_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* P = pred.const_data_ptr<pred_t>();
    pred_t* D = gpred.mutable_data_ptr<pred_t>();
    const int64_t s0 = pred.stride(0), s1 = pred.stride(1), K = v.K;
    const acc_t coef = *g.const_data_ptr<acc_t>() * acc_t(2) / static_cast<acc_t>(v.B * v.Nm * K);
    for_each_label<tgt_t, acc_t>(videos.const_data_ptr<tgt_t>(), v, norm_pix, values<acc_t>(stats, 0), values<acc_t>(stats, 1),
                                 static_cast<acc_t>(eps), [&](int64_t b, int64_t r, const acc_t* z) {
      const pred_t* row = P + b * s0 + r * s1;
      pred_t* out = D + (b * v.Nm + r) * K;
      _Pragma("omp simd")
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<pred_t>(coef * (static_cast<acc_t>(row[k]) - z[k]));
    });
  });
  return gpred;
}

using VideoLossSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, int64_t, int64_t, bool, double);
using VideoLossBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, int64_t, int64_t, bool, double);

// pred's gradient by the backward kernel (its own backward refused); the videos are data.
class VideoMaeLossFunction : public torch::autograd::Function<VideoMaeLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& videos,
                            const at::Tensor& mask, const std::optional<at::Tensor>& stats, int64_t p, int64_t ts,
                            bool norm_pix, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<VideoLossSig>("umae::videomae_loss");
    at::Tensor loss = op.call(pred, videos, mask, stats, p, ts, norm_pix, eps);
    ctx->save_for_backward({pred, videos, mask, stats.value_or(at::Tensor())});
    ctx->saved_data["args"] = std::vector<double>{double(p), double(ts), double(norm_pix), eps};  // one entry
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::vector<double> a = ctx->saved_data["args"].toDoubleVector();
    at::Tensor gpred;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = find_op<VideoLossBackwardSig>("umae::videomae_loss_backward");
      gpred = op.call(grads[0], s[0], s[1], s[2], s[3].defined() ? std::optional<at::Tensor>(s[3]) : std::nullopt,
                      int64_t(a[0]), int64_t(a[1]), a[2] != 0, a[3]);
    }
    auto out = first_order_only("videomae_loss", {gpred}, {grads[0], s[0]});
    return {out[0], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor videomae_loss_autograd(const at::Tensor& pred, const at::Tensor& videos, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& stats, int64_t p, int64_t ts, bool norm_pix,
                                  double eps) {
  TORCH_CHECK_VALUE(!records(videos), "videos requires grad, but the fused loss differentiates pred only; detach "
                    "videos or use umae.use_backend('reference')");
  refuse_forward_ad("videomae_loss", pred, videos);
  // the CPU kernel checks its arguments; the GPU's Triton launcher does not (its host time): here, for it
  if (!pred.is_cpu()) (void)video_of(pred, videos, mask, p, ts, norm_pix, stats);
  if (records(pred)) return VideoMaeLossFunction::apply(pred, videos, mask, stats, p, ts, norm_pix, eps);
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = find_op<VideoLossSig>("umae::videomae_loss");
  return op.call(pred, videos, mask, stats, p, ts, norm_pix, eps);
}

}  // namespace

// The op's schemas (its kernels register below, and at the CUDA key from
// umae/ops/videomae_loss_op.py: Triton). Semantics: the reference in that module.
TORCH_LIBRARY_FRAGMENT(umae, m) {
  // VideoMAE's loss, a 0-dim fp32 tensor (fp64 for fp64 pred): videos (B, C, T, H, W) unnormalized
  // (x * std + mean, when stats are given), tubelet patchified, normalized per token and channel with norm_pix;
  // the masked tokens (mask bool (B, N), True = masked, the same count per row) in ascending order
  // against pred (B, masked, ts*p*p*C); the mean squared error. eps is added to the std.
  // stats: (2, C) float32 (mean; std) of the unnormalize, on the videos' device, or None (as given).
  m.def("videomae_loss(Tensor pred, Tensor videos, Tensor mask, Tensor? stats, int p, int ts, bool norm_pix, "
        "float eps) -> Tensor");
  // d(grad * loss) / d(pred), in pred's dtype; grad 0-dim.
  m.def("videomae_loss_backward(Tensor grad, Tensor pred, Tensor videos, Tensor mask, Tensor? stats, int p, "
        "int ts, bool norm_pix, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(umae, Autograd, m) { m.impl("videomae_loss", &videomae_loss_autograd); }

UMAE_AUTOCAST_OFF("videomae_loss", "videomae_loss_backward")

TORCH_LIBRARY_IMPL(umae, CPU, m) {
  m.impl("videomae_loss", &videomae_loss_cpu);
  m.impl("videomae_loss_backward", &videomae_loss_backward_cpu);
}

}  // namespace umae

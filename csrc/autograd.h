// What every op's C++ autograd and autocast kernels share (each op's Function lives beside its CPU
// kernel, in csrc/cpu/<op>.cpp, and serves every device). A call is one dispatcher entry: the Autograd
// kernel records the node and calls the device kernel below autograd; no Python runs between the
// public function and the kernel, nor in the backward.
#pragma once
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace umae {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A kernel op of the umae namespace, found once per call site (keep the result in a static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Whether a call records a node: a forward that does not skips Function::apply (and its bookkeeping).
inline bool records(const at::Tensor& t) { return t.requires_grad() && at::GradMode::is_enabled(); }
inline bool records(const std::optional<at::Tensor>& t) { return t.has_value() && records(*t); }

// Forward-mode AD (dual tensors: torch.func.jvp, torch.autograd.forward_ad) has no rule in the fused
// ops: refused, naming the op, where it gave a zero tangent without a word.
template <typename... Ts>
inline void refuse_forward_ad(const char* op, const Ts&... tensors) {
  TORCH_CHECK(!(torch::autograd::isFwGradDefined(tensors) || ...), "umae::", op,
              ": forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by the fused kernel; "
              "use the reference: umae.use_backend(\"reference\"), backend=\"reference\" or UMAE_BACKEND=reference");
}

inline std::string double_backward_message(const std::string& op) {
  return "umae::" + op +
         ": double backward (a gradient of its gradient, e.g. a gradient penalty through "
         "torch.autograd.grad(..., create_graph=True)) is not supported by the fused kernel; use the reference: "
         "umae.use_backend(\"reference\"), backend=\"reference\" or UMAE_BACKEND=reference";
}

// Copies of a kernel's gradients, made functions of what they depend on (the saved inputs, the
// incoming gradient), whose own backward raises. A gradient computed by a kernel is a constant to
// autograd: without this, a gradient of it (a gradient penalty) would be silently 0 or "not used in
// the graph". Raising at the second backward leaves create_graph=True usable while the first-order
// gradient is only read.
class RefuseDoubleBackward : public torch::autograd::Function<RefuseDoubleBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const std::string& op, at::TensorList grads,
                               at::TensorList /*deps*/) {
    ctx->saved_data["op"] = op;
    variable_list out;
    out.reserve(grads.size());
    for (const at::Tensor& g : grads) out.push_back(g.clone());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, double_backward_message(ctx->saved_data["op"].toStringRef()));
    return {};
  }
};

// `grads` (a backward's results; undefined where none) as they leave the backward: as they are,
// or with create_graph=True (grad mode on in the backward) wrapped by RefuseDoubleBackward.
inline variable_list first_order_only(const std::string& op, variable_list grads, at::TensorList deps) {
  if (!at::GradMode::is_enabled()) return grads;
  std::vector<size_t> live;
  variable_list values, needed;
  for (size_t i = 0; i < grads.size(); ++i)
    if (grads[i].defined()) {
      live.push_back(i);
      values.push_back(grads[i].detach());
    }
  for (const at::Tensor& d : deps)
    if (d.defined() && d.requires_grad()) needed.push_back(d);
  // as TensorLists: Function::apply sees the tensors of these, not of a std::vector
  const variable_list wrapped = RefuseDoubleBackward::apply(op, at::TensorList(values), at::TensorList(needed));
  for (size_t k = 0; k < live.size(); ++k) grads[live[k]] = wrapped[k];
  return grads;
}

// Autocast. The fused kernels compute in their own precision (fp32 accumulation whatever the input
// dtype), so autocast must not re-cast the ATen calls inside them: the default fallthrough leaves it on
// there, and an at::mm inside a kernel then returned bf16 where the kernel read fp32. Every op of the
// namespace registers this at the Autocast keys (UMAE_AUTOCAST_OFF), except where its reference has
// an op autocast changes (uniformity_loss's matmul): that op registers its own cast.
inline void autocast_off(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

inline void register_autocast_off(torch::Library& m, std::initializer_list<const char*> ops) {
  for (const char* op : ops) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_off>());
}

}  // namespace umae

// The ops named (string literals) run with autocast off inside, on CPU and CUDA.
#define UMAE_AUTOCAST_OFF(...)                                                                      \
  TORCH_LIBRARY_IMPL(umae, AutocastCPU, m) { umae::register_autocast_off(m, {__VA_ARGS__}); }       \
  TORCH_LIBRARY_IMPL(umae, AutocastCUDA, m) { umae::register_autocast_off(m, {__VA_ARGS__}); }

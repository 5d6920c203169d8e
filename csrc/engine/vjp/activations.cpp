// Elementwise activations: the state times f'(a), with f' taken at the stored
// forward value (the frozen Jacobian).
#include "engine/vjp/specialised.h"
#include "ops/relax_update.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/Functions.h>

namespace torch_ar::vjp {

namespace gen = torch::autograd::generated;

namespace {
template <class T>
T* as(Node& n) {
  return dynamic_cast<T*>(&n);
}
bool single_input_ready(const variable_list& grads, const EdgeMask& mask, variable_list& out) {
  out.assign(1, at::Tensor());
  return mask_within(mask, {0});
}
} // namespace

bool relu(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = as<gen::ReluBackward0>(n);
  if (!f || !single_input_ready(g, m, out)) return false;
  if (m[0] && g[0].defined())
    out[0] = at::threshold_backward(g[0], f->result_.unpack(n.getptr()), 0);
  return true;
}

bool leaky_relu(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = as<gen::LeakyReluBackward0>(n);
  if (!f || !single_input_ready(g, m, out)) return false;
  if (m[0] && g[0].defined())
    out[0] = at::leaky_relu_backward(g[0], f->self_.unpack(), f->negative_slope, false);
  return true;
}

bool tanh(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = as<gen::TanhBackward0>(n);
  if (!f || !single_input_ready(g, m, out)) return false;
  if (m[0] && g[0].defined()) out[0] = at::tanh_backward(g[0], f->result_.unpack(n.getptr()));
  return true;
}

bool sigmoid(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = as<gen::SigmoidBackward0>(n);
  if (!f || !single_input_ready(g, m, out)) return false;
  if (m[0] && g[0].defined()) out[0] = at::sigmoid_backward(g[0], f->result_.unpack(n.getptr()));
  return true;
}

bool gelu(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = as<gen::GeluBackward0>(n);
  if (!f || !single_input_ready(g, m, out)) return false;
  if (m[0] && g[0].defined()) out[0] = at::gelu_backward(g[0], f->self_.unpack(), f->approximate);
  return true;
}

bool silu(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = as<gen::SiluBackward0>(n);
  if (!f || !single_input_ready(g, m, out)) return false;
  if (m[0] && g[0].defined()) out[0] = at::silu_backward(g[0], f->self_.unpack());
  return true;
}

bool hardtanh(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = as<gen::HardtanhBackward0>(n);
  if (!f || !single_input_ready(g, m, out)) return false;
  if (m[0] && g[0].defined())
    out[0] = at::hardtanh_backward(g[0], f->self_.unpack(), f->min_val, f->max_val);
  return true;
}

bool elu(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = as<gen::EluBackward0>(n);
  if (!f || !single_input_ready(g, m, out)) return false;
  if (m[0] && g[0].defined())
    out[0] = at::elu_backward(g[0], f->alpha, f->scale, f->input_scale, /*is_result=*/false,
                              f->self_.unpack());
  return true;
}

// The derivatives for the fused update: the saved value the formula reads
// (ops/relax_update.h), or f'(a) itself where the formula is not a short one.

bool relu_derivative(Node& n, FusedDerivative& d) {
  auto* f = as<gen::ReluBackward0>(n);
  if (!f) return false;
  d = {kReluResult, f->result_.unpack(n.getptr())};
  return true;
}

bool leaky_relu_derivative(Node& n, FusedDerivative& d) {
  auto* f = as<gen::LeakyReluBackward0>(n);
  if (!f) return false;
  d = {kLeakyReluInput, f->self_.unpack(), f->negative_slope.toDouble()};
  return true;
}

bool tanh_derivative(Node& n, FusedDerivative& d) {
  auto* f = as<gen::TanhBackward0>(n);
  if (!f) return false;
  d = {kTanhResult, f->result_.unpack(n.getptr())};
  return true;
}

bool sigmoid_derivative(Node& n, FusedDerivative& d) {
  auto* f = as<gen::SigmoidBackward0>(n);
  if (!f) return false;
  d = {kSigmoidResult, f->result_.unpack(n.getptr())};
  return true;
}

bool hardtanh_derivative(Node& n, FusedDerivative& d) {
  auto* f = as<gen::HardtanhBackward0>(n);
  if (!f) return false;
  d = {kHardtanhInput, f->self_.unpack(), f->min_val.toDouble(), f->max_val.toDouble()};
  return true;
}

namespace {
// f'(a) as the activation's own VJP of ones: one extra tensor, computed once.
bool scale_by(at::Tensor derivative, FusedDerivative& d) {
  d = {kScale, std::move(derivative)};
  return true;
}
} // namespace

bool gelu_derivative(Node& n, FusedDerivative& d) {
  auto* f = as<gen::GeluBackward0>(n);
  if (!f) return false;
  at::Tensor a = f->self_.unpack();
  return scale_by(at::gelu_backward(at::ones_like(a), a, f->approximate), d);
}

bool silu_derivative(Node& n, FusedDerivative& d) {
  auto* f = as<gen::SiluBackward0>(n);
  if (!f) return false;
  at::Tensor a = f->self_.unpack();
  return scale_by(at::silu_backward(at::ones_like(a), a), d);
}

bool elu_derivative(Node& n, FusedDerivative& d) {
  auto* f = as<gen::EluBackward0>(n);
  if (!f) return false;
  at::Tensor a = f->self_.unpack();
  return scale_by(at::elu_backward(at::ones_like(a), f->alpha, f->scale, f->input_scale, false, a),
                  d);
}

} // namespace torch_ar::vjp

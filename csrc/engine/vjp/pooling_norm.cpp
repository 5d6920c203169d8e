// Pooling and batch normalisation: input-VJPs from the saved forward values.
#include "engine/vjp/specialised.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/Functions.h>

namespace torch_ar::vjp {

namespace gen = torch::autograd::generated;

namespace {
std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
} // namespace

bool max_pool2d(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::MaxPool2DWithIndicesBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(1, at::Tensor());
  if (m[0] && g[0].defined()) {
    out[0] = at::max_pool2d_with_indices_backward(
        g[0], f->self_.unpack(), f->kernel_size, f->stride, f->padding,
        f->dilation, f->ceil_mode, f->result1_.unpack(n.getptr()));
  }
  return true;
}

bool avg_pool2d(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::AvgPool2DBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(1, at::Tensor());
  if (m[0] && g[0].defined()) {
    out[0] = at::avg_pool2d_backward(
        g[0], f->self_.unpack(), f->kernel_size, f->stride, f->padding,
        f->ceil_mode, f->count_include_pad, f->divisor_override);
  }
  return true;
}

bool adaptive_avg_pool2d(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::AdaptiveAvgPool2DBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(1, at::Tensor());
  if (m[0] && g[0].defined())
    out[0] = at::_adaptive_avg_pool2d_backward(g[0], f->self_.unpack());
  return true;
}

bool batch_norm(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::NativeBatchNormBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(3, at::Tensor());
  if (m[0] && g[0].defined()) {
    auto grads = at::native_batch_norm_backward(
        g[0], f->input_.unpack(), maybe(f->weight_.unpack()),
        maybe(f->running_mean_.unpack()), maybe(f->running_var_.unpack()),
        maybe(f->result1_.unpack(n.getptr())), maybe(f->result2_.unpack(n.getptr())),
        f->training, f->eps, {true, false, false});
    out[0] = std::get<0>(grads);
  }
  return true;
}

} // namespace torch_ar::vjp

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
    out[0] = at::max_pool2d_with_indices_backward(g[0], f->self_.unpack(), f->kernel_size,
                                                  f->stride, f->padding, f->dilation, f->ceil_mode,
                                                  f->result1_.unpack(n.getptr()));
  }
  return true;
}

bool avg_pool2d(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::AvgPool2DBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(1, at::Tensor());
  if (m[0] && g[0].defined()) {
    out[0] = at::avg_pool2d_backward(g[0], f->self_.unpack(), f->kernel_size, f->stride, f->padding,
                                     f->ceil_mode, f->count_include_pad, f->divisor_override);
  }
  return true;
}

bool adaptive_avg_pool2d(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::AdaptiveAvgPool2DBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(1, at::Tensor());
  if (m[0] && g[0].defined()) out[0] = at::_adaptive_avg_pool2d_backward(g[0], f->self_.unpack());
  return true;
}

namespace {

// The input-VJP of batch norm from the fields every batch-norm node saves
// (input, weight, running statistics, the saved mean and inverse std), with
// ATen's native backward: on CUDA the saved statistics of cuDNN and MIOpen are
// the same mean and inverse std (their backwards decompose to this one), and
// in evaluation mode autograd itself falls back to it.
bool batch_norm_input_vjp(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out,
                          size_t num_edges, torch::autograd::SavedVariable& input,
                          torch::autograd::SavedVariable& weight,
                          torch::autograd::SavedVariable& running_mean,
                          torch::autograd::SavedVariable& running_var,
                          torch::autograd::SavedVariable& save_mean,
                          torch::autograd::SavedVariable& save_invstd, bool training, double eps) {
  if (!mask_within(m, {0})) return false;
  out.assign(num_edges, at::Tensor());
  if (m[0] && g[0].defined()) {
    auto self = n.getptr();
    auto grads = at::native_batch_norm_backward(
        g[0], input.unpack(), maybe(weight.unpack()), maybe(running_mean.unpack()),
        maybe(running_var.unpack()), maybe(save_mean.unpack(self)), maybe(save_invstd.unpack(self)),
        training, eps, {true, false, false});
    out[0] = std::get<0>(grads);
  }
  return true;
}

} // namespace

bool batch_norm(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::NativeBatchNormBackward0*>(&n);
  return f && batch_norm_input_vjp(n, g, m, out, 3, f->input_, f->weight_, f->running_mean_,
                                   f->running_var_, f->result1_, f->result2_, f->training, f->eps);
}

bool cudnn_batch_norm(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::CudnnBatchNormBackward0*>(&n);
  return f &&
         batch_norm_input_vjp(n, g, m, out, 3, f->input_, f->weight_, f->running_mean_,
                              f->running_var_, f->result1_, f->result2_, f->training, f->epsilon);
}

bool miopen_batch_norm(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::MiopenBatchNormBackward0*>(&n);
  return f &&
         batch_norm_input_vjp(n, g, m, out, 3, f->input_, f->weight_, f->running_mean_,
                              f->running_var_, f->result1_, f->result2_, f->training, f->epsilon);
}

bool batch_norm_legit(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::NativeBatchNormLegitBackward0*>(&n);
  return f && batch_norm_input_vjp(n, g, m, out, 3, f->input_, f->weight_, f->running_mean_,
                                   f->running_var_, f->result1_, f->result2_, f->training, f->eps);
}

bool batch_norm_legit_no_training(Node& n, const variable_list& g, const EdgeMask& m,
                                  variable_list& out) {
  auto* f = dynamic_cast<gen::NativeBatchNormLegitNoTrainingBackward0*>(&n);
  return f && batch_norm_input_vjp(n, g, m, out, 3, f->input_, f->weight_, f->running_mean_,
                                   f->running_var_, f->result1_, f->result2_, false, f->eps);
}

// _batch_norm_with_update / _no_update: their backward passes "update" as
// the training flag (the statistics of the batch, or the running ones).
bool batch_norm_with_update(Node& n, const variable_list& g, const EdgeMask& m,
                            variable_list& out) {
  auto* f = dynamic_cast<gen::BatchNormWithUpdateBackward0*>(&n);
  return f && batch_norm_input_vjp(n, g, m, out, 3, f->input_, f->weight_, f->running_mean_,
                                   f->running_var_, f->result1_, f->result2_, true, f->eps);
}

bool batch_norm_no_update(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::BatchNormNoUpdateBackward0*>(&n);
  return f && batch_norm_input_vjp(n, g, m, out, 3, f->input_, f->weight_, f->running_mean_,
                                   f->running_var_, f->result1_, f->result2_, false, f->eps);
}

} // namespace torch_ar::vjp

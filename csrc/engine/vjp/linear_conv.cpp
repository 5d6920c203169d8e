// Linear and convolution layers: the input-VJP W^T x only; the weight
// gradient is taken once, after relaxation, by the node's own backward.
#include "engine/vjp/specialised.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/Functions.h>

namespace torch_ar::vjp {

namespace gen = torch::autograd::generated;

bool addmm(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::AddmmBackward0*>(&n);
  if (!f || !mask_within(m, {1})) return false;
  out.assign(3, at::Tensor());
  if (m[1] && g[0].defined()) {
    at::Tensor mat2 = f->mat2_.unpack();
    if (!mat2.defined() || mat2.layout() != at::kStrided) return false;
    at::Tensor r = g[0].mm(mat2.t());
    if (!(f->alpha.equal(1))) r = r * f->alpha;
    out[1] = std::move(r);
  }
  return true;
}

bool mm(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::MmBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(2, at::Tensor());
  if (m[0] && g[0].defined()) {
    at::Tensor mat2 = f->mat2_.unpack();
    if (!mat2.defined() || mat2.layout() != at::kStrided) return false;
    out[0] = g[0].mm(mat2.t());
  }
  return true;
}

bool convolution(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::ConvolutionBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(3, at::Tensor());
  if (m[0] && g[0].defined()) {
    at::Tensor input = f->input_.unpack();
    at::Tensor weight = f->weight_.unpack();
    if (!input.defined() || !weight.defined()) return false;
    auto grads = at::convolution_backward_symint(
        g[0], input, weight, f->bias_sym_sizes_opt, f->stride, f->padding, f->dilation,
        f->transposed, f->output_padding, f->groups, {true, false, false});
    out[0] = std::get<0>(grads);
  }
  return true;
}

namespace {

// psi in the dtype of the gradient it meets: under autocast the op read a
// reduced-precision copy of W, and its VJP runs in that dtype.
at::Tensor in_dtype_of(const at::Tensor& psi, const at::Tensor& grad) {
  return psi.scalar_type() == grad.scalar_type() ? psi : psi.to(grad.scalar_type());
}

} // namespace

// psi has the shape of W^T for linear layers ([in, out]): the input-VJP is
// x psi^T, which is x W when psi = W^T.
bool addmm_psi(Node& n, const variable_list& g, const EdgeMask& m, const at::Tensor& psi,
               variable_list& out) {
  auto* f = dynamic_cast<gen::AddmmBackward0*>(&n);
  if (!f || !mask_within(m, {1})) return false;
  out.assign(3, at::Tensor());
  if (m[1] && g[0].defined()) {
    at::Tensor r = g[0].mm(in_dtype_of(psi, g[0]).t());
    if (!(f->alpha.equal(1))) r = r * f->alpha;
    out[1] = std::move(r);
  }
  return true;
}

bool mm_psi(Node& n, const variable_list& g, const EdgeMask& m, const at::Tensor& psi,
            variable_list& out) {
  if (!dynamic_cast<gen::MmBackward0*>(&n) || !mask_within(m, {0})) return false;
  out.assign(2, at::Tensor());
  if (m[0] && g[0].defined()) out[0] = g[0].mm(in_dtype_of(psi, g[0]).t());
  return true;
}

// psi has the conv weight's own layout; the input-VJP is the transposed
// convolution with psi, which is the exact one when psi = W. A psi that
// reads every input channel of a grouped convolution (direct feedback's
// projection of the output error) is applied ungrouped.
bool convolution_psi(Node& n, const variable_list& g, const EdgeMask& m, const at::Tensor& psi,
                     variable_list& out) {
  auto* f = dynamic_cast<gen::ConvolutionBackward0*>(&n);
  if (!f || !mask_within(m, {0})) return false;
  out.assign(3, at::Tensor());
  if (m[0] && g[0].defined()) {
    at::Tensor input = f->input_.unpack();
    const bool ungrouped = f->groups != 1 && !f->transposed && input.dim() == psi.dim() &&
                           psi.size(1) == input.size(1);
    auto grads = at::convolution_backward_symint(
        g[0], input, in_dtype_of(psi, g[0]), f->bias_sym_sizes_opt, f->stride, f->padding,
        f->dilation, f->transposed, f->output_padding, ungrouped ? c10::SymInt(1) : f->groups,
        {true, false, false});
    out[0] = std::get<0>(grads);
  }
  return true;
}

} // namespace torch_ar::vjp

#pragma once
// Specialised input-only VJPs. Each reads the forward values the autograd node
// saved and computes only the gradients that `mask` asks for. It returns false
// when the mask asks for an edge it does not handle (a weight, say); the caller
// then falls back to the node's own backward.

#include <torch/csrc/autograd/function.h>

#include <vector>

namespace torch_ar::vjp {

using torch::autograd::Node;
using torch::autograd::variable_list;
using EdgeMask = std::vector<bool>;

using SpecialisedVjp = bool (*)(Node& node, const variable_list& grads, const EdgeMask& mask,
                                variable_list& out);

// A linear/conv input-VJP with a separate backward weight `psi` in place of
// the forward weight (the variants without weight transport).
using BackwardWeightVjp = bool (*)(Node& node, const variable_list& grads, const EdgeMask& mask,
                                   const at::Tensor& psi, variable_list& out);

// What the fused state update needs to apply an activation's derivative
// itself (ops/relax_update.h): the kind, the saved tensor it reads, and its
// parameters.
struct FusedDerivative {
  int64_t kind = 0;
  at::Tensor input;
  double p0 = 0.0;
  double p1 = 0.0;
};
// False when the node does not have the saved values expected.
using FusedDerivativeFn = bool (*)(Node& node, FusedDerivative& out);

// The index tensors a lookup node saved (lookups.cpp); false when the node
// is not of the expected type.
using IndexTensorsFn = bool (*)(Node& node, std::vector<at::Tensor>& out);
bool embedding_indices(Node&, std::vector<at::Tensor>&);
bool embedding_bag_indices(Node&, std::vector<at::Tensor>&);
bool index_select_indices(Node&, std::vector<at::Tensor>&);
bool index_indices(Node&, std::vector<at::Tensor>&);
bool gather_indices(Node&, std::vector<at::Tensor>&);
bool take_indices(Node&, std::vector<at::Tensor>&);

// activations.cpp
bool relu_derivative(Node&, FusedDerivative&);
bool leaky_relu_derivative(Node&, FusedDerivative&);
bool tanh_derivative(Node&, FusedDerivative&);
bool sigmoid_derivative(Node&, FusedDerivative&);
bool gelu_derivative(Node&, FusedDerivative&);
bool silu_derivative(Node&, FusedDerivative&);
bool hardtanh_derivative(Node&, FusedDerivative&);
bool elu_derivative(Node&, FusedDerivative&);
bool relu(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool leaky_relu(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool tanh(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool sigmoid(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool gelu(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool silu(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool hardtanh(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool elu(Node&, const variable_list&, const EdgeMask&, variable_list&);

// linear_conv.cpp
bool addmm(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool mm(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool convolution(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool addmm_psi(Node&, const variable_list&, const EdgeMask&, const at::Tensor&, variable_list&);
bool mm_psi(Node&, const variable_list&, const EdgeMask&, const at::Tensor&, variable_list&);
bool convolution_psi(Node&, const variable_list&, const EdgeMask&, const at::Tensor&,
                     variable_list&);

// pooling_norm.cpp
bool max_pool2d(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool avg_pool2d(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool adaptive_avg_pool2d(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool batch_norm(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool cudnn_batch_norm(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool miopen_batch_norm(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool batch_norm_legit(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool batch_norm_legit_no_training(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool batch_norm_with_update(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool batch_norm_no_update(Node&, const variable_list&, const EdgeMask&, variable_list&);

// structural.cpp
bool add(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool sub(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool cat(Node&, const variable_list&, const EdgeMask&, variable_list&);
bool view(Node&, const variable_list&, const EdgeMask&, variable_list&);

// True when every edge the mask asks for is one of `allowed`.
inline bool mask_within(const EdgeMask& mask, std::initializer_list<size_t> allowed) {
  for (size_t j = 0; j < mask.size(); ++j) {
    if (!mask[j]) continue;
    bool ok = false;
    for (size_t a : allowed) ok = ok || a == j;
    if (!ok) return false;
  }
  return true;
}

} // namespace torch_ar::vjp

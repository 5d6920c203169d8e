#pragma once
// One node's VJP with a mask over its input edges: the specialised input-only
// VJP when the op table has one and the mask allows it, otherwise the node's
// own backward with the unwanted edges hidden (so it skips, e.g., weight
// gradients during relaxation). Results are reduced to each input's shape and
// dtype, as autograd's engine does between nodes.

#include "engine/op_table.h"

#include <torch/csrc/autograd/function.h>

#include <vector>

namespace torch_ar {

using torch::autograd::variable_list;

// How a variant changes a node's VJP.
struct VjpRule {
  bool drop_activation_derivative = false;     // activations pass the state through
  const at::Tensor* backward_weight = nullptr; // psi for a linear/conv node
};

variable_list node_vjp(torch::autograd::Node& node, const OpInfo* op, variable_list grads,
                       const std::vector<bool>& mask, const VjpRule& rule = {});

} // namespace torch_ar

#include "engine/node_vjp.h"

#include <torch/csrc/autograd/input_metadata.h>

namespace torch_ar {

using torch::autograd::Edge;
using torch::autograd::edge_list;
using torch::autograd::Node;

namespace {

// Calls the node's own backward with the edges outside `mask` made invalid, so
// its generated code (task_should_compute_output) skips those gradients.
variable_list call_generic(Node& node, variable_list grads, const std::vector<bool>& mask) {
  edge_list& edges = node.next_edges();
  bool whole = true;
  for (size_t j = 0; j < edges.size(); ++j)
    if (edges[j].is_valid() && !mask[j]) whole = false;
  if (whole) return node(std::move(grads));

  edge_list saved = edges;
  struct RestoreEdges {
    Node& node;
    edge_list& saved;
    ~RestoreEdges() { node.next_edges() = std::move(saved); }
  } restore{node, saved};
  for (size_t j = 0; j < edges.size(); ++j)
    if (!mask[j]) edges[j] = Edge();
  return node(std::move(grads));
}

// What autograd's engine does to a gradient before handing it to the next
// node: sum broadcast dimensions away and match the input's dtype and device.
at::Tensor conform_to_input(const Node& node, size_t j, at::Tensor grad) {
  const Edge& e = node.next_edge(j);
  const auto& meta = e.function->input_metadata(e.input_nr);
  if (!meta.is_same_shape(grad)) {
    TORCH_CHECK(meta.is_expandable_to_shape(grad), "torch_ar: ", node.name(),
                " produced a gradient of shape ", grad.sizes(), " for its input ", j,
                ", which cannot be reduced to that input's shape ", meta.shape_as_dim_vector());
    grad = meta.reduce_grad(grad);
  }
  const auto dtype = c10::typeMetaToScalarType(meta.options().dtype());
  if (grad.scalar_type() != dtype) grad = grad.to(dtype);
  if (grad.device() != meta.device()) grad = grad.to(meta.device());
  return grad;
}

} // namespace

variable_list node_vjp(Node& node, const OpInfo* op, variable_list grads,
                       const std::vector<bool>& mask, const VjpRule& rule) {
  TORCH_INTERNAL_ASSERT(mask.size() == node.num_outputs());
  variable_list out;
  bool done = false;
  if (rule.drop_activation_derivative && op && op->is_activation) {
    // f' dropped: the state passes through the nonlinearity unchanged.
    out.assign(node.num_outputs(), at::Tensor());
    if (!out.empty() && mask[0]) out[0] = grads[0];
    done = true;
  } else if (rule.backward_weight) {
    TORCH_CHECK(op && op->psi_vjp && op->psi_vjp(node, grads, mask, *rule.backward_weight, out),
                "torch_ar: cannot apply a backward weight to node '", node.name(), "'");
    done = true;
  } else if (op && op->vjp) {
    done = op->vjp(node, grads, mask, out);
  }
  if (!done) out = call_generic(node, std::move(grads), mask);
  TORCH_CHECK(out.size() == node.num_outputs(), "torch_ar: ", node.name(), " returned ", out.size(),
              " gradients, expected ", node.num_outputs());
  for (size_t j = 0; j < out.size(); ++j) {
    if (!mask[j] || !node.next_edge(j).is_valid()) {
      out[j] = at::Tensor();
      continue;
    }
    if (out[j].defined()) out[j] = conform_to_input(node, j, std::move(out[j]));
  }
  return out;
}

} // namespace torch_ar

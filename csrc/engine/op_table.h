#pragma once
// The supported-op table: the one place that says, for each autograd node
// type, whether it starts a layer or joins the layer below it, and whether the
// engine has a specialised input-only VJP for it. Anything not listed is a
// structural op handled by the generic node (the op's own backward).

#include "engine/vjp/specialised.h"

#include <string>
#include <vector>

namespace torch_ar {

enum class OpRole {
  Structural,  // parametrised or structural: starts a layer (linear, conv, add, ...)
  Elementwise, // joins the layer it follows (activations, dropout, scaling)
  View,        // joins the layer it follows (view, reshape, flatten, permute)
  Lookup,      // starts a layer; reads a table by index (embedding, index_select, ...)
};

struct OpInfo {
  const char* node_name; // autograd node name, e.g. "ReluBackward0"
  const char* op;        // what users call it
  OpRole role;
  vjp::SpecialisedVjp vjp = nullptr;        // nullptr: generic node
  bool is_activation = false;               // an elementwise nonlinearity f (for the variants)
  int weight_edge = -1;                     // input edge of the weight (linear/conv), -1: none
  vjp::BackwardWeightVjp psi_vjp = nullptr; // input-VJP with a backward weight
  // The derivative the fused state update applies in place of this node's
  // VJP (elementwise activations at the top of a layer); nullptr: none.
  vjp::FusedDerivativeFn fused_derivative = nullptr;
  // Lookups: the index tensors the node saved. When one of them is data (a
  // module input, or a view of one), the lookup's output is a neuron even if
  // the table it reads is a parameter (token embeddings).
  vjp::IndexTensorsFn index_tensors = nullptr;
};

// True for ops that start a layer of their own (everything but elementwise
// and view ops).
inline bool starts_layer(const OpInfo* op) {
  return !op || op->role == OpRole::Structural || op->role == OpRole::Lookup;
}

// nullptr when the node is not in the table.
const OpInfo* find_op(const std::string& node_name);

// The whole table, for documentation and tests.
const std::vector<OpInfo>& op_table();

// The table as text rows "node|op|role|specialised|activation|backward-weight|fused"
// (behind torch.ops.torch_ar.supported_ops).
std::vector<std::string> supported_op_rows();

} // namespace torch_ar

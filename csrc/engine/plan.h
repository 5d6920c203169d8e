#pragma once
// Plan: turn the captured graph into relaxation states and layers.
//
// A state lives on a layer's output. A layer is a top node (whose outputs are
// states) plus the chain of nodes below it whose outputs are internal: used
// once, by an elementwise or view op (layer granularity, the paper's neurons).
// With op granularity every activation-side node is its own layer.

#include "engine/config.h"
#include "engine/graph.h"
#include "engine/op_table.h"

#include <string>
#include <vector>

namespace torch_ar {

enum class TargetKind { None, Chain, State, Leaf, ParamSide };

struct EdgeTarget {
  TargetKind kind = TargetKind::None;
  int index = -1;        // state, leaf or param-side node index
  uint32_t input_nr = 0; // for ParamSide: which output of that node
};

// What a layer's VJP may be asked to produce, by the kind of edge target.
enum TargetClass : unsigned {
  kToState = 1,     // relaxation states
  kToInputLeaf = 2, // module inputs that want a gradient
  kToParamLeaf = 4, // parameters
  kToParamSide = 8, // parameter-only nodes (e.g. W.t()) on the way to parameters
};

// The passes over a layer and the targets each one fills.
enum class Pass {
  Relax = 0,      // states only: every relaxation step
  Propagate = 1,  // states and inputs: a variant's single sweep
  InputGrad = 2,  // inputs only: a variant's gradients at the equilibrium
  WeightGrad = 3, // parameters only: a variant's weight update
  Gradient = 4,   // inputs and parameters: exact gradients at the equilibrium
  Full = 5,       // everything: the exact single sweep
};
constexpr int kNumPasses = 6;

constexpr unsigned pass_targets(Pass p) {
  switch (p) {
    case Pass::Relax:
      return kToState;
    case Pass::Propagate:
      return kToState | kToInputLeaf;
    case Pass::InputGrad:
      return kToInputLeaf;
    case Pass::WeightGrad:
      return kToParamLeaf | kToParamSide;
    case Pass::Gradient:
      return kToInputLeaf | kToParamLeaf | kToParamSide;
    case Pass::Full:
      return kToState | kToInputLeaf | kToParamLeaf | kToParamSide;
  }
  return 0;
}

struct StateSlot {
  int node = -1;          // producing node (graph index)
  uint32_t output_nr = 0; // which of its outputs
  int layer = -1;         // producing layer
  std::vector<int> consumer_layers;
  at::Tensor ext;       // loss gradient when this is a module output
  bool clamped = false; // no consumers: held at ext, never relaxes
  bool needed = false;  // some wanted gradient depends on it
  int level = 0;        // longest path (in layers) down from an output
  std::string name;
};

struct Layer {
  std::vector<int> chain;                           // top first
  std::vector<const OpInfo*> ops;                   // per chain node
  std::vector<std::vector<EdgeTarget>> targets;     // per chain node, per edge
  std::vector<std::vector<bool>> masks[kNumPasses]; // per chain node, per edge
  bool has_work[kNumPasses] = {};
  // Per chain node of a linear/conv op: the parameter leaves its weight
  // operand is made from (the weight itself, or all parameters of a computed
  // weight), the one leaf when there is one (else -1), whether the op reads
  // it through a transpose (F.linear reads W^T; Hugging Face's Conv1D reads
  // W in addmm(b, x, W)), and the operand's shape.
  std::vector<std::vector<int>> weight_sources;
  std::vector<int> weight_leaf;
  std::vector<char> weight_transposed;
  std::vector<std::vector<int64_t>> weight_operand_shape;
  std::vector<int> out_slots; // per top output, -1: none
  bool needed = false;
  bool constant = false; // all outputs clamped: its relax VJP never changes
  int level = 0;
};

struct Plan {
  const CapturedGraph* graph = nullptr;
  std::vector<StateSlot> slots;
  std::vector<Layer> layers;                               // consumers before producers
  std::vector<int> param_side_nodes;                       // consumers before producers
  std::vector<std::vector<EdgeTarget>> param_side_targets; // per graph node
  std::vector<std::vector<bool>> param_side_masks;         // per graph node
  std::vector<at::Tensor> leaf_direct;                     // outputs that are leaves themselves
  std::vector<std::pair<EdgeTarget, at::Tensor>> param_side_ext;
  // Per module output: whether the plan expects a loss gradient there, and
  // where it enters (a state, a leaf, or a param-side node; None: nowhere).
  std::vector<bool> root_has_grad;
  std::vector<EdgeTarget> loss_entries;
  int depth = 0;
  int num_relaxing = 0;
  // Parameters whose gradient depends on no relaxing state: those of layers
  // whose outputs are all clamped (the output layer), and every parameter
  // when the graph has no relaxing state at all.
  int params_outside_relaxation = 0;
};

// The plan's two halves. The structure (states, layers, masks, depth) is
// known after the forward, given which module outputs will receive a loss
// gradient; the loss gradients themselves arrive with the backward and are
// bound into it (slot ext, leaf_direct, param_side_ext), replacing any bound
// before.
Plan make_plan(const CapturedGraph& graph, const std::vector<bool>& root_has_grad,
               Granularity granularity);
std::vector<bool> roots_with_grad(const std::vector<at::Tensor>& output_grads);
// Whether `output_grads` are defined exactly where the plan expects them.
bool expects_loss_gradients(const Plan& plan, const std::vector<at::Tensor>& output_grads);
void bind_loss_gradients(Plan& plan, const std::vector<at::Tensor>& output_grads);

// Both at once.
Plan make_plan(const CapturedGraph& graph, const std::vector<at::Tensor>& output_grads,
               Granularity granularity);

} // namespace torch_ar

#pragma once
// Capture: read the autograd graph that the wrapped module's forward built.
// Nodes are the autograd Nodes reachable from the outputs; leaves are the
// AccumulateGrad nodes of the module's parameters and of the (detached) inputs.

#include <torch/csrc/autograd/function.h>

#include <memory>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace torch_ar {

using torch::autograd::Edge;
using torch::autograd::Node;
// An owning pointer to an autograd node: std::shared_ptr up to torch 2.14,
// c10::intrusive_ptr after; taken from Edge so both compile.
using NodePtr = std::decay_t<decltype(std::declval<Edge&>().function)>;

enum class LeafKind { Input, Parameter };

struct CapturedGraph {
  // Autograd nodes, consumers before producers (reverse topological order).
  std::vector<NodePtr> nodes;
  std::unordered_map<const Node*, int> node_index;
  // activation[i]: node i depends on a module input (its outputs are neurons):
  // through a floating input, or as a lookup by data indices; otherwise it
  // only transforms parameters (e.g. W.t()).
  std::vector<bool> activation;
  // needed[i]: some leaf that wants a gradient lies below node i.
  std::vector<bool> needed;
  // AccumulateGrad node -> leaf index.
  std::unordered_map<const Node*, int> leaf_of;
  std::vector<LeafKind> leaf_kind;
  std::vector<bool> leaf_needs_grad;
  // One gradient edge per module output; invalid when the output has no
  // differentiable path.
  std::vector<Edge> roots;

  int index_of(const Node* n) const {
    auto it = node_index.find(n);
    return it == node_index.end() ? -1 : it->second;
  }
  int leaf_index(const Node* n) const {
    auto it = leaf_of.find(n);
    return it == leaf_of.end() ? -1 : it->second;
  }
};

// outputs: the module outputs (with grad_fn); leaves: parameters and inputs in
// the order their gradients are returned. data_indices: the module's integer
// inputs (token ids, say); a lookup whose indices are one of them, or a view
// of one, depends on data even when the table it reads is a parameter.
CapturedGraph capture_graph(const std::vector<at::Tensor>& outputs,
                            const std::vector<at::Tensor>& leaves,
                            const std::vector<bool>& leaf_is_input,
                            const std::vector<bool>& leaf_needs_grad,
                            const std::vector<at::Tensor>& data_indices = {});

// For each output: does its graph reach one of `leaves` (as autograd would
// need for the output to be differentiable with respect to them)?
std::vector<bool> outputs_reaching(const std::vector<at::Tensor>& outputs,
                                   const std::vector<at::Tensor>& leaves);

} // namespace torch_ar

#include "engine/graph.h"
#include "engine/errors.h"
#include "engine/op_table.h"

#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

#include <sstream>
#include <string>
#include <unordered_set>

namespace torch_ar {

namespace {

bool is_accumulate_grad(const Node* n) {
  return dynamic_cast<const torch::autograd::AccumulateGrad*>(n) != nullptr;
}

// A lookup node reading by one of the data index tensors (or a view of one).
bool looks_up_data(Node& node, const std::vector<at::Tensor>& data_indices) {
  if (data_indices.empty()) return false;
  const OpInfo* op = find_op(node.name());
  if (!op || !op->index_tensors) return false;
  std::vector<at::Tensor> indices;
  if (!op->index_tensors(node, indices)) return false;
  for (const auto& idx : indices) {
    if (!idx.defined() || !idx.has_storage()) continue;
    for (const auto& d : data_indices)
      if (d.defined() && d.has_storage() && idx.is_alias_of(d)) return true;
  }
  return false;
}

} // namespace

CapturedGraph capture_graph(const std::vector<at::Tensor>& outputs,
                            const std::vector<at::Tensor>& leaves,
                            const std::vector<bool>& leaf_is_input,
                            const std::vector<bool>& leaf_needs_grad,
                            const std::vector<at::Tensor>& data_indices) {
  TORCH_INTERNAL_ASSERT(leaves.size() == leaf_is_input.size());
  TORCH_INTERNAL_ASSERT(leaves.size() == leaf_needs_grad.size());
  CapturedGraph g;
  g.leaf_kind.resize(leaves.size());
  g.leaf_needs_grad = leaf_needs_grad;
  for (size_t i = 0; i < leaves.size(); ++i) {
    g.leaf_kind[i] = leaf_is_input[i] ? LeafKind::Input : LeafKind::Parameter;
    // A frozen weight with a psi required grad only during the forward (its
    // accumulator lives on in the graph), so requires_grad is not asked here.
    if (!leaves[i].defined()) continue;
    auto acc = torch::autograd::impl::try_get_grad_accumulator(leaves[i]);
    if (acc) g.leaf_of[acc.get()] = static_cast<int>(i);
  }

  for (const auto& out : outputs) {
    if (out.defined() && out.requires_grad()) {
      g.roots.push_back(torch::autograd::impl::gradient_edge(out));
    } else {
      g.roots.emplace_back();
    }
  }

  // Iterative post-order DFS: producers are emitted before their consumers.
  std::vector<NodePtr> post_order;
  std::unordered_set<const Node*> visited;
  std::vector<std::pair<NodePtr, size_t>> stack;
  auto push = [&](const NodePtr& n) {
    if (!n || visited.count(n.get())) return;
    visited.insert(n.get());
    stack.emplace_back(n, 0);
  };
  for (const auto& root : g.roots) {
    if (!root.is_valid()) continue;
    push(root.function);
    while (!stack.empty()) {
      auto& [node, next] = stack.back();
      if (next < node->num_outputs()) {
        const Edge& e = node->next_edge(next++);
        if (e.is_valid()) push(e.function);
        continue;
      }
      post_order.push_back(node);
      stack.pop_back();
    }
  }

  // Leaves (AccumulateGrad) are not engine nodes; everything else is.
  for (auto it = post_order.rbegin(); it != post_order.rend(); ++it) {
    const auto& n = *it;
    if (is_accumulate_grad(n.get())) {
      if (!g.leaf_of.count(n.get())) {
        const auto& v = static_cast<const torch::autograd::AccumulateGrad*>(n.get())->variable;
        std::ostringstream msg;
        msg << "torch_ar: the wrapped module's forward used a tensor that requires grad but "
               "is neither one of its parameters nor one of its inputs (";
        if (v.defined()) msg << v.scalar_type() << " " << v.sizes() << " on " << v.device();
        msg << "; for example a parameter of another module, or a tensor captured from "
               "outside). Register it as a parameter or pass it as an input.";
        throw UnsupportedGraph(msg.str(), n->name());
      }
      continue;
    }
    const std::string name = n->name();
    if (name.find("CompiledFunction") != std::string::npos)
      throw UnsupportedGraph("torch_ar: the forward graph contains '" + name +
                                 "', an opaque region produced by torch.compile. Activation "
                                 "relaxation needs the individual ops; wrap the uncompiled "
                                 "module instead.",
                             name);
    g.node_index[n.get()] = static_cast<int>(g.nodes.size());
    g.nodes.push_back(n);
  }

  // Classify in producer-first order (reverse of g.nodes).
  const int N = static_cast<int>(g.nodes.size());
  g.activation.assign(N, false);
  g.needed.assign(N, false);
  for (int i = N - 1; i >= 0; --i) {
    for (const Edge& e : g.nodes[i]->next_edges()) {
      if (!e.is_valid()) continue;
      int leaf = g.leaf_index(e.function.get());
      if (leaf >= 0) {
        if (g.leaf_kind[leaf] == LeafKind::Input) g.activation[i] = true;
        if (g.leaf_needs_grad[leaf]) g.needed[i] = true;
        continue;
      }
      int j = g.index_of(e.function.get());
      TORCH_INTERNAL_ASSERT(j > i, "capture order broken");
      if (g.activation[j]) g.activation[i] = true;
      if (g.needed[j]) g.needed[i] = true;
    }
    if (!g.activation[i] && looks_up_data(*g.nodes[i], data_indices)) g.activation[i] = true;
  }
  return g;
}

std::vector<bool> outputs_reaching(const std::vector<at::Tensor>& outputs,
                                   const std::vector<at::Tensor>& leaves) {
  std::unordered_set<const Node*> targets;
  for (const auto& leaf : leaves) {
    if (!leaf.defined() || !leaf.requires_grad()) continue;
    auto acc = torch::autograd::impl::try_get_grad_accumulator(leaf);
    if (acc) targets.insert(acc.get());
  }
  // reaches[n]: memo over the shared graph, filled by an iterative DFS.
  std::unordered_map<const Node*, bool> reaches;
  auto solve = [&](const NodePtr& root) -> bool {
    if (!root) return false;
    std::vector<std::pair<Node*, size_t>> stack{{root.get(), 0}};
    reaches.emplace(root.get(), targets.count(root.get()) > 0);
    while (!stack.empty()) {
      auto& [node, next] = stack.back();
      if (next < node->num_outputs()) {
        const Edge& e = node->next_edge(next++);
        if (!e.is_valid()) continue;
        Node* child = e.function.get();
        auto it = reaches.find(child);
        if (it == reaches.end()) {
          reaches.emplace(child, targets.count(child) > 0);
          stack.emplace_back(child, 0);
        } else if (it->second) {
          reaches[node] = true;
        }
        continue;
      }
      const bool r = reaches[node];
      stack.pop_back();
      if (r && !stack.empty()) reaches[stack.back().first] = true;
    }
    return reaches[root.get()];
  };
  std::vector<bool> result;
  for (const auto& out : outputs) {
    bool r = false;
    if (out.defined() && out.requires_grad())
      r = solve(torch::autograd::impl::gradient_edge(out).function);
    result.push_back(r);
  }
  return result;
}

} // namespace torch_ar

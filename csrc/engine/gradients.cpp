// Gradients from the equilibrium: each layer's full VJP (weights and inputs)
// once, then the parameter-only part of the graph (e.g. W.t(), weight norm)
// by ordinary reverse accumulation.
#include "engine/errors.h"
#include "engine/executor.h"
#include "engine/node_vjp.h"

#include <ATen/ATen.h>

#include <cmath>

namespace torch_ar {

void Executor::contribute_leaf(int leaf, const at::Tensor& grad) {
  at::Tensor& acc = leaf_grad_[leaf];
  acc = acc.defined() ? acc + grad : grad;
}

void Executor::contribute_param_side(const EdgeTarget& t, const at::Tensor& grad) {
  auto& buf = param_side_buf_[t.index];
  if (buf.empty()) buf.resize(graph_.nodes[t.index]->num_inputs());
  at::Tensor& acc = buf[t.input_nr];
  acc = acc.defined() ? acc + grad : grad;
}

void Executor::reset_gradients() {
  for (auto& g : leaf_grad_) g = at::Tensor();
  for (auto& b : param_side_buf_) b.clear();
  for (const auto& [t, grad] : plan_.param_side_ext) contribute_param_side(t, grad);
}

void Executor::propagate_param_side() {
  for (int n : plan_.param_side_nodes) {
    auto& buf = param_side_buf_[n];
    if (buf.empty()) continue;
    const auto& mask = plan_.param_side_masks[n];
    bool want = false;
    for (bool m : mask) want = want || m;
    variable_list grads = std::move(buf);
    buf.clear();
    if (!want) continue;
    auto& node = *graph_.nodes[n];
    variable_list out = node_vjp(node, nullptr, std::move(grads), mask);
    const auto& targets = plan_.param_side_targets[n];
    for (size_t j = 0; j < out.size(); ++j) {
      if (!mask[j] || !out[j].defined()) continue;
      if (targets[j].kind == TargetKind::Leaf)
        contribute_leaf(targets[j].index, out[j]);
      else if (targets[j].kind == TargetKind::ParamSide)
        contribute_param_side(targets[j], out[j]);
    }
  }
}

std::vector<at::Tensor> Executor::finish_leaf_gradients() {
  // Outputs that are leaves themselves pass their loss gradient straight on.
  std::vector<at::Tensor> result(leaf_grad_.size());
  for (size_t l = 0; l < result.size(); ++l) {
    const at::Tensor& direct = plan_.leaf_direct[l];
    if (direct.defined()) contribute_leaf(static_cast<int>(l), direct);
    if (graph_.leaf_needs_grad[l]) result[l] = leaf_grad_[l];
  }
  return result;
}

std::vector<at::Tensor> Executor::leaf_gradients() {
  reset_gradients();
  for (int L = 0; L < static_cast<int>(plan_.layers.size()); ++L) {
    if (config_.exact_rule()) {
      run_layer(L, Pass::Gradient);
    } else {
      // A variant propagates with its own VJPs but updates weights from the
      // states (and, by default, f').
      run_layer(L, Pass::InputGrad);
      run_layer(L, Pass::WeightGrad);
    }
  }
  propagate_param_side();
  return finish_leaf_gradients();
}

std::vector<at::Tensor> Executor::exact_sweep(bool release_saved) {
  persistent_targets_ = false;
  reset_gradients();
  begin_step();
  for (size_t s = 0; s < plan_.slots.size(); ++s)
    if (plan_.slots[s].clamped) x_[s] = plan_.slots[s].ext;
  // One finiteness flag per state, read back once at the end: a NaN is
  // reported as the literal steps would report it (node and step).
  std::vector<at::Tensor> finite;
  std::vector<int> finite_slot;
  for (int L = 0; L < static_cast<int>(plan_.layers.size()); ++L) {
    const Layer& layer = plan_.layers[L];
    // Consumers come first, so every state of this layer is final now.
    for (int s : layer.out_slots) {
      if (s < 0 || plan_.slots[s].clamped) continue;
      x_[s] = fresh_[s] ? target_[s] : plan_.slots[s].ext;
      target_[s] = at::Tensor();
      if (x_[s].defined() && plan_.slots[s].needed) {
        // One reduction per state, read back together at the end: a sum
        // carries any NaN/Inf. (It overflows only for states near the dtype's
        // largest value, which is divergence for any purpose.)
        finite.push_back(x_[s].sum().to(at::kDouble));
        finite_slot.push_back(s);
      }
    }
    if (config_.exact_rule()) {
      run_layer(L, Pass::Full);
    } else {
      run_layer(L, Pass::Propagate);
      run_layer(L, Pass::WeightGrad);
    }
    // Free states and saved values as soon as they are used, as autograd
    // frees its buffers.
    for (int s : layer.out_slots)
      if (s >= 0) x_[s] = at::Tensor();
    if (release_saved)
      for (int n : layer.chain) graph_.nodes[n]->release_variables();
  }
  if (!finite.empty()) {
    at::Tensor sums = at::stack(finite).to(at::kCPU);
    auto acc = sums.accessor<double, 1>();
    int worst = -1;
    for (int64_t i = 0; i < sums.size(0); ++i) {
      if (std::isfinite(acc[i])) continue;
      int s = finite_slot[i];
      if (worst < 0 || plan_.slots[s].level < plan_.slots[worst].level) worst = s;
    }
    sweep_nonfinite_ = worst >= 0;
    if (worst >= 0 && config_.raise_on_nonfinite) {
      const StateSlot& slot = plan_.slots[worst];
      throw RelaxationDiverged(
          "torch_ar: relaxation diverged at step " + std::to_string(slot.level) +
              ": the state of node '" + slot.name +
              "' became NaN or infinite (eta=1, exact sweep). Check the inputs, the loss and "
              "custom backward functions for NaN/Inf.",
          slot.name, slot.level);
    }
  }
  propagate_param_side();
  return finish_leaf_gradients();
}

} // namespace torch_ar

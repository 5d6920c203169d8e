#pragma once
// Relaxation: the engine object of one forward. Built from the settings
// before the forward runs; at the end of the forward it captures and plans the
// graph once and keeps only the forward values the relaxation will start
// from; the backward binds the loss gradients into that plan (re-planning only
// when the backward asks for other gradients than the forward assumed),
// chooses the evaluation, runs it, and leaves named stats.

#include "engine/config.h"
#include "engine/graph.h"
#include "engine/plan.h"
#include "engine/relax_stats.h"

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

namespace torch_ar {

class Relaxation {
 public:
  explicit Relaxation(EngineConfig config);

  // After the forward. outputs: the module's outputs that require grad;
  // leaves: parameters and inputs, in the order backward returns their
  // gradients; leaf_needs_grad: which of them the backward is expected to
  // want. Returns, per output, whether it is differentiable (reaches a wanted
  // leaf); the graph behind those is captured and planned for a loss gradient
  // at each. forward_values: tensors recorded during the forward, of which
  // those that start a relaxing state are kept (init="forward", literal
  // steps; see EngineConfig::needs_forward_values).
  std::vector<bool> capture(const std::vector<at::Tensor>& outputs, std::vector<at::Tensor> leaves,
                            std::vector<bool> leaf_is_input, std::vector<bool> leaf_needs_grad,
                            const std::vector<at::Tensor>& forward_values,
                            std::vector<at::Tensor> data_indices);

  // The relaxation. output_grads: one per differentiable output (undefined:
  // not in the loss); leaf_needs_grad: which leaves want a gradient;
  // backward_weights: empty, or per leaf the psi of a linear/conv weight.
  // keep_graph: keep the saved forward values (and this object's graph) for
  // another backward; otherwise everything is released when it returns.
  // Returns per leaf its gradient (undefined: none).
  std::vector<at::Tensor> backward(std::vector<at::Tensor> output_grads,
                                   const std::vector<bool>& leaf_needs_grad,
                                   const std::vector<at::Tensor>& backward_weights, bool keep_graph,
                                   std::vector<std::string> leaf_names = {});

  const EngineConfig& config() const { return config_; }
  const RelaxStats& stats() const { return stats_; }
  // The captured graph and saved values were let go (after a backward that
  // did not keep the graph, or release()).
  bool released() const { return released_; }
  void release();

 private:
  void plan_for(const std::vector<at::Tensor>& output_grads,
                const std::vector<bool>& leaf_needs_grad);
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& backward_weights,
                              const std::vector<at::Tensor>& output_grads);
  // Raises RelaxationDiverged when a loss gradient is NaN/Inf (one read).
  void check_loss_gradients(const std::vector<at::Tensor>& output_grads) const;
  // Per leaf, the name errors call it by (the module path of a parameter).
  std::vector<std::string> leaf_names_;

  EngineConfig config_;
  std::vector<at::Tensor> outputs_; // the differentiable outputs
  std::vector<at::Tensor> leaves_;
  std::vector<bool> leaf_is_input_;
  std::vector<bool> planned_needs_;
  std::vector<at::Tensor> data_indices_;
  std::unique_ptr<CapturedGraph> graph_;
  std::unique_ptr<Plan> plan_; // points into graph_
  std::vector<at::Tensor> forward_values_;
  RelaxStats stats_;
  bool released_ = false;
};

} // namespace torch_ar

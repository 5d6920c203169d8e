#include "engine/engine.h"
#include "engine/relaxation.h"

#include <algorithm>
#include <utility>

namespace torch_ar {

bool exact_by_depth(const EngineConfig& c, int64_t steps, int64_t depth) {
  return c.eta == 1.0 && (c.schedule == Schedule::Sweep ? steps >= 1 : steps >= depth);
}

bool can_take_exact_sweep(const EngineConfig& c, int64_t depth) {
  if (c.eta != 1.0 || c.trace || c.trace_cosine || c.tol > 0) return false;
  return c.steps < 0 || exact_by_depth(c, c.steps, depth);
}

bool converged_without_tol(const EngineConfig& c, int64_t steps, int64_t depth, bool nonfinite,
                           double max_residual) {
  return !nonfinite && (exact_by_depth(c, steps, depth) || max_residual <= 1e-6);
}

std::vector<double> relative_residuals(const std::vector<std::pair<double, double>>& norms) {
  double scale = 0.0;
  for (const auto& n : norms) scale = std::max(scale, n.second); // NaN skipped
  const double floor = std::max(scale * 1e-6, 1e-300);
  std::vector<double> r(norms.size());
  for (size_t i = 0; i < norms.size(); ++i)
    r[i] = norms[i].first / std::max(norms[i].second, floor);
  return r;
}

double max_residual(const std::vector<double>& residuals) {
  double worst = 0.0;
  for (double r : residuals) worst = std::max(worst, r); // NaN skipped
  return worst;
}

Evaluation choose_evaluation(const EngineConfig& c, int64_t depth) {
  if (c.evaluation == Evaluation::Literal) return Evaluation::Literal;
  // The exact sweep is the closed form's special case (eta 1, T >= D).
  if (c.evaluation != Evaluation::ExactSweep && can_take_exact_sweep(c, depth))
    return Evaluation::ExactSweep;
  if (c.evaluation == Evaluation::ExactSweep) {
    TORCH_CHECK(can_take_exact_sweep(c, depth),
                "torch_ar: the exact sweep needs eta=1, no trace or tol, and at least D steps");
    return Evaluation::ExactSweep;
  }
  const bool closed_form_gives_it =
      c.steps >= 1 && !c.trace && !c.trace_cosine && c.tol <= 0 && !c.cuda_graph;
  TORCH_CHECK(closed_form_gives_it || c.evaluation != Evaluation::ClosedForm,
              "torch_ar: evaluation='closed_form' needs explicit steps and no trace, trace_cosine, "
              "tol or cuda_graph (those need the literal steps)");
  return closed_form_gives_it ? Evaluation::ClosedForm : Evaluation::Literal;
}

EngineResult run_engine(EngineInputs in, const EngineConfig& config) {
  Relaxation relaxation(config);
  const std::vector<bool> differentiable =
      relaxation.capture(in.outputs, in.leaves, in.leaf_is_input, in.leaf_needs_grad,
                         in.forward_values, in.data_indices);
  in.forward_values.clear();
  EngineResult result;
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < differentiable.size(); ++i)
    if (differentiable[i]) grads.push_back(in.output_grads[i]);
  if (grads.empty()) {
    result.leaf_grads.resize(in.leaves.size());
    return result;
  }
  result.leaf_grads = relaxation.backward(std::move(grads), in.leaf_needs_grad, in.backward_weights,
                                          config.keep_graph);
  result.stats = relaxation.stats();
  return result;
}

} // namespace torch_ar

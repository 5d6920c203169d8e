#pragma once
// What one relaxation reports: steps, convergence, residuals, traces.

#include "engine/config.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace torch_ar {

struct RelaxStats {
  int64_t steps = 0;
  int64_t depth = 0;
  bool converged = false;
  bool exact_shortcut = false;
  bool nonfinite = false; // a state became NaN/Inf (and was let through)
  double max_residual = 0.0;
  int64_t graph_steps = 0;                     // steps replayed from a recorded (CUDA) graph
  int64_t fused_activations = 0;               // states whose f' the update kernel applied
  Evaluation evaluation = Evaluation::Literal; // how the states were computed
  int64_t sweeps = 0;                          // passes over the layers that applied J
  int64_t relaxing_states = 0;                 // states that relax (not clamped to the loss)
  int64_t params_outside_relaxation = 0;       // see Plan
  at::Tensor residuals;                        // [num_states] float64, final relative residual
  at::Tensor residual_trace;                   // [steps, num_states] float64 (trace)
  at::Tensor cosine_trace;                     // [steps, num_leaves] float64 (trace_cosine)
  std::vector<std::string> state_names;
};

} // namespace torch_ar

#pragma once
// The engine's C++ entry point: capture -> plan -> relax -> gradients.

#include "engine/config.h"
#include "engine/executor.h"

#include <ATen/ATen.h>

#include <vector>

namespace torch_ar {

struct EngineInputs {
  std::vector<at::Tensor> outputs;      // module outputs (inner graph)
  std::vector<at::Tensor> output_grads; // dL/d output; undefined: not in the loss
  std::vector<at::Tensor> leaves;       // parameters and inputs, in return order
  std::vector<bool> leaf_is_input;
  std::vector<bool> leaf_needs_grad;
  std::vector<at::Tensor> forward_values;   // recorded forward tensors (init="forward")
  std::vector<at::Tensor> backward_weights; // per leaf: psi of a linear/conv weight
  std::vector<at::Tensor> data_indices;     // integer module inputs (token ids, ...)
};

struct EngineResult {
  std::vector<at::Tensor> leaf_grads; // undefined where no gradient
  RelaxStats stats;
};

// Runs on a private thread when an outer autograd graph task is current, so
// that task's exec_info cannot hide inner nodes' gradients. Takes the inputs
// by value: the forward values are dropped one by one as the relaxation
// finishes with them (move them in to let them go).
EngineResult run_engine(EngineInputs inputs, const EngineConfig& config);

// Which of `values` (tensors recorded during forward) are relaxing states of
// the graph behind `outputs`: only those need keeping for init="forward".
std::vector<bool> relaxing_state_values(const std::vector<at::Tensor>& outputs,
                                        const std::vector<at::Tensor>& leaves,
                                        const std::vector<bool>& leaf_is_input,
                                        const std::vector<at::Tensor>& values,
                                        Granularity granularity,
                                        const std::vector<at::Tensor>& data_indices = {});

// True when `steps` steps reach the fixed point by construction: eta 1 and
// one Gauss-Seidel sweep, or D Jacobi steps (the Jacobi map is nilpotent).
bool exact_by_depth(const EngineConfig& config, int64_t steps, int64_t depth);

// True when eta, steps, tol and tracing allow the single exact sweep.
bool can_take_exact_sweep(const EngineConfig& config, int64_t depth);

// "converged" of a relaxation without a tolerance: finite, and exact by depth
// or its residual at most 1e-6 relative (the literal steps' last update, the
// closed form's returned states).
bool converged_without_tol(const EngineConfig& config, int64_t steps, int64_t depth, bool nonfinite,
                           double max_residual);

// Which evaluation runs: the exact sweep where it is exact, the closed form
// where it gives the literal steps' outcome (explicit steps; no trace, tol
// or CUDA graph), else the literal steps. config.evaluation forces one.
Evaluation choose_evaluation(const EngineConfig& config, int64_t depth);

} // namespace torch_ar

#pragma once
// The engine's rules and its one-call entry point: capture -> plan -> relax ->
// gradients (see engine/relaxation.h for the object that ARBackward holds).

#include "engine/config.h"
#include "engine/relax_stats.h"

#include <ATen/ATen.h>

#include <utility>
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

// One relaxation from start to end: a Relaxation captured from `inputs` and
// run backward at once (the tests' and tools' entry; ARBackward's forward and
// backward call the two halves at their own times). The forward values are
// dropped one by one as the relaxation finishes with them (move them in).
EngineResult run_engine(EngineInputs inputs, const EngineConfig& config);

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

// Per state, |update| / |target| from (|target - x|, |target|): the relative
// residual of the literal steps' last update and of the closed form's x_T.
// The target norm is floored at 1e-6 of the largest one, so a state whose
// equilibrium is exactly zero still gets a finite residual. A NaN norm
// (unknown) gives NaN, which max_residual then skips.
std::vector<double> relative_residuals(const std::vector<std::pair<double, double>>& norms);
// The largest of them, NaN skipped.
double max_residual(const std::vector<double>& residuals);

// Which evaluation runs: the exact sweep where it is exact, the closed form
// where it gives the literal steps' outcome (explicit steps; no trace, tol
// or CUDA graph), else the literal steps. config.evaluation forces one.
Evaluation choose_evaluation(const EngineConfig& config, int64_t depth);

} // namespace torch_ar

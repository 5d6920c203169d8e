#pragma once
// Settings of one relaxation run. The Python front (torch_ar/config.py) owns
// the defaults and validation; this struct only carries already-checked values.

#include <cstdint>
#include <string>

namespace torch_ar {

enum class InitMode { Forward, Zero };
enum class Schedule { Jacobi, Sweep };
// Layer: a structural op and the elementwise/view ops after it (the paper's
// neurons). Block: a parametrised op (linear, conv, lookup) and everything
// after it up to the next parametrised op or branch point (norms, pools,
// activations, views, a residual add). Op: one state per op.
enum class Granularity { Layer, Block, Op };
// How the relaxation is evaluated. Auto: the exact sweep where it is exact
// (eta 1, enough steps), the closed form of the literal steps where it gives
// their outcome (explicit steps, no trace, tol or CUDA graph), else the
// literal steps.
enum class Evaluation { Auto, ExactSweep, ClosedForm, Literal };

struct EngineConfig {
  double eta = 1.0;
  int64_t steps = -1;        // -1: not given
  double tol = -1.0;         // -1: not given
  int64_t max_steps = 10000; // cap when only tol is given
  InitMode init = InitMode::Forward;
  Schedule schedule = Schedule::Jacobi;
  Granularity granularity = Granularity::Layer;
  bool trace = false;        // record per-step residuals (forces literal steps)
  bool trace_cosine = false; // record per-step cosine of leaf gradients to the exact ones
  bool keep_graph = false;   // keep saved forward values for another backward
  int64_t check_every = 1;   // read residuals back every k steps (tol, divergence)
  // Variant mechanics (which variant means what lives in torch_ar/variants.py).
  bool use_backward_weights = false;       // linear/conv input-VJPs use psi, not W
  bool drop_activation_derivative = false; // activations pass states through
  bool weight_update_derivative = true;    // keep f' in the weight gradient anyway
  // NaN/Inf states: raise (naming node and step), or let them through to the
  // gradients as autograd would (so a GradScaler can skip the step).
  bool raise_on_nonfinite = true;
  // Speed, not results: apply activation derivatives in the state update
  // kernel; record one step as a CUDA graph and replay it (CUDA tensors).
  bool fuse_activations = true;
  bool cuda_graph = false;
  Evaluation evaluation = Evaluation::Auto;

  bool exact_rule() const { return !use_backward_weights && !drop_activation_derivative; }
};

InitMode parse_init(const std::string& name);
Schedule parse_schedule(const std::string& name);
Granularity parse_granularity(const std::string& name);
Evaluation parse_evaluation(const std::string& name);

} // namespace torch_ar

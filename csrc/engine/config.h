#pragma once
// Settings of one relaxation run. The Python front (torch_ar/config.py) owns
// the user-facing defaults and validation; this struct carries checked values.

#include <cstdint>
#include <string>
#include <vector>

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

// The relaxation options, written once: each row is (name, C++ type,
// default). The struct below is made from it, and so is the by-name reader
// that the Python binding fills it with (torch_ar.RelaxConfig's fields of the
// same names, the variant's mechanics, and the forward's nonfinite rule).
// Absent Python values (steps=None, tol=None) read as -1: "not given".
#define TORCH_AR_ENGINE_OPTIONS(X)                                                       \
  X(eta, double, 1.0)                                                                    \
  X(steps, int64_t, -1)        /* -1: D steps at eta 1, or until tol */                  \
  X(tol, double, -1.0)         /* -1: no tolerance */                                    \
  X(max_steps, int64_t, 10000) /* cap when only tol is given */                          \
  X(init, InitMode, InitMode::Forward)                                                   \
  X(schedule, Schedule, Schedule::Jacobi)                                                \
  X(granularity, Granularity, Granularity::Block)                                        \
  X(trace, bool, false)        /* record per-step residuals (forces literal steps) */    \
  X(trace_cosine, bool, false) /* per-step cosine of leaf gradients to the exact ones */ \
  X(check_every, int64_t, 1)   /* read residuals back every k steps (tol, divergence) */ \
  /* Variant mechanics (which variant means what lives in torch_ar/variants.py). */      \
  X(use_backward_weights, bool, false)       /* linear/conv input-VJPs use psi, not W */ \
  X(drop_activation_derivative, bool, false) /* activations pass states through */       \
  X(weight_update_derivative, bool, true)    /* keep f' in the weight gradient anyway */ \
  /* DFA: a linear/conv op's input-VJP reads psi and the output error, not the */        \
  /* state above it (engine/direct_feedback.h); with use_backward_weights. */            \
  X(direct_feedback, bool, false)                                                        \
  /* NaN/Inf states: raise (naming node and step), or let them through to the */         \
  /* gradients as autograd would (so a GradScaler can skip the step). */                 \
  X(raise_on_nonfinite, bool, true)                                                      \
  /* Speed, not results: apply activation derivatives in the state update kernel; */     \
  /* record one step as a CUDA graph and replay it (CUDA tensors). */                    \
  X(fuse_activations, bool, true)                                                        \
  X(cuda_graph, bool, false)                                                             \
  X(evaluation, Evaluation, Evaluation::Auto)

struct EngineConfig {
#define TORCH_AR_DECLARE_OPTION(name, type, default_value) type name = default_value;
  TORCH_AR_ENGINE_OPTIONS(TORCH_AR_DECLARE_OPTION)
#undef TORCH_AR_DECLARE_OPTION
  // Not an option: what the running backward asked for (retain_graph).
  bool keep_graph = false;

  bool exact_rule() const { return !use_backward_weights && !drop_activation_derivative; }
  // Questions the wrapper asks before its forward (the rule lives here, once):
  // whether the relaxation may evaluate a layer's VJP more than once (all but
  // the exact sweep of the exact rule at eta 1 without steps, tol or trace),
  // and whether the forward values matter (literal steps from them).
  bool may_evaluate_layers_repeatedly() const;
  bool needs_forward_values() const;
  // Whether these settings ask for relaxation at all (a graph without a
  // relaxing state then warns): all but the exact rule at eta 1 without
  // steps or tol.
  bool asks_for_relaxation() const;
};

// The option names of TORCH_AR_ENGINE_OPTIONS, in order.
const std::vector<std::string>& engine_option_names();

InitMode parse_init(const std::string& name);
Schedule parse_schedule(const std::string& name);
Granularity parse_granularity(const std::string& name);
Evaluation parse_evaluation(const std::string& name);

} // namespace torch_ar

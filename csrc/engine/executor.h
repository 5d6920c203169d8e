#pragma once
// The relaxation state of one backward call and the operations on it. The
// loop (relax.cpp) moves the states; gradients.cpp turns the equilibrium into
// parameter and input gradients.

#include "engine/config.h"
#include "engine/node_vjp.h"
#include "engine/plan.h"

#include <string>
#include <vector>

namespace torch_ar {

using torch::autograd::variable_list;

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

class Executor {
 public:
  // backward_weights: per leaf, the psi of a linear/conv weight (or undefined).
  Executor(const Plan& plan, const EngineConfig& config,
           const std::vector<at::Tensor>& backward_weights = {});

  // Initial states: forward values (where recorded) or zeros; outputs clamped.
  void init_states(const std::vector<at::Tensor>& forward_values);

  // The paper's relaxation; returns per-state relative residuals per step.
  RelaxStats relax(const std::vector<at::Tensor>& reference_grads);

  // Each layer once, consumers first, as soon as its states are final: the
  // fixed point of eta = 1 without simulating the D steps. Fills leaf grads.
  // release_saved: free each layer's saved forward values once it has run,
  // as autograd does (the graph cannot be used again).
  std::vector<at::Tensor> exact_sweep(bool release_saved = false);
  // After exact_sweep: a state was NaN/Inf (and the config let it through).
  bool sweep_nonfinite() const { return sweep_nonfinite_; }

  // Parameter and input gradients from the current states.
  std::vector<at::Tensor> leaf_gradients();

  // The outcome of config.steps literal steps without taking them
  // (engine/closed_form.cpp): Horner's rule over the powers of J, one
  // input-VJP sweep per power, then the gradients at x_T; each layer's
  // saved values are freed once it has run when release_saved. Fills the
  // stats (residuals of x_T, sweeps) and returns the leaf gradients.
  // forward_values (per state) are dropped as soon as each state is final.
  std::vector<at::Tensor> closed_form(std::vector<at::Tensor> forward_values, bool release_saved,
                                      RelaxStats& stats);

 private:
  // Runs layer L's VJP from the current states of its outputs; routes the
  // results to input states, leaves and param-side nodes.
  void run_layer(int L, Pass pass);
  // Runs layer L's VJP chain on `grads` (one per top output), from the
  // fused activation's place when `fused` >= 0, and routes the results.
  // record_constant: remember the state contributions (constant layers).
  void propagate(int L, Pass pass, variable_list grads, int fused = -1,
                 bool record_constant = false);
  // The chain from node `first` on, whose VJP result `out` is already known.
  void propagate_from(int L, Pass pass, size_t first, variable_list out,
                      bool record_constant = false);
  // Closed form: the grads of layer L from x_ (relaxing outputs) and the
  // loss gradients (clamped outputs), each as the VJP expects it.
  variable_list layer_grads(int L, bool relaxing, bool clamped) const;
  // Closed form: layer L's VJP in one pass over states that die with it, so
  // an activation at the top of the layer applies f' in place in the state's
  // buffer (no allocation of its own).
  void propagate_consuming(int L, Pass pass, variable_list grads);
  VjpRule rule_for(const Layer& layer, size_t q, Pass pass) const;
  void contribute_state(int slot, at::Tensor grad);
  void contribute_leaf(int leaf, const at::Tensor& grad);
  void contribute_param_side(const EdgeTarget& t, const at::Tensor& grad);
  void begin_step();
  void fill_missing_target(int slot);
  void fill_missing_targets();
  void propagate_param_side();
  std::vector<at::Tensor> finish_leaf_gradients();
  void reset_gradients();
  // Fused update of the given relaxing states; returns [n, 2] (|d|, |target|).
  at::Tensor update(const std::vector<int>& slots);
  // False when a state is NaN/Inf and the config lets it through; throws otherwise.
  // Norms that overflowed for finite (huge) states are recomputed scaled.
  bool check_finite(at::Tensor& norms, const std::vector<int>& slots, int64_t step);
  double flush_below() const;
  // One relaxation step over all states; returns the update's [R, 2] norms.
  at::Tensor relax_step(bool sweep);
  // Activations whose f' the update kernel applies (see ops/relax_update.h).
  void setup_fused_activations();
  // The first relaxation node that runs its own backward (which may sync with
  // the host and so break a graph capture), or "" when there is none.
  std::string uncapturable_node() const;

  const Plan& plan_;
  std::vector<at::Tensor> backward_weights_;
  const CapturedGraph& graph_;
  EngineConfig config_;
  bool persistent_targets_ = false; // literal steps: reuse buffers in place

  std::vector<at::Tensor> x_;               // per slot
  std::vector<at::ScalarType> state_dtype_; // per slot: the dtype a relaxing state has
  // Closed form: where contribute_state accumulates (nullptr: the literal
  // targets), and the fewest levels of relaxing states below a state for
  // its contributions to be kept.
  std::vector<at::Tensor>* sink_ = nullptr;
  int sink_min_below_ = 0;
  std::vector<int> below_;                // per slot: longest chain of relaxing states beneath it
  std::vector<at::ScalarType> vjp_dtype_; // per slot: the dtype its VJPs expect
  std::vector<at::Tensor> target_;        // per slot: ext + sum of consumer VJPs
  std::vector<char> fresh_;               // target_ written this step
  std::vector<int> relaxing_;             // needed, non-clamped slots
  std::vector<at::Tensor> leaf_grad_;
  std::vector<variable_list> param_side_buf_;
  std::vector<std::vector<std::pair<int, at::Tensor>>> constant_contrib_;
  std::vector<char> constant_ready_;
  std::vector<char> constant_target_; // per slot: every contribution is constant
  bool sweep_nonfinite_ = false;

  // A fused activation at the top of a layer (under reshapes at most):
  // during relaxation its output state is read only as grad = f'(a) * x,
  // written by the update kernel.
  struct FusedActivation {
    int64_t kind = 0;
    at::Tensor input; // in the state's shape
    double p0 = 0.0;
    double p1 = 0.0;
    at::Tensor grad;          // in the state's shape, written by the kernel
    at::Tensor grad_for_node; // the same memory in the activation's shape
    size_t chain_index = 0;   // the activation's place in the layer's chain
  };
  std::vector<FusedActivation> fused_;
  std::vector<int> fused_of_slot_;  // per slot: index into fused_, -1
  std::vector<int> fused_of_layer_; // per layer: index into fused_, -1
  // Closed form, per layer: the chain index of an activation whose f' can be
  // applied in place (-1: none, -2: not looked at yet), and that f'.
  std::vector<int> inplace_at_;
  std::vector<vjp::FusedDerivative> inplace_derivative_;
};

} // namespace torch_ar

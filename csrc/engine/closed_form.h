#pragma once
// The outcome of config.steps literal steps without taking them: Horner's
// rule over the powers of J (engine/coefficients.h), one input-VJP sweep per
// power, then the gradients at x_T (see closed_form.cpp).

#include "engine/coefficients.h"
#include "engine/per_device.h"
#include "engine/relax_stats.h"
#include "engine/router.h"

#include <utility>
#include <vector>

namespace torch_ar {

class ClosedForm final : StateSink {
 public:
  explicit ClosedForm(Router& router);

  // forward_values (per slot; init="forward") are dropped as soon as each
  // state is final; each layer's saved values are freed once it has run when
  // release_saved. Fills the stats (residuals of x_T, sweeps) and returns
  // the leaf gradients.
  std::vector<at::Tensor> run(std::vector<at::Tensor> forward_values, bool release_saved,
                              RelaxStats& stats);

 private:
  // Into the current stage's buffers (sink_), where the next stage needs the
  // state at all.
  void add(int slot, at::Tensor grad) override;
  // How many relaxing states lie beneath each layer and state, which layers
  // have clamped or relaxing outputs, the layers by level; the coefficients.
  void measure();
  // x0 (the initial states) and b (the loss gradients entering relaxing states).
  void initial_and_loss_terms(std::vector<at::Tensor> forward_values);
  // Stage k >= 1: y_k from the levels' J y_{k+1}, producers first.
  void stage(int k);
  // Stage 0: x_T, each layer's gradients and the residual's J x_T.
  void last_stage(bool release_saved);
  // y_k = a_k x0 + c_k b + J y_{k+1} for `slots`, in one launch per device.
  void update_states(const std::vector<int>& slots, int k);
  // Reads one launch's norms: divergence, and stage 0's residuals.
  void settle(const at::Tensor& norms, const std::vector<int>& slots, int stage,
              const std::vector<at::Tensor>* outs, const at::Tensor& scaled);
  // One read of every norm queued since the last read (off the CPU).
  void settle_pending();
  // Layer L's VJP in one pass over states that die with it, so an activation
  // at the top of the layer applies f' in place in the state's buffer.
  void propagate_consuming(int L, Pass pass, variable_list grads);
  bool needs_state(int s, int k) const {
    return s >= 0 && !plan_.slots[s].clamped && plan_.slots[s].needed && below_[s] >= k;
  }

  Router& router_;
  const Plan& plan_;
  const CapturedGraph& graph_;
  const EngineConfig& config_;
  const std::vector<int>& relaxing_;
  const int num_layers_;
  bool on_cpu_ = true;
  double flush_ = 0.0;

  HornerCoefficients coef_;
  int K_ = 0;                                    // the highest stage
  std::vector<int> below_;                       // per slot: relaxing states beneath it
  std::vector<int> layer_below_;                 // per layer: the same for its outputs
  std::vector<char> has_clamped_, has_relaxing_; // per layer
  std::vector<std::vector<int>> relax_inputs_;   // per layer: relaxing states its VJP reaches
  std::vector<std::vector<int>> by_level_;       // needed layers per level

  std::vector<at::Tensor> x_;        // per slot: y_{k+1}, then y_k
  std::vector<at::Tensor> target_;   // per slot: J y_{k+1}, accumulating
  std::vector<at::Tensor> initial_;  // per slot: x0
  std::vector<at::Tensor> loss_;     // per slot: b
  std::vector<at::Tensor> residual_; // per slot: J x_T, accumulated in the last stage
  // Where add() accumulates, and the fewest relaxing states below a state for
  // its contributions to be kept.
  std::vector<at::Tensor>* sink_ = nullptr;
  int sink_min_below_ = 0;

  // Off the CPU, norms are read once per stage.
  struct Pending {
    at::Tensor norms;
    std::vector<int> slots;
    int stage;
    at::Tensor scaled; // stage 0: overflow-safe (|target - x_T|, |target|), or undefined
  };
  std::vector<Pending> pending_;
  std::vector<std::pair<double, double>> dn_; // per slot: (|target - x_T|, |target|)
  bool nonfinite_ = false;

  // Per layer: the chain index of an activation whose f' can be applied in
  // place (-1: none, -2: not looked at yet), and that f'.
  std::vector<int> inplace_at_;
  std::vector<vjp::FusedDerivative> inplace_derivative_;
  // The row indices of a model split over devices, built once (per_device.h).
  DeviceRowIndex row_index_;
};

} // namespace torch_ar

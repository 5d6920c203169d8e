#pragma once
// The paper's relaxation, step by step: x <- x + eta * (ext + sum_c VJP_c(x_c)
// - x), Jacobi (every layer reads the previous step) or sweep (reverse
// topological Gauss-Seidel), with a tolerance, traces and CUDA-graph replay.
// No Python runs inside it.

#include "engine/per_device.h"
#include "engine/relax_stats.h"
#include "engine/router.h"

#include <string>
#include <utility>
#include <vector>

namespace torch_ar {

class LiteralSteps final : StateSink {
 public:
  explicit LiteralSteps(Router& router);

  // Initial states: forward values (where recorded, per slot) or zeros;
  // outputs clamped at their loss gradients.
  void init_states(const std::vector<at::Tensor>& forward_values);
  // The steps; reference_grads (trace_cosine): per leaf, the gradient each
  // step's gradients are compared with.
  RelaxStats relax(const std::vector<at::Tensor>& reference_grads);
  // Parameter and input gradients from the current states.
  std::vector<at::Tensor> leaf_gradients();

 private:
  // Into the step's persistent target buffers, in place.
  void add(int slot, at::Tensor grad) override;
  void run_layer(int L, Pass pass);
  void fill_missing_target(int slot);
  // One relaxation step over all states; returns the update's [R, 2] norms.
  at::Tensor relax_step(bool sweep);
  // Fused update of the given relaxing states; returns [n, 2] (|d|, |target|).
  at::Tensor update(const std::vector<int>& slots);
  // False when a state is NaN/Inf and the config lets it through; throws otherwise.
  // Norms that overflowed for finite (huge) states are recomputed scaled.
  bool check_finite(at::Tensor& norms, const std::vector<int>& slots, int64_t step);
  // Activations whose f' the update kernel applies (see ops/relax_update.h).
  void setup_fused_activations();
  // The first relaxation node that runs its own backward (which may sync with
  // the host and so break a graph capture), or "" when there is none.
  std::string uncapturable_node() const;
  // The cosine of each leaf's current gradient to the reference.
  std::vector<double> cosines(const std::vector<at::Tensor>& reference_grads);

  Router& router_;
  const Plan& plan_;
  const CapturedGraph& graph_;
  const EngineConfig& config_;
  const std::vector<int>& relaxing_; // the relaxing slots

  std::vector<at::Tensor> x_;      // per slot
  std::vector<at::Tensor> target_; // per slot: ext + sum of consumer VJPs
  std::vector<char> fresh_;        // target_ written this step
  // Layers whose outputs are all clamped send the same every step: recorded
  // once (while recording_layer_ is theirs), then replayed.
  std::vector<std::vector<std::pair<int, at::Tensor>>> constant_contrib_;
  std::vector<char> constant_ready_;
  std::vector<char> constant_target_; // per slot: every contribution is constant
  int recording_layer_ = -1;

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
  // The row indices of a model split over devices, built once (per_device.h).
  DeviceRowIndex row_index_;
};

} // namespace torch_ar

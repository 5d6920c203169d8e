#pragma once
// The exact sweep: each layer once, consumers first, as soon as its states
// are final. It is the fixed point of eta = 1 (D Jacobi steps or one
// Gauss-Seidel sweep) without simulating the steps, i.e. autograd's
// gradient, or the variant's exact limit.

#include "engine/router.h"

#include <vector>

namespace torch_ar {

class ExactSweep final : StateSink {
 public:
  explicit ExactSweep(Router& router);

  // Returns the leaf gradients. release_saved: free each layer's saved
  // forward values once it has run, as autograd does (the graph cannot be
  // used again).
  std::vector<at::Tensor> run(bool release_saved = false);
  // After run: a state was NaN/Inf (and the config let it through).
  bool nonfinite() const { return nonfinite_; }

 private:
  // Out of place: a VJP may hand back an alias of a state.
  void add(int slot, at::Tensor grad) override;
  // Throws RelaxationDiverged (or flags) for the shallowest non-finite state.
  void check_finite(const std::vector<at::Tensor>& sums, const std::vector<int>& slots);

  Router& router_;
  const Plan& plan_;
  std::vector<at::Tensor> x_;      // per slot: final once its layer's turn comes
  std::vector<at::Tensor> target_; // per slot: ext + the consumers' VJPs so far
  bool nonfinite_ = false;
};

} // namespace torch_ar

#include "engine/exact_sweep.h"

#include "engine/errors.h"
#include "engine/per_device.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace torch_ar {

ExactSweep::ExactSweep(Router& router)
    : router_(router), plan_(router.plan()), x_(plan_.slots.size()), target_(plan_.slots.size()) {}

void ExactSweep::add(int s, at::Tensor grad) {
  at::Tensor& target = target_[s];
  if (target.defined())
    target = target + grad;
  else
    target = plan_.slots[s].ext.defined() ? plan_.slots[s].ext + grad : std::move(grad);
}

std::vector<at::Tensor> ExactSweep::run(bool release_saved) {
  const bool exact_rule = router_.config().exact_rule();
  router_.reset_gradients();
  for (size_t s = 0; s < plan_.slots.size(); ++s)
    if (plan_.slots[s].clamped) x_[s] = plan_.slots[s].ext;
  // One finiteness flag per state, read back once at the end: a NaN is
  // reported as the literal steps would report it (node and step).
  std::vector<at::Tensor> sums;
  std::vector<int> sum_slots;
  for (int L = 0; L < static_cast<int>(plan_.layers.size()); ++L) {
    const Layer& layer = plan_.layers[L];
    // Consumers come first, so every state of this layer is final now.
    for (int s : layer.out_slots) {
      if (s < 0 || plan_.slots[s].clamped) continue;
      x_[s] = target_[s].defined() ? std::move(target_[s]) : plan_.slots[s].ext;
      target_[s] = at::Tensor();
      if (x_[s].defined() && plan_.slots[s].needed) {
        // A sum carries any NaN/Inf. Accumulated in double: a half or
        // float32 sum of finite elements could overflow their range.
        sums.push_back(x_[s].sum(at::kDouble));
        sum_slots.push_back(s);
      }
    }
    if (exact_rule) {
      router_.run_layer(L, Pass::Full, x_, this);
    } else {
      router_.run_layer(L, Pass::Propagate, x_, this);
      router_.run_layer(L, Pass::WeightGrad, x_, this);
    }
    // Free states and saved values as soon as they are used, as autograd
    // frees its buffers.
    for (int s : layer.out_slots)
      if (s >= 0) x_[s] = at::Tensor();
    if (release_saved)
      for (int n : layer.chain) router_.graph().nodes[n]->release_variables();
  }
  check_finite(sums, sum_slots);
  router_.propagate_param_side();
  return router_.finish_leaf_gradients();
}

void ExactSweep::check_finite(const std::vector<at::Tensor>& sums, const std::vector<int>& slots) {
  if (sums.empty()) return;
  const at::Tensor host = join_on_one_device(sums, /*stack=*/true).to(at::kCPU);
  auto acc = host.accessor<double, 1>();
  int worst = -1;
  for (int64_t i = 0; i < host.size(0); ++i) {
    if (std::isfinite(acc[i])) continue;
    const int s = slots[i];
    if (worst < 0 || plan_.slots[s].level < plan_.slots[worst].level) worst = s;
  }
  nonfinite_ = worst >= 0;
  if (worst < 0 || !router_.config().raise_on_nonfinite) return;
  const StateSlot& slot = plan_.slots[worst];
  throw RelaxationDiverged("torch_ar: relaxation diverged at step " + std::to_string(slot.level) +
                               ": the state of node '" + slot.name +
                               "' became NaN or infinite (eta=1, exact sweep). Check the inputs, "
                               "the loss and custom backward functions for NaN/Inf.",
                           slot.name, slot.level);
}

} // namespace torch_ar

// Autograd kernel of torch_ar::relax_update_. The update is a numerical step
// of the relaxation, not a differentiable function: it refuses tensors that
// require grad (outside no_grad) instead of letting autograd silently ignore
// the mutation, and it bumps the version counters of the states so that
// autograd still notices when a tensor it saved for backward was modified.

#include "ops/relax_update.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

at::Tensor relax_update_autograd(
    at::TensorList states,
    at::TensorList targets,
    double eta,
    double flush_below) {
  if (at::GradMode::is_enabled()) {
    for (size_t i = 0; i < states.size(); ++i) {
      TORCH_CHECK(
          !states[i].requires_grad(),
          "relax_update_ is not differentiable, but states[",
          i,
          "] requires grad; pass detached tensors or call it under "
          "torch.no_grad()");
    }
    for (size_t i = 0; i < targets.size(); ++i) {
      TORCH_CHECK(
          !targets[i].requires_grad(),
          "relax_update_ is not differentiable, but targets[",
          i,
          "] requires grad; pass detached tensors or call it under "
          "torch.no_grad()");
    }
  }
  at::Tensor norms;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("torch_ar::relax_update_", "")
            .typed<at::Tensor(at::TensorList, at::TensorList, double, double)>();
    norms = op.call(states, targets, eta, flush_below);
  }
  for (const at::Tensor& state : states) {
    state.unsafeGetTensorImpl()->bump_version();
  }
  return norms;
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, Autograd, m) {
  m.impl("relax_update_", &relax_update_autograd);
}

} // namespace torch_ar

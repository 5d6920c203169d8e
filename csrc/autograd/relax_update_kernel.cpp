// Autograd kernels of torch_ar::relax_update_ and relax_update_activation_.
// The update is a numerical step of the relaxation, not a differentiable
// function: they refuse tensors that require grad (outside no_grad) instead
// of letting autograd silently ignore the mutation, and they bump the version
// counters of what they write so that autograd still notices when a tensor
// it saved for backward was modified.

#include "ops/relax_update.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

void refuse_requires_grad(at::TensorList tensors, const char* list) {
  if (!at::GradMode::is_enabled()) {
    return;
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!tensors[i].requires_grad(), "relax_update_ is not differentiable, but ", list, "[",
                i,
                "] requires grad; pass detached tensors or call it under "
                "torch.no_grad()");
  }
}

void bump_versions(at::TensorList written) {
  for (const at::Tensor& t : written) {
    t.unsafeGetTensorImpl()->bump_version();
  }
}

at::Tensor relax_update_autograd(at::TensorList states, at::TensorList targets, double eta,
                                 double flush_below) {
  refuse_requires_grad(states, "states");
  refuse_requires_grad(targets, "targets");
  at::Tensor norms;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    norms = relax_update_(states, targets, eta, flush_below);
  }
  bump_versions(states);
  return norms;
}

at::Tensor relax_update_activation_autograd(at::TensorList states, at::TensorList targets,
                                            double eta, double flush_below,
                                            at::IntArrayRef activation_states,
                                            at::IntArrayRef activation_kinds,
                                            at::ArrayRef<double> activation_params,
                                            at::TensorList activation_inputs,
                                            at::TensorList activation_grads) {
  refuse_requires_grad(states, "states");
  refuse_requires_grad(targets, "targets");
  refuse_requires_grad(activation_grads, "activation_grads");
  at::Tensor norms;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    norms = relax_update_activation_(states, targets, eta, flush_below, activation_states,
                                     activation_kinds, activation_params, activation_inputs,
                                     activation_grads);
  }
  bump_versions(states);
  bump_versions(activation_grads);
  return norms;
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, Autograd, m) {
  m.impl("relax_update_", &relax_update_autograd);
  m.impl("relax_update_activation_", &relax_update_activation_autograd);
}

} // namespace torch_ar

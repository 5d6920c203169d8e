// Autograd kernel of torch_ar::horner_update_: a numerical stage of the
// closed-form relaxation, not a differentiable function. It refuses outputs
// that require grad (outside no_grad) and bumps the version counters of what
// it writes, as the relax_update_ kernels do.

#include "ops/horner_update.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

at::Tensor horner_update_autograd(at::TensorList out,
                                  const horner_update_detail::OptionalList& initial,
                                  const horner_update_detail::OptionalList& loss_terms,
                                  const horner_update_detail::OptionalList& targets,
                                  const horner_update_detail::OptionalList& residual_targets,
                                  double alpha, double beta, double flush_below, bool residual) {
  if (at::GradMode::is_enabled()) {
    for (size_t i = 0; i < out.size(); ++i)
      TORCH_CHECK(!out[i].requires_grad(), "horner_update_ is not differentiable, but out[", i,
                  "] requires grad; pass detached tensors or call it under torch.no_grad()");
  }
  at::Tensor norms;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("torch_ar::horner_update_", "")
            .typed<at::Tensor(at::TensorList, const horner_update_detail::OptionalList&,
                              const horner_update_detail::OptionalList&,
                              const horner_update_detail::OptionalList&,
                              const horner_update_detail::OptionalList&, double, double, double,
                              bool)>();
    norms = op.call(out, initial, loss_terms, targets, residual_targets, alpha, beta, flush_below,
                    residual);
  }
  for (const at::Tensor& t : out) t.unsafeGetTensorImpl()->bump_version();
  return norms;
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, Autograd, m) {
  m.impl("horner_update_", &horner_update_autograd);
}

} // namespace torch_ar

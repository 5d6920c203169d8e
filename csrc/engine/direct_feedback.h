#pragma once
// Direct feedback alignment (Nokland 2016) in the relaxation form: every
// linear/conv op sends its input a fixed random projection psi of the output
// error e instead of the VJP of the state above it; everything else (norms,
// activations with f', pools, residual adds) keeps its own VJP. That input-VJP
// no longer depends on any state, so it is computed once per backward and
// bound into the plan as a constant term: each evaluation then relaxes with
// the op's edge cut (Router::cut_by_direct_feedback) and the constant added
// where it lands (a state's ext, an input's leaf_direct).

#include "engine/plan.h"
#include "engine/router.h"

#include <vector>

namespace torch_ar {

// e: the one defined loss gradient in output_grads, as [batch, output_dim].
// psi of each linear/conv op (from the router) is applied to e broadcast over
// the op's output positions (a conv's spatial positions, a linear op's tokens);
// the results are routed down each layer and added to plan.slots[*].ext and
// plan.leaf_direct. Call after bind_loss_gradients, before the evaluation.
void bind_direct_feedback(Plan& plan, Router& router, const std::vector<at::Tensor>& output_grads);

} // namespace torch_ar

// C++ entry point, shared argument checks and the Meta kernel of
// torch_ar::relax_update_. The schema lives in registration.cpp; the CPU
// kernel in cpu/relax_update_kernel.cpp; the CUDA one in
// kernels/relax_update_kernel.cu.

#include "ops/relax_update.h"

#include "ops/flat_layout.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace torch_ar {

at::Tensor relax_update_(at::TensorList states, at::TensorList targets, double eta,
                         double flush_below) {
  if (states.empty() && targets.empty()) {
    TORCH_CHECK(flush_below >= 0.0, "relax_update_: flush_below must be >= 0, got ", flush_below);
    return at::empty({0, 2}, at::TensorOptions().dtype(at::kDouble));
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ar::relax_update_", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, double, double)>();
  return op.call(states, targets, eta, flush_below);
}

at::Tensor relax_update_activation_(at::TensorList states, at::TensorList targets, double eta,
                                    double flush_below, at::IntArrayRef activation_states,
                                    at::IntArrayRef activation_kinds,
                                    at::ArrayRef<double> activation_params,
                                    at::TensorList activation_inputs,
                                    at::TensorList activation_grads) {
  if (activation_states.empty() && activation_kinds.empty() && activation_params.empty() &&
      activation_inputs.empty() && activation_grads.empty()) {
    return relax_update_(states, targets, eta, flush_below);
  }
  TORCH_CHECK(!states.empty(),
              "relax_update_activation_: activations given for an empty list of states");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ar::relax_update_activation_", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, double, double,
                                         at::IntArrayRef, at::IntArrayRef, at::ArrayRef<double>,
                                         at::TensorList, at::TensorList)>();
  return op.call(states, targets, eta, flush_below, activation_states, activation_kinds,
                 activation_params, activation_inputs, activation_grads);
}

namespace relax_update_detail {

namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
         dtype == at::kHalf;
}

} // namespace

void check_inputs(at::TensorList states, at::TensorList targets, double flush_below,
                  c10::DeviceType device_type) {
  TORCH_CHECK(states.size() == targets.size(), "relax_update_: got ", states.size(), " states but ",
              targets.size(), " targets; the lists must have the same length");
  TORCH_CHECK(flush_below >= 0.0,
              "relax_update_: flush_below must be >= 0 (0 disables the flush), got ", flush_below);
  for (size_t i = 0; i < states.size(); ++i) {
    const at::Tensor& state = states[i];
    const at::Tensor& target = targets[i];
    TORCH_CHECK(state.defined() && target.defined(), "relax_update_: undefined tensor at index ",
                i);
    TORCH_CHECK(is_supported_dtype(state.scalar_type()), "relax_update_: states[", i,
                "] has dtype ", state.scalar_type(),
                "; expected float32, float64, bfloat16 or float16");
    TORCH_CHECK(state.scalar_type() == target.scalar_type(),
                "relax_update_: dtype mismatch at index ", i, ": state is ", state.scalar_type(),
                ", target is ", target.scalar_type());
    TORCH_CHECK(state.sizes() == target.sizes(), "relax_update_: shape mismatch at index ", i,
                ": state has shape ", state.sizes(), ", target has shape ", target.sizes());
    TORCH_CHECK(state.device() == target.device(), "relax_update_: device mismatch at index ", i,
                ": state is on ", state.device(), ", target is on ", target.device());
    TORCH_CHECK(state.device() == states[0].device(),
                "relax_update_: all states must be on one device; states[0] is on ",
                states[0].device(), " but states[", i, "] is on ", state.device());
    TORCH_CHECK(state.device().type() == device_type, "relax_update_: states[", i, "] is on ",
                state.device(), " but this kernel runs on ", device_type);
    TORCH_CHECK(at::has_internal_overlap(state) != at::MemOverlap::Yes, "relax_update_: states[", i,
                "] has elements that share memory (for example an expanded tensor); "
                "it cannot be updated in place");
  }
}

std::vector<ActivationOf> check_activations(at::TensorList states,
                                            at::IntArrayRef activation_states,
                                            at::IntArrayRef activation_kinds,
                                            at::ArrayRef<double> activation_params,
                                            at::TensorList activation_inputs,
                                            at::TensorList activation_grads) {
  const size_t m = activation_states.size();
  TORCH_CHECK(activation_kinds.size() == m && activation_inputs.size() == m &&
                  activation_grads.size() == m && activation_params.size() == 2 * m,
              "relax_update_activation_: got ", m, " activation states, ", activation_kinds.size(),
              " kinds, ", activation_inputs.size(), " inputs, ", activation_grads.size(),
              " grads and ", activation_params.size(),
              " params; expected equal lengths and two params per activation");
  std::vector<ActivationOf> of(states.size());
  for (size_t k = 0; k < m; ++k) {
    const int64_t i = activation_states[k];
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(states.size()),
                "relax_update_activation_: activation_states[", k, "] = ", i,
                " is not an index into the ", states.size(), " states");
    TORCH_CHECK(of[i].entry < 0, "relax_update_activation_: state ", i,
                " is listed twice in activation_states");
    const int64_t kind = activation_kinds[k];
    TORCH_CHECK(kind > kDerivativeNone && kind < kNumActivationDerivatives,
                "relax_update_activation_: activation_kinds[", k, "] = ", kind,
                " is not a known activation derivative (1..", kNumActivationDerivatives - 1, ")");
    const at::Tensor& state = states[i];
    for (const auto& [what, t] :
         {std::pair<const char*, const at::Tensor*>{"activation_inputs", &activation_inputs[k]},
          {"activation_grads", &activation_grads[k]}}) {
      TORCH_CHECK(t->defined(), "relax_update_activation_: ", what, "[", k, "] is undefined");
      TORCH_CHECK(t->sizes() == state.sizes() && t->scalar_type() == state.scalar_type() &&
                      t->device() == state.device(),
                  "relax_update_activation_: ", what, "[", k, "] is ", t->scalar_type(), " ",
                  t->sizes(), " on ", t->device(), " but states[", i, "] is ", state.scalar_type(),
                  " ", state.sizes(), " on ", state.device());
    }
    TORCH_CHECK(at::has_internal_overlap(activation_grads[k]) != at::MemOverlap::Yes,
                "relax_update_activation_: activation_grads[", k,
                "] has elements that share memory; it cannot be written in place");
    of[i] = {kind, static_cast<int64_t>(k), activation_params[2 * k], activation_params[2 * k + 1]};
  }
  return of;
}

WalkedTensors walked_tensors(at::TensorList states, at::TensorList targets,
                             const std::vector<ActivationOf>& activations,
                             at::TensorList activation_inputs, at::TensorList activation_grads) {
  WalkedTensors walked;
  walked.states.reserve(states.size());
  walked.targets.reserve(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    walked.states.push_back(flat_layout::walkable(states[i]));
    walked.targets.push_back(flat_layout::walkable_like(targets[i], walked.states.back()));
  }
  walked.activation_inputs.resize(activation_inputs.size());
  walked.activation_grads.resize(activation_grads.size());
  for (size_t i = 0; i < activations.size(); ++i) {
    const int64_t k = activations[i].entry;
    if (k < 0) continue;
    walked.activation_inputs[k] =
        flat_layout::walkable_like(activation_inputs[k], walked.states[i]);
    walked.activation_grads[k] = flat_layout::walkable_like(activation_grads[k], walked.states[i]);
  }
  return walked;
}

void write_back_states(at::TensorList states, const std::vector<at::Tensor>& updated) {
  TORCH_INTERNAL_ASSERT(states.size() == updated.size());
  for (size_t i = 0; i < states.size(); ++i) {
    if (!updated[i].is_same(states[i])) {
      states[i].copy_(updated[i]);
    }
  }
}

} // namespace relax_update_detail

namespace {

// Shape-only kernel for fake tensors (torch.compile, opcheck): checks the
// arguments and returns an empty [n, 2] float64 tensor on the states' device.
at::Tensor relax_update_meta(at::TensorList states, at::TensorList targets, double /*eta*/,
                             double flush_below) {
  relax_update_detail::check_inputs(states, targets, flush_below, c10::DeviceType::Meta);
  return at::empty({static_cast<int64_t>(states.size()), 2},
                   states[0].options().dtype(at::kDouble));
}

at::Tensor relax_update_activation_meta(at::TensorList states, at::TensorList targets, double eta,
                                        double flush_below, at::IntArrayRef activation_states,
                                        at::IntArrayRef activation_kinds,
                                        at::ArrayRef<double> activation_params,
                                        at::TensorList activation_inputs,
                                        at::TensorList activation_grads) {
  relax_update_detail::check_activations(states, activation_states, activation_kinds,
                                         activation_params, activation_inputs, activation_grads);
  return relax_update_meta(states, targets, eta, flush_below);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, Meta, m) {
  m.impl("relax_update_", &relax_update_meta);
  m.impl("relax_update_activation_", &relax_update_activation_meta);
}

} // namespace torch_ar

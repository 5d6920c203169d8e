// C++ entry point, shared argument checks and the Meta kernel of
// torch_ar::relax_update_. The schema lives in registration.cpp; the CPU
// kernel in cpu/relax_update_kernel.cpp; the CUDA one in
// kernels/relax_update_kernel.cu.

#include "ops/relax_update.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace torch_ar {

at::Tensor relax_update_(
    at::TensorList states,
    at::TensorList targets,
    double eta,
    double flush_below) {
  if (states.empty() && targets.empty()) {
    TORCH_CHECK(
        flush_below >= 0.0,
        "relax_update_: flush_below must be >= 0, got ",
        flush_below);
    return at::empty({0, 2}, at::TensorOptions().dtype(at::kDouble));
  }
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ar::relax_update_", "")
          .typed<at::Tensor(at::TensorList, at::TensorList, double, double)>();
  return op.call(states, targets, eta, flush_below);
}

namespace relax_update_detail {

namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble ||
      dtype == at::kBFloat16 || dtype == at::kHalf;
}

} // namespace

void check_inputs(
    at::TensorList states,
    at::TensorList targets,
    double flush_below,
    c10::DeviceType device_type) {
  TORCH_CHECK(
      states.size() == targets.size(),
      "relax_update_: got ",
      states.size(),
      " states but ",
      targets.size(),
      " targets; the lists must have the same length");
  TORCH_CHECK(
      flush_below >= 0.0,
      "relax_update_: flush_below must be >= 0 (0 disables the flush), got ",
      flush_below);
  for (size_t i = 0; i < states.size(); ++i) {
    const at::Tensor& state = states[i];
    const at::Tensor& target = targets[i];
    TORCH_CHECK(
        state.defined() && target.defined(),
        "relax_update_: undefined tensor at index ",
        i);
    TORCH_CHECK(
        is_supported_dtype(state.scalar_type()),
        "relax_update_: states[",
        i,
        "] has dtype ",
        state.scalar_type(),
        "; expected float32, float64, bfloat16 or float16");
    TORCH_CHECK(
        state.scalar_type() == target.scalar_type(),
        "relax_update_: dtype mismatch at index ",
        i,
        ": state is ",
        state.scalar_type(),
        ", target is ",
        target.scalar_type());
    TORCH_CHECK(
        state.sizes() == target.sizes(),
        "relax_update_: shape mismatch at index ",
        i,
        ": state has shape ",
        state.sizes(),
        ", target has shape ",
        target.sizes());
    TORCH_CHECK(
        state.device() == target.device(),
        "relax_update_: device mismatch at index ",
        i,
        ": state is on ",
        state.device(),
        ", target is on ",
        target.device());
    TORCH_CHECK(
        state.device() == states[0].device(),
        "relax_update_: all states must be on one device; states[0] is on ",
        states[0].device(),
        " but states[",
        i,
        "] is on ",
        state.device());
    TORCH_CHECK(
        state.device().type() == device_type,
        "relax_update_: states[",
        i,
        "] is on ",
        state.device(),
        " but this kernel runs on ",
        device_type);
    TORCH_CHECK(
        at::has_internal_overlap(state) != at::MemOverlap::Yes,
        "relax_update_: states[",
        i,
        "] has elements that share memory (for example an expanded tensor); "
        "it cannot be updated in place");
  }
}

std::vector<at::Tensor> contiguous_tensors(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    out.push_back(t.contiguous());
  }
  return out;
}

void write_back_states(
    at::TensorList states,
    const std::vector<at::Tensor>& updated) {
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
at::Tensor relax_update_meta(
    at::TensorList states,
    at::TensorList targets,
    double /*eta*/,
    double flush_below) {
  relax_update_detail::check_inputs(
      states, targets, flush_below, c10::DeviceType::Meta);
  return at::empty(
      {static_cast<int64_t>(states.size()), 2},
      states[0].options().dtype(at::kDouble));
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, Meta, m) {
  m.impl("relax_update_", &relax_update_meta);
}

} // namespace torch_ar

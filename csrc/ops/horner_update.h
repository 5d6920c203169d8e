#pragma once

// One Horner stage of the closed-form relaxation (engine/closed_form.cpp),
// for a list of states:
//   out[i] = alpha * x0[i] + beta * b[i] + t[i]
// x0: the initial states (NaN/Inf elements count as zero), b: the loss terms,
// t: the consumers' VJPs of the previous stage. An undefined x0/b/t is zero.
// |out| < flush_below becomes zero (denormals slow CPUs). out[i] may be the
// same tensor as t[i] (updated in place); it must not overlap the others.
//
// Returns a float64 [n, 4] tensor on the states' device, row i holding
//   (||out[i]||, ||b[i] + r[i] - out[i]||, ||b[i] + r[i]||, non-finite count),
// the norm of the result and, when `residual` is true, the residual of
// `out` as the state it will be: r[i] (undefined: zero) is the sum of the
// consumers' VJPs of out, so b + r is the target the next step would move
// towards. Without `residual` the middle two columns are zero. The last
// column counts the NaN/Inf elements of out (and of b + r): a norm can
// overflow for finite float64 values beyond 1e154, the count cannot.

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Optional.h>

#include <optional>
#include <vector>

namespace torch_ar {

at::Tensor horner_update_(at::TensorList out, const std::vector<at::Tensor>& initial,
                          const std::vector<at::Tensor>& loss_terms,
                          const std::vector<at::Tensor>& targets,
                          const std::vector<at::Tensor>& residual_targets, double alpha,
                          double beta, double flush_below, bool residual);

namespace horner_update_detail {

// The optional lists as they arrive from the dispatcher.
using OptionalList = c10::List<std::optional<at::Tensor>>;

// Validates every backend's arguments (lengths, shapes, dtypes, devices,
// overlap) and returns the optional lists as plain vectors (undefined where
// absent), every tensor laid out as its walked output (ops/flat_layout.h).
struct Inputs {
  std::vector<at::Tensor> out; // dense: the kernel's own buffers
  std::vector<at::Tensor> initial, loss_terms, targets, residual_targets;
};
Inputs check_inputs(at::TensorList out, const OptionalList& initial, const OptionalList& loss_terms,
                    const OptionalList& targets, const OptionalList& residual_targets,
                    double flush_below, c10::DeviceType device_type);

// Copies the kernel's contiguous results into the caller's tensors where they differ.
void write_back(at::TensorList out, const std::vector<at::Tensor>& computed);

} // namespace horner_update_detail
} // namespace torch_ar

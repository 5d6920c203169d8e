#pragma once

// The fused relaxation update, one Euler step for a list of states:
//   d_i = targets[i] - states[i];  states[i] += eta * d_i;
//   |states[i]| < flush_below  ->  0   (flush_below = 0 disables the flush)
// Returns a float64 [n, 2] tensor on the states' device, row i holding
// (||d_i||_2, ||targets[i]||_2), the residual and its scale for the
// tolerance test, computed in the same pass over memory.

#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

namespace torch_ar {

// Calls `torch.ops.torch_ar.relax_update_` through the dispatcher, so the
// CPU or CUDA kernel is chosen by the states' device. An empty list returns
// an empty [0, 2] float64 CPU tensor without dispatching (the dispatcher
// needs at least one tensor to pick a kernel).
at::Tensor relax_update_(
    at::TensorList states,
    at::TensorList targets,
    double eta,
    double flush_below);

namespace relax_update_detail {

// Validates the arguments of every backend: equal list lengths, same shape,
// dtype and device per pair, floating dtypes, all on `device_type`, a
// non-negative flush threshold and no self-overlapping states. Messages
// name the offending index.
void check_inputs(
    at::TensorList states,
    at::TensorList targets,
    double flush_below,
    c10::DeviceType device_type);

// The kernels write through contiguous buffers. A non-contiguous state is
// updated in a contiguous copy that write_back_states copies into it.
std::vector<at::Tensor> contiguous_tensors(at::TensorList tensors);
void write_back_states(
    at::TensorList states,
    const std::vector<at::Tensor>& updated);

} // namespace relax_update_detail
} // namespace torch_ar

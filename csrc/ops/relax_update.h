#pragma once

// The fused relaxation update, one Euler step for a list of states:
//   d_i = targets[i] - states[i];  states[i] += eta * d_i;
//   |states[i]| < flush_below  ->  0   (flush_below = 0 disables the flush)
// Returns a float64 [n, 2] tensor on the states' device, row i holding
// (||d_i||_2, ||targets[i]||_2), the residual and its scale for the
// tolerance test, computed in the same pass over memory.
//
// relax_update_activation_ also hands the next step its first VJP: for the
// listed states it writes grads[k] = f'(a_k) * states[i_k] (after the
// update), where f' comes from the activation's saved forward value. During
// relaxation the states at activation outputs are read only through that
// product, so the activation's own backward kernel (one more read of the
// state) is folded into the update.

#include <cstdint>
#include <vector>

#include "ops/relax_math.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

namespace torch_ar {

// Calls `torch.ops.torch_ar.relax_update_` through the dispatcher, so the
// CPU or CUDA kernel is chosen by the states' device. An empty list returns
// an empty [0, 2] float64 CPU tensor without dispatching (the dispatcher
// needs at least one tensor to pick a kernel).
at::Tensor relax_update_(at::TensorList states, at::TensorList targets, double eta,
                         double flush_below);

// How relax_update_activation_ turns a state x into f'(a) * x, from the
// tensor the activation saved for backward (`input`) and two parameters.
// Each matches ATen's own backward of that activation, NaN handling included.
enum ActivationDerivative : int64_t {
  kDerivativeNone = 0,
  kReluResult = 1,     // input = relu(a):    input <= 0 ? 0 : x
  kLeakyReluInput = 2, // input = a:          input > 0 ? x : p0 * x  (p0: slope)
  kTanhResult = 3,     // input = tanh(a):    x * (1 - input^2)
  kSigmoidResult = 4,  // input = sigmoid(a): x * (1 - input) * input
  kHardtanhInput = 5,  // input = a:          input <= p0 || input >= p1 ? 0 : x
  kScale = 6,          // input = f'(a):      x * input
  kNumActivationDerivatives = 7,
};
// The arithmetic of each kind lives in ops/relax_math.h, shared by the kernels.
static_assert(static_cast<int>(kReluResult) == relax_math::kActivationReluResult &&
                  static_cast<int>(kLeakyReluInput) == relax_math::kActivationLeakyReluInput &&
                  static_cast<int>(kTanhResult) == relax_math::kActivationTanhResult &&
                  static_cast<int>(kSigmoidResult) == relax_math::kActivationSigmoidResult &&
                  static_cast<int>(kHardtanhInput) == relax_math::kActivationHardtanhInput &&
                  static_cast<int>(kScale) == relax_math::kActivationScale,
              "the activation kinds of relax_update.h and relax_math.h differ");

// activation_states[k] indexes `states`; activation_params holds two values
// per entry (p0, p1); activation_inputs[k] and activation_grads[k] have the
// shape, dtype and device of that state. A state appears at most once.
at::Tensor relax_update_activation_(at::TensorList states, at::TensorList targets, double eta,
                                    double flush_below, at::IntArrayRef activation_states,
                                    at::IntArrayRef activation_kinds,
                                    at::ArrayRef<double> activation_params,
                                    at::TensorList activation_inputs,
                                    at::TensorList activation_grads);

namespace relax_update_detail {

// One state's fused activation, resolved for a kernel.
struct ActivationOf {
  int64_t kind = kDerivativeNone;
  int64_t entry = -1; // index into the activation lists
  double p0 = 0.0;
  double p1 = 0.0;
};

// Validates the activation lists against the states (lengths, kinds, each
// state at most once, shapes, dtypes, devices) and returns, per state, its
// activation (kind kDerivativeNone for a state without one).
std::vector<ActivationOf> check_activations(at::TensorList states,
                                            at::IntArrayRef activation_states,
                                            at::IntArrayRef activation_kinds,
                                            at::ArrayRef<double> activation_params,
                                            at::TensorList activation_inputs,
                                            at::TensorList activation_grads);

// Validates the arguments of every backend: equal list lengths, same shape,
// dtype and device per pair, floating dtypes, all on `device_type`, a
// non-negative flush threshold and no self-overlapping states. Messages
// name the offending index.
void check_inputs(at::TensorList states, at::TensorList targets, double flush_below,
                  c10::DeviceType device_type);

// The tensors a kernel walks (ops/flat_layout.h): each state where it is
// when it is dense, its target and activation tensors in the state's layout.
// write_back_states copies a walked copy into the caller's tensor.
struct WalkedTensors {
  std::vector<at::Tensor> states, targets, activation_inputs, activation_grads;
};
WalkedTensors walked_tensors(at::TensorList states, at::TensorList targets,
                             const std::vector<ActivationOf>& activations,
                             at::TensorList activation_inputs, at::TensorList activation_grads);
void write_back_states(at::TensorList states, const std::vector<at::Tensor>& updated);

} // namespace relax_update_detail
} // namespace torch_ar

// CUDA kernels of torch_ar::relax_update_ and relax_update_activation_:
// every state of the list is updated by one launch (multi_tensor.cuh), in
// place, writing f'(a) * x where a state has an activation, with each
// tensor's residual and target norms reduced in a fixed order (so a
// tolerance stop is the same on every run). The per-element arithmetic is
// ops/relax_math.h, which the CPU kernel runs too: the CUDA kernel differs
// from it only in how it walks memory and reduces. Nothing waits on the device.

#include "ops/relax_math.h"
#include "ops/relax_update.h"

#include "multi_tensor.cuh"

#include <algorithm>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

namespace mt = multi_tensor;
namespace rm = relax_math;

struct TensorSlot {
  void* state;
  const void* target;
  const void* activation_input; // nullptr: no activation
  void* activation_grad;
  int64_t numel;
  int32_t element_type;
  int32_t activation_kind;
  double p0; // double: a float64 state must see the exact slope/bounds
  double p1;
};
constexpr int kLargeTable = 320;

template <typename scalar_t>
__device__ void relax_chunk(const TensorSlot& slot, int64_t begin, int64_t end, double eta,
                            double flush_below, double& residual_sq, double& target_sq) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* state = static_cast<scalar_t*>(slot.state);
  const scalar_t* target = static_cast<const scalar_t*>(slot.target);
  const scalar_t* act_in = static_cast<const scalar_t*>(slot.activation_input);
  scalar_t* act_grad = static_cast<scalar_t*>(slot.activation_grad);
  const opmath_t eta_c = static_cast<opmath_t>(eta);
  const opmath_t flush_c = static_cast<opmath_t>(flush_below);
  const opmath_t p0 = static_cast<opmath_t>(slot.p0);
  const opmath_t p1 = static_cast<opmath_t>(slot.p1);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const opmath_t s = static_cast<opmath_t>(state[i]);
    const opmath_t t = static_cast<opmath_t>(target[i]);
    const opmath_t d = rm::sub(t, s);
    const opmath_t updated = rm::flush_tiny(rm::euler_step(s, t, eta_c), flush_c);
    const scalar_t stored = static_cast<scalar_t>(updated);
    state[i] = stored;
    if (act_in != nullptr) {
      // From the stored (rounded) value, as the unfused VJP would read it.
      act_grad[i] = static_cast<scalar_t>(
          rm::activation_vjp<opmath_t>(slot.activation_kind, static_cast<opmath_t>(stored),
                                       static_cast<opmath_t>(act_in[i]), p0, p1));
    }
    residual_sq += static_cast<double>(d) * static_cast<double>(d);
    target_sq += static_cast<double>(t) * static_cast<double>(t);
  }
}

// Per chunk: the state's residual and target sums of squares.
template <int Capacity>
__global__ void __launch_bounds__(mt::kThreads)
    relax_update_multi_tensor_kernel(const __grid_constant__ mt::Table<TensorSlot, Capacity> table,
                                     double* __restrict__ chunk_sums, double eta,
                                     double flush_below) {
  mt::for_each_chunk<2>(table, chunk_sums,
                        [&](const TensorSlot& slot, const mt::ChunkRange& range, double* sums) {
                          mt::with_element_type(slot.element_type, [&](auto element) {
                            relax_chunk<decltype(element)>(slot, range.begin, range.end, eta,
                                                           flush_below, sums[0], sums[1]);
                          });
                        });
}

at::Tensor relax_update_cuda_impl(at::TensorList states, at::TensorList targets, double eta,
                                  double flush_below,
                                  const std::vector<relax_update_detail::ActivationOf>& activations,
                                  at::TensorList activation_inputs,
                                  at::TensorList activation_grads) {
  relax_update_detail::check_inputs(states, targets, flush_below, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(states[0].device());
  const size_t n = states.size();
  auto walked = relax_update_detail::walked_tensors(states, targets, activations, activation_inputs,
                                                    activation_grads);
  std::vector<at::Tensor>& work_states = walked.states;
  const std::vector<at::Tensor>& work_targets = walked.targets;
  const std::vector<at::Tensor>& work_inputs = walked.activation_inputs;
  std::vector<at::Tensor>& work_grads = walked.activation_grads;

  std::vector<TensorSlot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    TensorSlot& slot = slots[i];
    slot = {work_states[i].data_ptr(),
            work_targets[i].const_data_ptr(),
            nullptr,
            nullptr,
            work_states[i].numel(),
            mt::element_type_of(work_states[i].scalar_type(), "relax_update_"),
            kDerivativeNone,
            0.0,
            0.0};
    if (!activations.empty() && activations[i].kind != kDerivativeNone) {
      const auto& act = activations[i];
      slot.activation_input = work_inputs[act.entry].const_data_ptr();
      slot.activation_grad = work_grads[act.entry].data_ptr();
      slot.activation_kind = static_cast<int32_t>(act.kind);
      slot.p0 = act.p0;
      slot.p1 = act.p1;
    }
  }

  at::Tensor norms = mt::launch_all<2, 2>(relax_update_multi_tensor_kernel<mt::kSmallTable>,
                                          relax_update_multi_tensor_kernel<kLargeTable>, slots,
                                          states[0].options().dtype(at::kDouble), eta, flush_below);
  relax_update_detail::write_back_states(states, work_states);
  relax_update_detail::write_back_states(activation_grads, work_grads);
  return norms;
}

at::Tensor relax_update_cuda(at::TensorList states, at::TensorList targets, double eta,
                             double flush_below) {
  return relax_update_cuda_impl(states, targets, eta, flush_below, {}, {}, {});
}

at::Tensor relax_update_activation_cuda(at::TensorList states, at::TensorList targets, double eta,
                                        double flush_below, at::IntArrayRef activation_states,
                                        at::IntArrayRef activation_kinds,
                                        at::ArrayRef<double> activation_params,
                                        at::TensorList activation_inputs,
                                        at::TensorList activation_grads) {
  const auto activations = relax_update_detail::check_activations(
      states, activation_states, activation_kinds, activation_params, activation_inputs,
      activation_grads);
  return relax_update_cuda_impl(states, targets, eta, flush_below, activations, activation_inputs,
                                activation_grads);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CUDA, m) {
  m.impl("relax_update_", &relax_update_cuda);
  m.impl("relax_update_activation_", &relax_update_activation_cuda);
}

} // namespace torch_ar

// CPU kernels of torch_ar::relax_update_ and relax_update_activation_: one
// pass over every state updates it in place, flushes tiny values and
// accumulates the residual norms in double; for a state with an activation,
// f'(a) * x is then written from the same chunk while it is still in cache.

#include "cpu/multi_tensor.h"
#include "ops/relax_math.h"
#include "ops/relax_update.h"

#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

struct SquaredNorms {
  double residual = 0.0;
  double target = 0.0;
};

// Scalar path: reduced-precision dtypes (computed in float) and the tails
// of the vectorised path.
template <typename scalar_t>
SquaredNorms relax_range_scalar(scalar_t* state, const scalar_t* target, int64_t n, double eta,
                                double flush_below) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t eta_c = static_cast<opmath_t>(eta);
  const opmath_t flush_c = static_cast<opmath_t>(flush_below);
  SquaredNorms acc;
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t s = static_cast<opmath_t>(state[i]);
    const opmath_t t = static_cast<opmath_t>(target[i]);
    const opmath_t d = relax_math::sub(t, s);
    const opmath_t updated = relax_math::flush_tiny(relax_math::euler_step(s, t, eta_c), flush_c);
    state[i] = static_cast<scalar_t>(updated);
    acc.residual += static_cast<double>(d) * static_cast<double>(d);
    acc.target += static_cast<double>(t) * static_cast<double>(t);
  }
  return acc;
}

// Float and double: eight lanes (two multi_tensor_cpu::Quad vectors of four)
// with their own double sums. No lane's additions are reordered, so the norms
// do not depend on how the work is split. The flush is a select, not a
// branch: a data-dependent branch mispredicts on ReLU states (half zeros).
template <typename scalar_t>
SquaredNorms relax_range_vec(scalar_t* __restrict__ state, const scalar_t* __restrict__ target,
                             int64_t n, double eta, double flush_below) {
  using quad_t = typename multi_tensor_cpu::Quad<scalar_t>::type;
  using double_quad_t = multi_tensor_cpu::Quad<double>::type;
  const quad_t eta_c = quad_t{} + static_cast<scalar_t>(eta);
  const quad_t flush_c = quad_t{} + static_cast<scalar_t>(flush_below);
  const quad_t zero{};
  double_quad_t residual_lanes[2] = {};
  double_quad_t target_lanes[2] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int h = 0; h < 2; ++h) {
      quad_t s;
      quad_t t;
      std::memcpy(&s, state + i + 4 * h, sizeof(quad_t));
      std::memcpy(&t, target + i + 4 * h, sizeof(quad_t));
      const quad_t d = t - s;
      quad_t u = s + eta_c * d;
      // NaN compares false and is kept, so divergence is still seen.
      u = ((u < flush_c) & (u > -flush_c)) ? zero : u;
      std::memcpy(state + i + 4 * h, &u, sizeof(quad_t));
      const double_quad_t dd = __builtin_convertvector(d, double_quad_t);
      const double_quad_t td = __builtin_convertvector(t, double_quad_t);
      residual_lanes[h] += dd * dd;
      target_lanes[h] += td * td;
    }
  }
  SquaredNorms acc = relax_range_scalar<scalar_t>(state + i, target + i, n - i, eta, flush_below);
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 4; ++k) {
      acc.residual += residual_lanes[h][k];
      acc.target += target_lanes[h][k];
    }
  }
  return acc;
}

template <typename scalar_t>
SquaredNorms relax_range(scalar_t* state, const scalar_t* target, int64_t n, double eta,
                         double flush_below) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return relax_range_vec<scalar_t>(state, target, n, eta, flush_below);
  } else {
    return relax_range_scalar<scalar_t>(state, target, n, eta, flush_below);
  }
}

// grad = f'(a) * x over one range (ops/relax_math.h: the formulas, and their
// NaN behaviour, of ATen's threshold/leaky_relu/tanh/sigmoid/hardtanh backward).
// The kind is a template argument so each loop is a straight line.
template <typename scalar_t, int32_t Kind>
void activation_range_of(const scalar_t* __restrict__ x, const scalar_t* __restrict__ input,
                         scalar_t* __restrict__ grad, int64_t n, double p0, double p1) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t q0 = static_cast<opmath_t>(p0);
  const opmath_t q1 = static_cast<opmath_t>(p1);
  for (int64_t i = 0; i < n; ++i) {
    grad[i] = static_cast<scalar_t>(relax_math::activation_vjp<opmath_t>(
        Kind, static_cast<opmath_t>(x[i]), static_cast<opmath_t>(input[i]), q0, q1));
  }
}

template <typename scalar_t>
void activation_range(const scalar_t* x, const scalar_t* input, scalar_t* grad, int64_t n,
                      const relax_update_detail::ActivationOf& act) {
  switch (act.kind) {
    case kReluResult:
      return activation_range_of<scalar_t, kReluResult>(x, input, grad, n, act.p0, act.p1);
    case kLeakyReluInput:
      return activation_range_of<scalar_t, kLeakyReluInput>(x, input, grad, n, act.p0, act.p1);
    case kTanhResult:
      return activation_range_of<scalar_t, kTanhResult>(x, input, grad, n, act.p0, act.p1);
    case kSigmoidResult:
      return activation_range_of<scalar_t, kSigmoidResult>(x, input, grad, n, act.p0, act.p1);
    case kHardtanhInput:
      return activation_range_of<scalar_t, kHardtanhInput>(x, input, grad, n, act.p0, act.p1);
    case kScale:
      return activation_range_of<scalar_t, kScale>(x, input, grad, n, act.p0, act.p1);
    default:
      TORCH_INTERNAL_ASSERT(false, "relax_update_activation_: unchecked kind ", act.kind);
  }
}

at::Tensor relax_update_cpu_impl(at::TensorList states, at::TensorList targets, double eta,
                                 double flush_below,
                                 const std::vector<relax_update_detail::ActivationOf>& activations,
                                 at::TensorList activation_inputs,
                                 at::TensorList activation_grads) {
  relax_update_detail::check_inputs(states, targets, flush_below, c10::DeviceType::CPU);
  auto walked = relax_update_detail::walked_tensors(states, targets, activations, activation_inputs,
                                                    activation_grads);
  std::vector<at::Tensor>& work_states = walked.states;
  const std::vector<at::Tensor>& work_targets = walked.targets;
  const std::vector<at::Tensor>& work_inputs = walked.activation_inputs;
  std::vector<at::Tensor>& work_grads = walked.activation_grads;

  std::vector<int64_t> numels;
  for (const at::Tensor& state : work_states) numels.push_back(state.numel());
  at::Tensor norms = multi_tensor_cpu::sum_over_chunks<2>(
      numels, [&](const multi_tensor_cpu::Chunk& chunk) -> std::array<double, 2> {
        at::Tensor& state = work_states[chunk.tensor];
        const at::Tensor& target = work_targets[chunk.tensor];
        SquaredNorms sums;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, state.scalar_type(), "relax_update_cpu", [&] {
              sums = relax_range<scalar_t>(state.mutable_data_ptr<scalar_t>() + chunk.begin,
                                           target.const_data_ptr<scalar_t>() + chunk.begin,
                                           chunk.size(), eta, flush_below);
              const auto& act = activations.empty() ? relax_update_detail::ActivationOf{}
                                                    : activations[chunk.tensor];
              if (act.kind != kDerivativeNone) {
                activation_range<scalar_t>(
                    state.const_data_ptr<scalar_t>() + chunk.begin,
                    work_inputs[act.entry].const_data_ptr<scalar_t>() + chunk.begin,
                    work_grads[act.entry].mutable_data_ptr<scalar_t>() + chunk.begin, chunk.size(),
                    act);
              }
            });
        return {sums.residual, sums.target};
      });
  relax_update_detail::write_back_states(states, work_states);
  relax_update_detail::write_back_states(activation_grads, work_grads);
  return norms.sqrt_();
}

at::Tensor relax_update_cpu(at::TensorList states, at::TensorList targets, double eta,
                            double flush_below) {
  return relax_update_cpu_impl(states, targets, eta, flush_below, {}, {}, {});
}

at::Tensor relax_update_activation_cpu(at::TensorList states, at::TensorList targets, double eta,
                                       double flush_below, at::IntArrayRef activation_states,
                                       at::IntArrayRef activation_kinds,
                                       at::ArrayRef<double> activation_params,
                                       at::TensorList activation_inputs,
                                       at::TensorList activation_grads) {
  const auto activations = relax_update_detail::check_activations(
      states, activation_states, activation_kinds, activation_params, activation_inputs,
      activation_grads);
  return relax_update_cpu_impl(states, targets, eta, flush_below, activations, activation_inputs,
                               activation_grads);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CPU, m) {
  m.impl("relax_update_", &relax_update_cpu);
  m.impl("relax_update_activation_", &relax_update_activation_cpu);
}

} // namespace torch_ar

#pragma once
// The arithmetic of the relaxation kernels, written once for the CPU and the
// CUDA kernels (ATen's way for its activation backwards): each kernel only
// walks memory and reduces norms; what it computes per element is here.
//
// Rounding: the CPU build never contracts a * b + c into a fused
// multiply-add (it is compiled with -ffp-contract=off); nvcc would by default. On the device the
// products and sums below use the round-to-nearest intrinsics, which nvcc never contracts, so a
// CUDA step rounds exactly as the CPU step does.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace torch_ar::relax_math {

C10_HOST_DEVICE inline float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline double mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline double add(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline float sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
C10_HOST_DEVICE inline double sub(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// Values smaller in magnitude than `below` become zero (denormals slow CPUs).
// Written without abs() so that NaN stays NaN and divergence is still seen.
template <typename T>
C10_HOST_DEVICE inline T flush_tiny(T v, T below) {
  return (v < below && v > -below) ? T(0) : v;
}

// One Euler step of the relaxation: s + eta * (t - s).
template <typename T>
C10_HOST_DEVICE inline T euler_step(T s, T t, T eta) {
  return add(s, mul(eta, sub(t, s)));
}

// NaN and +-inf become zero (a masked score, -inf before a softmax, starts
// the relaxation from zero). v - v is 0 exactly when v is finite.
template <typename T>
C10_HOST_DEVICE inline T finite_or_zero(T v) {
  return sub(v, v) == T(0) ? v : T(0);
}

// One Horner stage of the closed-form relaxation:
// alpha * x0 + beta * b + t, with x0 the initial state (non-finite -> 0),
// b the loss term and t the consumers' VJPs of the previous stage.
template <typename T>
C10_HOST_DEVICE inline T horner_stage(T alpha, T x0, T beta, T b, T t) {
  return add(add(mul(alpha, finite_or_zero(x0)), mul(beta, b)), t);
}

// How the fused update turns a state x into f'(a) * x (ops/relax_update.h
// lists the kinds), from the tensor the activation saved for backward.
// Each matches ATen's own backward of that activation, NaN handling included.
enum ActivationKind : int32_t {
  kActivationNone = 0,
  kActivationReluResult = 1,     // in = relu(a):    in <= 0 ? 0 : x
  kActivationLeakyReluInput = 2, // in = a:          in > 0 ? x : p0 * x
  kActivationTanhResult = 3,     // in = tanh(a):    x * (1 - in^2)
  kActivationSigmoidResult = 4,  // in = sigmoid(a): x * (1 - in) * in
  kActivationHardtanhInput = 5,  // in = a:          in <= p0 || in >= p1 ? 0 : x
  kActivationScale = 6,          // in = f'(a):      x * in
};

template <typename T>
C10_HOST_DEVICE inline T activation_vjp(int32_t kind, T x, T in, T p0, T p1) {
  const T zero(0);
  const T one(1);
  switch (kind) {
    case kActivationReluResult:
      return in <= zero ? zero : x;
    case kActivationLeakyReluInput:
      return in > zero ? x : mul(x, p0);
    case kActivationTanhResult:
      return mul(x, sub(one, mul(in, in)));
    case kActivationSigmoidResult:
      return mul(mul(x, sub(one, in)), in);
    case kActivationHardtanhInput:
      return (in <= p0 || in >= p1) ? zero : x;
    case kActivationScale:
      return mul(x, in);
    default:
      return x;
  }
}

} // namespace torch_ar::relax_math

// The arithmetic the CPU and CUDA kernels share (ops/relax_math.h), against
// ATen's own backward ops and plain formulas, for every dtype the kernels
// take, boundary values and NaN included. The CUDA kernel runs these same
// functions (with round-to-nearest intrinsics that match the CPU's plain
// operators), so what is checked here is what it computes per element.
#include "ops/relax_math.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

namespace rm = torch_ar::relax_math;

// Values every kernel must treat right: zeros of both signs, boundaries of
// relu and hardtanh, tiny and huge, infinities and NaN.
std::vector<double> special_values() {
  const double inf = std::numeric_limits<double>::infinity();
  return {0.0,    -0.0, 1.0,   -1.0, 0.5,   -0.5, 2.0, -2.0, 1e-30,
          -1e-30, 1e30, -1e30, 0.25, -0.75, 3.0,  inf, -inf, std::nan("")};
}

// The opmath value of `v` rounded to `dtype` (what a kernel reads).
at::Tensor as_dtype(const std::vector<double>& v, at::ScalarType dtype) {
  return at::tensor(v, at::kDouble).to(dtype);
}

template <typename scalar_t>
using opmath = at::opmath_type<scalar_t>;

// Elementwise f'(a) * x with relax_math, in each dtype's opmath, rounded back.
at::Tensor fused(int32_t kind, const at::Tensor& x, const at::Tensor& in, double p0, double p1) {
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused", [&] {
    using op_t = opmath<scalar_t>;
    auto xs = x.contiguous();
    auto is = in.contiguous();
    const scalar_t* xp = xs.const_data_ptr<scalar_t>();
    const scalar_t* ip = is.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < x.numel(); ++i)
      op[i] = static_cast<scalar_t>(
          rm::activation_vjp<op_t>(kind, static_cast<op_t>(xp[i]), static_cast<op_t>(ip[i]),
                                   static_cast<op_t>(p0), static_cast<op_t>(p1)));
  });
  return out;
}

// Same values, NaN where NaN, within `ulps` of the reference elsewhere.
// `floor` allows an absolute difference too (for two roundings of a value
// near zero); with floor 0, zeros and infinities must match exactly.
// `any_nonfinite`: an infinite reference is met by any non-finite value (an
// infinite state times an f'(a) that rounded to zero in the state's dtype).
void expect_same(const at::Tensor& got, const at::Tensor& want, double ulps, const char* what,
                 double floor = 0.0, bool any_nonfinite = false) {
  ASSERT_EQ(got.sizes(), want.sizes());
  const at::Tensor g = got.to(at::kDouble);
  const at::Tensor w = want.to(at::kDouble);
  const double eps = got.scalar_type() == at::kDouble  ? 1.1e-16
                     : got.scalar_type() == at::kFloat ? 6e-8
                     : got.scalar_type() == at::kHalf  ? 4.9e-4
                                                       : 3.9e-3;
  for (int64_t i = 0; i < g.numel(); ++i) {
    const double a = g[i].item<double>();
    const double b = w[i].item<double>();
    if (std::isnan(b)) {
      EXPECT_TRUE(std::isnan(a)) << what << " element " << i << ": " << a << " for NaN";
      continue;
    }
    if (std::isinf(b) && any_nonfinite) {
      EXPECT_FALSE(std::isfinite(a)) << what << " element " << i << ": " << a << " for " << b;
      continue;
    }
    if (std::isinf(b) || (b == 0.0 && floor == 0.0)) {
      EXPECT_EQ(a, b) << what << " element " << i;
      continue;
    }
    EXPECT_LE(std::abs(a - b), ulps * eps * std::abs(b) + floor)
        << what << " element " << i << ": " << a << " vs " << b;
  }
}

class RelaxMath : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(RelaxMath, ActivationDerivativesMatchATenBackwards) {
  const at::ScalarType dtype = GetParam();
  const auto values = special_values();
  // Every pair (state, saved value) of special values.
  std::vector<double> xs, ins;
  for (double x : values)
    for (double in : values) {
      xs.push_back(x);
      ins.push_back(in);
    }
  const at::Tensor x = as_dtype(xs, dtype);
  const at::Tensor in = as_dtype(ins, dtype);
  // The result-based formulas read a saved output: relu's is >= 0 (or NaN),
  // tanh's and sigmoid's lie in [-1, 1] and [0, 1]; any value is still a
  // valid input to both sides.
  expect_same(fused(rm::kActivationReluResult, x, in, 0, 0), at::threshold_backward(x, in, 0), 0,
              "relu");
  expect_same(fused(rm::kActivationLeakyReluInput, x, in, 0.01, 0),
              at::leaky_relu_backward(x, in, 0.01, false), 1, "leaky_relu");
  expect_same(fused(rm::kActivationTanhResult, x, in, 0, 0), at::tanh_backward(x, in), 2, "tanh");
  expect_same(fused(rm::kActivationSigmoidResult, x, in, 0, 0), at::sigmoid_backward(x, in), 2,
              "sigmoid");
  // A NaN saved input passes x through (ATen's scalar and CUDA kernels; its
  // vectorised CPU loop zeroes it, so ATen itself depends on the tensor size).
  const at::Tensor nan_in = at::isnan(in);
  expect_same(fused(rm::kActivationHardtanhInput, x, in, -1.0, 1.0),
              at::where(nan_in, x, at::hardtanh_backward(x, in, -1.0, 1.0)), 0, "hardtanh");
  expect_same(fused(rm::kActivationHardtanhInput, x, in, 0.0, 6.0),
              at::where(nan_in, x, at::hardtanh_backward(x, in, 0.0, 6.0)), 0, "relu6");
  expect_same(fused(rm::kActivationScale, x, in, 0, 0), x * in, 0, "scale");
}

// gelu, silu and elu are fused as kScale with f'(a) computed once by the
// activation's own backward of ones (engine/vjp/activations.cpp): x * f'(a)
// must match the backward of x up to the rounding of f'(a).
TEST_P(RelaxMath, ScaledDerivativesMatchATenBackwards) {
  const at::ScalarType dtype = GetParam();
  std::vector<double> xs, as;
  for (double x : special_values())
    for (double a : {-30.0, -3.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0, 30.0}) {
      xs.push_back(x);
      as.push_back(a);
    }
  const at::Tensor x = as_dtype(xs, dtype);
  const at::Tensor a = as_dtype(as, dtype);
  const at::Tensor ones = at::ones_like(a);
  const double floor = dtype == at::kDouble ? 1e-300 : dtype == at::kFloat ? 1e-37 : 1e-4;
  for (const char* approximate : {"none", "tanh"}) {
    expect_same(fused(rm::kActivationScale, x, at::gelu_backward(ones, a, approximate), 0, 0),
                at::gelu_backward(x, a, approximate), 3, approximate, floor, true);
  }
  expect_same(fused(rm::kActivationScale, x, at::silu_backward(ones, a), 0, 0),
              at::silu_backward(x, a), 3, "silu", floor, true);
  expect_same(fused(rm::kActivationScale, x, at::elu_backward(ones, 1.0, 1.0, 1.0, false, a), 0, 0),
              at::elu_backward(x, 1.0, 1.0, 1.0, false, a), 3, "elu", floor, true);
}

TEST_P(RelaxMath, EulerStepFlushAndHornerStageAreThePlainFormulas) {
  const at::ScalarType dtype = GetParam();
  const auto values = special_values();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "euler", [&] {
    using op_t = opmath<scalar_t>;
    for (double sv : values) {
      for (double tv : values) {
        const op_t s = static_cast<op_t>(static_cast<scalar_t>(sv));
        const op_t t = static_cast<op_t>(static_cast<scalar_t>(tv));
        const op_t eta = static_cast<op_t>(0.1);
        const op_t expect = s + eta * (t - s);
        const op_t got = rm::euler_step(s, t, eta);
        if (std::isnan(expect)) {
          EXPECT_TRUE(std::isnan(got));
        } else {
          EXPECT_EQ(got, expect) << sv << " -> " << tv;
        }
        const op_t alpha = static_cast<op_t>(0.25), beta = static_cast<op_t>(0.75);
        const op_t finite = std::isfinite(s) ? s : op_t(0);
        const op_t horner = rm::horner_stage(alpha, s, beta, t, s);
        const op_t plain = alpha * finite + beta * t + s;
        if (std::isnan(plain)) {
          EXPECT_TRUE(std::isnan(horner));
        } else {
          EXPECT_EQ(horner, plain) << sv << ", " << tv;
        }
      }
      // Flush: below the threshold in magnitude becomes zero, NaN stays NaN.
      const op_t v = static_cast<op_t>(static_cast<scalar_t>(sv));
      const op_t flushed = rm::flush_tiny(v, static_cast<op_t>(1e-20));
      if (std::isnan(v)) {
        EXPECT_TRUE(std::isnan(flushed));
      } else if (std::abs(v) < static_cast<op_t>(1e-20)) {
        EXPECT_EQ(flushed, op_t(0));
      } else {
        EXPECT_EQ(flushed, v);
      }
    }
  });
}

TEST(RelaxMath, NonFiniteInitialValuesReadAsZero) {
  EXPECT_EQ(rm::finite_or_zero(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(rm::finite_or_zero(std::numeric_limits<double>::infinity()), 0.0);
  EXPECT_EQ(rm::finite_or_zero(std::nanf("")), 0.0f);
  EXPECT_EQ(rm::finite_or_zero(-2.5), -2.5);
  EXPECT_EQ(rm::finite_or_zero(std::numeric_limits<float>::max()),
            std::numeric_limits<float>::max());
}

std::string dtype_name(const ::testing::TestParamInfo<at::ScalarType>& info) {
  return c10::toString(info.param);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RelaxMath,
                         ::testing::Values(at::kDouble, at::kFloat, at::kHalf, at::kBFloat16),
                         dtype_name);

} // namespace

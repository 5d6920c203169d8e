// Tests of the CPU kernel of torch_ar::relax_update_, called through the
// dispatcher entry point the engine uses.

#include "ops/relax_update.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

namespace {

// Plain formula: state + eta * (target - state), then the flush, computed in
// double (or float for reduced dtypes, like the kernel).
at::Tensor expected_state(const at::Tensor& state, const at::Tensor& target, double eta,
                          double flush_below) {
  const bool reduced = state.scalar_type() == at::kBFloat16 || state.scalar_type() == at::kHalf;
  const at::ScalarType compute = reduced ? at::kFloat : state.scalar_type();
  at::Tensor s = state.to(compute);
  at::Tensor updated = s + eta * (target.to(compute) - s);
  updated.masked_fill_(updated.abs() < flush_below, 0.0);
  return updated.to(state.scalar_type());
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : tensors) {
    out.push_back(t.clone());
  }
  return out;
}

std::string error_message_of(const std::vector<at::Tensor>& states,
                             const std::vector<at::Tensor>& targets) {
  try {
    torch_ar::relax_update_(states, targets, 0.5, 0.0);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

class RelaxUpdateCpu : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(RelaxUpdateCpu, MovesStatesTowardTargetsByEta) {
  at::manual_seed(0);
  const at::ScalarType dtype = GetParam();
  const auto options = at::TensorOptions().dtype(dtype);
  // A scalar, a matrix, a tensor longer than one work item, an empty one.
  std::vector<at::Tensor> states = {at::randn({}, options), at::randn({7, 13}, options),
                                    at::randn({70001}, options), at::randn({0, 4}, options)};
  std::vector<at::Tensor> targets;
  for (const at::Tensor& s : states) {
    targets.push_back(at::randn(s.sizes(), options));
  }
  const std::vector<at::Tensor> before = clones(states);
  const double eta = 0.1;

  torch_ar::relax_update_(states, targets, eta, 0.0);

  const double tol = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-6 : 1e-2;
  for (size_t i = 0; i < states.size(); ++i) {
    at::Tensor want = expected_state(before[i], targets[i], eta, 0.0);
    EXPECT_EQ(states[i].scalar_type(), dtype);
    EXPECT_TRUE(at::allclose(states[i].to(at::kDouble), want.to(at::kDouble), tol, tol))
        << "index " << i;
  }
}

TEST_P(RelaxUpdateCpu, ReturnsResidualAndTargetNorms) {
  at::manual_seed(1);
  const at::ScalarType dtype = GetParam();
  const auto options = at::TensorOptions().dtype(dtype);
  std::vector<at::Tensor> states = {at::randn({3, 5}, options), at::randn({100000}, options)};
  std::vector<at::Tensor> targets = {at::randn({3, 5}, options), at::randn({100000}, options)};
  const std::vector<at::Tensor> before = clones(states);

  at::Tensor norms = torch_ar::relax_update_(states, targets, 0.7, 0.0);

  ASSERT_EQ(norms.scalar_type(), at::kDouble);
  ASSERT_EQ(norms.sizes(), at::IntArrayRef({2, 2}));
  for (size_t i = 0; i < states.size(); ++i) {
    // The residual is taken in the compute dtype before the update.
    const bool reduced = dtype == at::kBFloat16 || dtype == at::kHalf;
    const at::ScalarType compute = reduced ? at::kFloat : dtype;
    at::Tensor d = targets[i].to(compute) - before[i].to(compute);
    const double residual = d.to(at::kDouble).norm().item<double>();
    const double target = targets[i].to(at::kDouble).norm().item<double>();
    EXPECT_NEAR(norms[i][0].item<double>(), residual, 1e-10 * residual) << "index " << i;
    EXPECT_NEAR(norms[i][1].item<double>(), target, 1e-10 * target) << "index " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RelaxUpdateCpu,
                         ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf),
                         [](const ::testing::TestParamInfo<at::ScalarType>& info) {
                           return std::string(c10::toString(info.param));
                         });

TEST(RelaxUpdateCpuFlush, ZeroesValuesBelowThreshold) {
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    // eta = 1 puts each state exactly on its target.
    at::Tensor state = at::zeros({6}, at::TensorOptions().dtype(dtype));
    at::Tensor target = at::tensor({1e-3, -1e-3, 1e-9, -1e-9, 0.0, 5.0}).to(dtype);
    torch_ar::relax_update_({state}, {target}, 1.0, 1e-6);
    at::Tensor want = at::tensor({1e-3, -1e-3, 0.0, 0.0, 0.0, 5.0}).to(dtype);
    EXPECT_TRUE(at::equal(state, want)) << c10::toString(dtype) << ": " << state;
  }
}

TEST(RelaxUpdateCpuFlush, ZeroThresholdKeepsDenormals) {
  const float denormal = std::numeric_limits<float>::denorm_min() * 8;
  at::Tensor state = at::zeros({9}, at::kFloat); // 8 vector lanes and a tail
  at::Tensor target = at::full({9}, denormal, at::kFloat);
  torch_ar::relax_update_({state}, {target}, 1.0, 0.0);
  EXPECT_TRUE(at::equal(state, target)) << state;

  torch_ar::relax_update_({state}, {target}, 1.0, 1e-30);
  EXPECT_TRUE(at::equal(state, at::zeros({9}, at::kFloat))) << state;
}

TEST(RelaxUpdateCpuLayout, NonContiguousStatesAreUpdatedInPlace) {
  at::manual_seed(2);
  at::Tensor base = at::randn({40, 30}, at::kDouble);
  at::Tensor state = base.t(); // non-contiguous view of base
  at::Tensor target = at::randn({30, 40}, at::kDouble).t().contiguous().t();
  ASSERT_FALSE(state.is_contiguous());
  const at::Tensor before = state.clone();

  torch_ar::relax_update_({state}, {target}, 0.25, 0.0);

  EXPECT_TRUE(at::allclose(state, expected_state(before, target, 0.25, 0.0)));
  EXPECT_TRUE(at::equal(base.t(), state)); // written through to the storage
}

TEST(RelaxUpdateCpuLayout, ResultDoesNotDependOnThreadCount) {
  at::manual_seed(3);
  at::Tensor target = at::randn({300001}, at::kFloat);
  at::Tensor state = at::randn({300001}, at::kFloat);
  at::Tensor state_copy = state.clone();
  const int threads = at::get_num_threads();
  at::Tensor parallel = torch_ar::relax_update_({state}, {target}, 0.3, 1e-7);
  at::set_num_threads(1);
  at::Tensor serial = torch_ar::relax_update_({state_copy}, {target}, 0.3, 1e-7);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(state, state_copy));
  EXPECT_TRUE(at::equal(parallel, serial));
}

TEST(RelaxUpdateCpuLayout, EmptyListReturnsEmptyNorms) {
  at::Tensor norms = torch_ar::relax_update_({}, {}, 0.1, 0.0);
  EXPECT_EQ(norms.sizes(), at::IntArrayRef({0, 2}));
  EXPECT_EQ(norms.scalar_type(), at::kDouble);
}

TEST(RelaxUpdateCpuErrors, RejectsMismatchedShapesNamingTheIndex) {
  const std::string message =
      error_message_of({at::zeros({2, 3}), at::zeros({4})}, {at::zeros({2, 3}), at::zeros({5})});
  EXPECT_NE(message.find("shape mismatch at index 1"), std::string::npos) << message;
}

TEST(RelaxUpdateCpuErrors, RejectsListsOfDifferentLength) {
  const std::string message = error_message_of({at::zeros({2}), at::zeros({2})}, {at::zeros({2})});
  EXPECT_NE(message.find("2 states but 1 targets"), std::string::npos) << message;
}

TEST(RelaxUpdateCpuErrors, RejectsMismatchedDtypes) {
  const std::string message = error_message_of({at::zeros({2})}, {at::zeros({2}, at::kDouble)});
  EXPECT_NE(message.find("dtype mismatch at index 0"), std::string::npos) << message;
}

TEST(RelaxUpdateCpuErrors, RejectsIntegerStates) {
  const std::string message =
      error_message_of({at::zeros({2}, at::kLong)}, {at::zeros({2}, at::kLong)});
  EXPECT_NE(message.find("states[0] has dtype Long"), std::string::npos) << message;
}

TEST(RelaxUpdateCpuErrors, RejectsNegativeFlushThreshold) {
  EXPECT_THROW(torch_ar::relax_update_({at::zeros({2})}, {at::zeros({2})}, 0.1, -1.0), c10::Error);
}

TEST(RelaxUpdateCpuErrors, RejectsSelfOverlappingStates) {
  at::Tensor expanded = at::zeros({1}).expand({4});
  const std::string message = error_message_of({expanded}, {at::ones({4})});
  EXPECT_NE(message.find("share memory"), std::string::npos) << message;
}

} // namespace

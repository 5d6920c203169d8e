// The relaxation loop with a recorded step (the CUDA graph path), driven on
// the CPU by a stand-in StepGraph that records the step and runs it again on
// every replay; and the fused activation update against the unfused one.
#include "engine/engine.h"
#include "engine/step_graph.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <vector>

namespace {

using torch_ar::EngineConfig;
using torch_ar::EngineInputs;

int captures = 0;
int replays = 0;

class ReplayingStepGraph final : public torch_ar::StepGraph {
 public:
  void capture(const std::function<void()>& step) override {
    ++captures;
    step_ = step; // recorded, not run: as a CUDA graph capture
  }
  void replay() override {
    ++replays;
    step_();
  }

 private:
  std::function<void()> step_;
};

std::unique_ptr<torch_ar::StepGraph> make_replaying(const c10::Device&) {
  return std::make_unique<ReplayingStepGraph>();
}

// A device that refuses the capture, as CUDA does when the step calls
// something that waits on the host. (On the CPU the step cannot run its host
// side without its tensor work, so it is refused before it starts.)
class RefusingStepGraph final : public torch_ar::StepGraph {
 public:
  void capture(const std::function<void()>&) override {
    ++captures;
    TORCH_CHECK(false, "operation not permitted when stream is capturing");
  }
  void replay() override { ++replays; }
};

std::unique_ptr<torch_ar::StepGraph> make_refusing(const c10::Device&) {
  return std::make_unique<RefusingStepGraph>();
}

// A device that failed (a sticky error): not a refusal to record.
class FaultyStepGraph final : public torch_ar::StepGraph {
 public:
  void capture(const std::function<void()>&) override {
    ++captures;
    throw torch_ar::StepGraphDeviceFault("device 0 failed while recording (illegal address)");
  }
  void replay() override { ++replays; }
};

std::unique_ptr<torch_ar::StepGraph> make_faulty(const c10::Device&) {
  return std::make_unique<FaultyStepGraph>();
}

// Registers a stand-in for CPU tensors for the scope of a test.
struct CpuStepGraphScope {
  torch_ar::StepGraphFactory previous;
  explicit CpuStepGraphScope(torch_ar::StepGraphFactory factory = &make_replaying)
      : previous(torch_ar::set_step_graph_factory(c10::DeviceType::CPU, factory)) {
    captures = replays = 0;
  }
  ~CpuStepGraphScope() { torch_ar::set_step_graph_factory(c10::DeviceType::CPU, previous); }
};

// x -> tanh(x W1^T) -> relu(. W2^T) -> . W3^T = y, with the input's gradient.
EngineInputs mlp() {
  at::manual_seed(7);
  auto p = [](std::vector<int64_t> shape) {
    return at::randn(shape, at::kDouble).set_requires_grad(true);
  };
  at::Tensor x = p({6, 5}), w1 = p({8, 5}), w2 = p({8, 8}), w3 = p({3, 8});
  at::Tensor y = at::mm(at::relu(at::mm(at::tanh(at::mm(x, w1.t())), w2.t())), w3.t());
  EngineInputs in;
  in.outputs = {y};
  in.output_grads = {at::randn({6, 3}, at::kDouble)};
  in.leaves = {w1, w2, w3, x};
  in.leaf_is_input = {false, false, false, true};
  in.leaf_needs_grad = {true, true, true, true};
  return in;
}

EngineConfig paper_mode(torch_ar::Schedule schedule) {
  EngineConfig c;
  c.eta = 0.3;
  c.steps = 12;
  c.schedule = schedule;
  c.keep_graph = true;
  c.evaluation = torch_ar::Evaluation::Literal; // the steps themselves are under test
  return c;
}

void expect_identical(const torch_ar::EngineResult& a, const torch_ar::EngineResult& b) {
  ASSERT_EQ(a.leaf_grads.size(), b.leaf_grads.size());
  for (size_t i = 0; i < a.leaf_grads.size(); ++i) {
    ASSERT_TRUE(a.leaf_grads[i].defined() && b.leaf_grads[i].defined()) << "leaf " << i;
    EXPECT_TRUE(at::equal(a.leaf_grads[i], b.leaf_grads[i])) << "leaf " << i;
  }
}

TEST(StepGraph, NoneIsRegisteredForCpu) {
  EXPECT_EQ(torch_ar::make_step_graph(c10::Device(c10::kCPU)), nullptr);
  EngineInputs in = mlp();
  EngineConfig c = paper_mode(torch_ar::Schedule::Jacobi);
  c.cuda_graph = true;
  auto r = torch_ar::run_engine(in, c);
  EXPECT_EQ(r.stats.graph_steps, 0);
  EXPECT_EQ(r.stats.steps, 12);
}

// The same relaxation without and with the stand-in recorder.
struct EagerAndGraphed {
  torch_ar::EngineResult eager;
  torch_ar::EngineResult graphed;
};

EagerAndGraphed run_both(torch_ar::Schedule schedule, int64_t steps, int64_t check_every) {
  EngineInputs in = mlp();
  EngineConfig c = paper_mode(schedule);
  c.steps = steps;
  c.check_every = check_every;
  EagerAndGraphed r;
  r.eager = torch_ar::run_engine(in, c);
  CpuStepGraphScope scope;
  c.cuda_graph = true;
  r.graphed = torch_ar::run_engine(in, c);
  return r;
}

TEST(StepGraph, RecordsStepOneAndReplaysTheRest) {
  for (auto schedule : {torch_ar::Schedule::Jacobi, torch_ar::Schedule::Sweep}) {
    auto [eager, graphed] = run_both(schedule, 12, 1);
    EXPECT_EQ(captures, 1);
    EXPECT_EQ(replays, 11);
    EXPECT_EQ(graphed.stats.graph_steps, 11);
    EXPECT_EQ(graphed.stats.steps, 12);
    expect_identical(graphed, eager);
  }
}

TEST(StepGraph, BlocksOfCheckEverySteps) {
  // 11 steps read back every 5: step 0 as is, steps 1-10 as two replays of a
  // recorded 5-step block.
  for (auto schedule : {torch_ar::Schedule::Jacobi, torch_ar::Schedule::Sweep}) {
    auto [eager, graphed] = run_both(schedule, 11, 5);
    EXPECT_EQ(captures, 1);
    EXPECT_EQ(replays, 2);
    EXPECT_EQ(graphed.stats.graph_steps, 10);
    EXPECT_EQ(graphed.stats.steps, 11);
    expect_identical(graphed, eager);
  }
}

TEST(StepGraph, BlockDividesTheRemainingSteps) {
  // 12 steps: 11 left after step 0, a prime, so blocks of one step.
  EngineInputs in = mlp();
  EngineConfig c = paper_mode(torch_ar::Schedule::Jacobi);
  c.check_every = 5;
  CpuStepGraphScope scope;
  c.cuda_graph = true;
  auto graphed = torch_ar::run_engine(in, c);
  EXPECT_EQ(replays, 11);
  EXPECT_EQ(graphed.stats.graph_steps, 11);
}

TEST(StepGraph, ToleranceIsTestedBetweenReplays) {
  EngineInputs in = mlp();
  EngineConfig c = paper_mode(torch_ar::Schedule::Jacobi);
  c.steps = -1;
  c.eta = 0.5;
  c.tol = 1e-8;
  auto eager = torch_ar::run_engine(in, c);
  CpuStepGraphScope scope;
  c.cuda_graph = true;
  auto graphed = torch_ar::run_engine(in, c);
  EXPECT_TRUE(graphed.stats.converged);
  EXPECT_EQ(graphed.stats.steps, eager.stats.steps);
  EXPECT_EQ(graphed.stats.graph_steps, eager.stats.steps - 1);
  expect_identical(graphed, eager);
}

TEST(StepGraph, RefusedCaptureFallsBackToEagerSteps) {
  for (auto schedule : {torch_ar::Schedule::Jacobi, torch_ar::Schedule::Sweep}) {
    EngineInputs in = mlp();
    EngineConfig c = paper_mode(schedule);
    auto eager = torch_ar::run_engine(in, c);
    CpuStepGraphScope scope(&make_refusing);
    c.cuda_graph = true;
    auto fallback = torch_ar::run_engine(in, c);
    EXPECT_EQ(captures, 1);
    EXPECT_EQ(replays, 0);
    EXPECT_EQ(fallback.stats.graph_steps, 0);
    EXPECT_EQ(fallback.stats.steps, 12);
    expect_identical(fallback, eager);
  }
}

TEST(StepGraph, TooFewStepsRecordNothing) {
  CpuStepGraphScope scope;
  EngineInputs in = mlp();
  EngineConfig c = paper_mode(torch_ar::Schedule::Jacobi);
  c.steps = 2;
  c.cuda_graph = true;
  auto r = torch_ar::run_engine(in, c);
  EXPECT_EQ(captures, 0);
  EXPECT_EQ(r.stats.graph_steps, 0);
}

TEST(FusedActivation, MatchesTheUnfusedVjps) {
  for (auto schedule : {torch_ar::Schedule::Jacobi, torch_ar::Schedule::Sweep}) {
    EngineInputs in = mlp();
    EngineConfig c = paper_mode(schedule);
    c.fuse_activations = false;
    auto unfused = torch_ar::run_engine(in, c);
    EXPECT_EQ(unfused.stats.fused_activations, 0);
    c.fuse_activations = true;
    auto fused = torch_ar::run_engine(in, c);
    // The relu output's f' is fused; the tanh output's layer sends nothing to
    // a state during relaxation (only to W1 and x), so there is nothing to fuse.
    EXPECT_EQ(fused.stats.fused_activations, 1);
    for (size_t i = 0; i < fused.leaf_grads.size(); ++i) {
      const double err = (fused.leaf_grads[i] - unfused.leaf_grads[i]).abs().max().item<double>();
      EXPECT_LT(err, 1e-14 * (1.0 + unfused.leaf_grads[i].abs().max().item<double>()))
          << "leaf " << i;
    }
  }
}

TEST(FusedActivation, NotUsedWhenTheVariantDropsTheDerivative) {
  EngineInputs in = mlp();
  EngineConfig c = paper_mode(torch_ar::Schedule::Jacobi);
  c.drop_activation_derivative = true;
  auto r = torch_ar::run_engine(in, c);
  EXPECT_EQ(r.stats.fused_activations, 0);
}

TEST(StepGraph, DeviceFaultIsAnErrorNotAFallback) {
  EngineInputs in = mlp();
  EngineConfig c = paper_mode(torch_ar::Schedule::Jacobi);
  c.cuda_graph = true;
  CpuStepGraphScope scope(&make_faulty);
  try {
    torch_ar::run_engine(in, c);
    FAIL() << "a device fault must not be swallowed";
  } catch (const torch_ar::StepGraphDeviceFault& e) {
    EXPECT_NE(std::string(e.what()).find("illegal address"), std::string::npos);
  }
  EXPECT_EQ(captures, 1);
}

} // namespace

// The engine on hand-built graphs, against gradients written out by hand.
#include "engine/engine.h"
#include "engine/errors.h"
#include "engine/graph.h"
#include "engine/per_device.h"
#include "engine/plan.h"
#include "engine/relaxation.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <vector>

namespace {

using torch_ar::EngineConfig;
using torch_ar::EngineInputs;
using torch_ar::Schedule;

at::Tensor param(std::vector<int64_t> shape, int seed) {
  at::manual_seed(seed);
  return at::randn(shape, at::kDouble).set_requires_grad(true);
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-300);
}

struct Case {
  EngineInputs in;
  std::vector<at::Tensor> expected; // per leaf
  int64_t depth = 0;
};

// x -> tanh(x W1^T) -> tanh(. W2^T) -> . W3^T = y, L = sum(y * c).
Case chain() {
  Case k;
  at::Tensor x = param({5, 4}, 1), w1 = param({6, 4}, 2), w2 = param({6, 6}, 3),
             w3 = param({3, 6}, 4), c = param({5, 3}, 5).detach();
  at::Tensor h1 = at::tanh(at::mm(x, w1.t()));
  at::Tensor h2 = at::tanh(at::mm(h1, w2.t()));
  at::Tensor y = at::mm(h2, w3.t());
  k.in.outputs = {y};
  k.in.output_grads = {c};
  k.in.leaves = {w1, w2, w3, x};
  k.in.leaf_is_input = {false, false, false, true};
  k.in.leaf_needs_grad = {true, true, true, true};
  at::NoGradGuard ng;
  at::Tensor H1 = h1.detach(), H2 = h2.detach();
  at::Tensor dh2 = c.mm(w3.detach());
  at::Tensor da2 = dh2 * (1 - H2 * H2);
  at::Tensor dh1 = da2.mm(w2.detach());
  at::Tensor da1 = dh1 * (1 - H1 * H1);
  k.expected = {da1.t().mm(x.detach()), da2.t().mm(H1), c.t().mm(H2), da1.mm(w1.detach())};
  k.depth = 2; // states on h1 and h2 under the clamped output
  return k;
}

// h = tanh(x W^T) feeds two branches that are added: y = h Wa^T + h Wb^T.
Case diamond() {
  Case k;
  at::Tensor x = param({4, 3}, 11), w = param({5, 3}, 12), wa = param({2, 5}, 13),
             wb = param({2, 5}, 14), c = param({4, 2}, 15).detach();
  at::Tensor h = at::tanh(at::mm(x, w.t()));
  at::Tensor y = at::mm(h, wa.t()) + at::mm(h, wb.t());
  k.in.outputs = {y};
  k.in.output_grads = {c};
  k.in.leaves = {w, wa, wb, x};
  k.in.leaf_is_input = {false, false, false, true};
  k.in.leaf_needs_grad = {true, true, true, false};
  at::NoGradGuard ng;
  at::Tensor H = h.detach();
  at::Tensor dh = c.mm(wa.detach()) + c.mm(wb.detach());
  at::Tensor da = dh * (1 - H * H);
  k.expected = {da.t().mm(x.detach()), c.t().mm(H), c.t().mm(H), at::Tensor()};
  k.depth = 2; // h below the two branch states below the clamped sum
  return k;
}

// One square weight used twice: y = tanh(x W^T) W^T.
Case shared_weight() {
  Case k;
  at::Tensor x = param({3, 4}, 21), w = param({4, 4}, 22), c = param({3, 4}, 23).detach();
  at::Tensor h = at::tanh(at::mm(x, w.t()));
  at::Tensor y = at::mm(h, w.t());
  k.in.outputs = {y};
  k.in.output_grads = {c};
  k.in.leaves = {w, x};
  k.in.leaf_is_input = {false, true};
  k.in.leaf_needs_grad = {true, false};
  at::NoGradGuard ng;
  at::Tensor H = h.detach();
  at::Tensor da = c.mm(w.detach()) * (1 - H * H);
  k.expected = {c.t().mm(H) + da.t().mm(x.detach()), at::Tensor()};
  k.depth = 1;
  return k;
}

void expect_matches(const Case& k, const torch_ar::EngineResult& r, double tol) {
  ASSERT_EQ(r.leaf_grads.size(), k.expected.size());
  for (size_t i = 0; i < k.expected.size(); ++i) {
    if (!k.expected[i].defined()) {
      EXPECT_FALSE(r.leaf_grads[i].defined()) << "leaf " << i << " should get no gradient";
      continue;
    }
    ASSERT_TRUE(r.leaf_grads[i].defined()) << "leaf " << i;
    EXPECT_LT(rel_err(r.leaf_grads[i], k.expected[i]), tol) << "leaf " << i;
  }
}

EngineConfig keep(EngineConfig c) {
  c.keep_graph = true; // each test runs several configurations on one graph
  return c;
}

class EngineOnGraph : public ::testing::TestWithParam<Case (*)()> {};

TEST_P(EngineOnGraph, ExactSweepEqualsClosedForm) {
  Case k = GetParam()();
  auto r = torch_ar::run_engine(k.in, keep({}));
  EXPECT_TRUE(r.stats.exact_shortcut);
  EXPECT_EQ(r.stats.depth, k.depth);
  expect_matches(k, r, 1e-12);
}

TEST_P(EngineOnGraph, LiteralJacobiIsExactAfterDepthSteps) {
  Case k = GetParam()();
  EngineConfig c;
  c.trace = true; // forces the literal steps
  auto r = torch_ar::run_engine(k.in, keep(c));
  EXPECT_FALSE(r.stats.exact_shortcut);
  EXPECT_EQ(r.stats.steps, k.depth);
  expect_matches(k, r, 1e-12);
  EXPECT_EQ(r.stats.residual_trace.size(0), k.depth);
}

TEST(Engine, FewerStepsThanDepthAreNotExact) {
  for (Case (*make)() : {&chain, &diamond}) {
    Case k = make();
    ASSERT_GE(k.depth, 2);
    EngineConfig c;
    c.steps = k.depth - 1;
    c.init = torch_ar::InitMode::Zero;
    auto r = torch_ar::run_engine(k.in, keep(c));
    double worst = 0.0;
    for (size_t i = 0; i < k.expected.size(); ++i)
      if (k.expected[i].defined()) worst = std::max(worst, rel_err(r.leaf_grads[i], k.expected[i]));
    EXPECT_GT(worst, 1e-3) << "D-1 literal steps cannot reach the deepest state";
  }
}

TEST_P(EngineOnGraph, SmallEtaConvergesJacobiAndSweep) {
  Case k = GetParam()();
  for (Schedule s : {Schedule::Jacobi, Schedule::Sweep}) {
    EngineConfig c;
    c.eta = 0.3;
    c.steps = 300;
    c.schedule = s;
    c.init = torch_ar::InitMode::Zero;
    auto r = torch_ar::run_engine(k.in, keep(c));
    expect_matches(k, r, 1e-9);
    EXPECT_LT(r.stats.max_residual, 1e-9);
  }
}

TEST_P(EngineOnGraph, ToleranceStopsEarly) {
  Case k = GetParam()();
  EngineConfig c;
  c.eta = 0.5;
  c.tol = 1e-10;
  auto r = torch_ar::run_engine(k.in, keep(c));
  EXPECT_TRUE(r.stats.converged);
  EXPECT_LT(r.stats.steps, 200);
  EXPECT_LE(r.stats.max_residual, 1e-10);
  expect_matches(k, r, 1e-8);
}

std::string graph_name(const ::testing::TestParamInfo<Case (*)()>& info) {
  static const char* const names[] = {"Chain", "Diamond", "SharedWeight"};
  return names[info.index];
}

INSTANTIATE_TEST_SUITE_P(HandBuilt, EngineOnGraph,
                         ::testing::Values(&chain, &diamond, &shared_weight), graph_name);

TEST(Engine, ReleasesSavedValuesWithoutKeepGraph) {
  Case k = chain();
  EngineConfig c; // keep_graph = false
  torch_ar::run_engine(k.in, c);
  EXPECT_THROW(torch_ar::run_engine(k.in, c), c10::Error);
}

// Direct feedback alignment on the chain: each weight op's input hears
// e psi^T (psi [in, output_dim]) instead of what lies above it; f' is kept
// on the way to each weight. Written out by hand, for the exact sweep, the
// literal steps and the closed form (one linear system with a constant term).
TEST(Engine, DirectFeedbackGivesTheHandWrittenGradients) {
  Case k = chain();
  at::Tensor x = k.in.leaves[3].detach(), c = k.in.output_grads[0];
  at::Tensor w1 = k.in.leaves[0].detach(), w2 = k.in.leaves[1].detach();
  at::Tensor H1 = at::tanh(x.mm(w1.t())), H2 = at::tanh(H1.mm(w2.t()));
  at::manual_seed(31);
  const at::Tensor psi1 = at::randn({4, 3}, at::kDouble), psi2 = at::randn({6, 3}, at::kDouble),
                   psi3 = at::randn({6, 3}, at::kDouble);
  k.in.backward_weights = {psi1, psi2, psi3, at::Tensor()};
  const at::Tensor da2 = c.mm(psi3.t()) * (1 - H2 * H2);
  const at::Tensor da1 = c.mm(psi2.t()) * (1 - H1 * H1);
  k.expected = {da1.t().mm(x), da2.t().mm(H1), c.t().mm(H2), c.mm(psi1.t())};
  EngineConfig c1;
  c1.use_backward_weights = true;
  c1.direct_feedback = true;
  expect_matches(k, torch_ar::run_engine(k.in, keep(c1)), 1e-12);
  for (auto evaluation : {torch_ar::Evaluation::Literal, torch_ar::Evaluation::ClosedForm}) {
    EngineConfig slow = c1;
    slow.eta = 0.5;
    slow.steps = 80;
    slow.evaluation = evaluation;
    expect_matches(k, torch_ar::run_engine(k.in, keep(slow)), 1e-12);
  }
  // psi sized for another output: refused, naming the size to pass.
  k.in.backward_weights = {at::randn({4, 2}, at::kDouble), psi2, psi3, at::Tensor()};
  try {
    torch_ar::run_engine(k.in, keep(c1));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("output_dim=3"), std::string::npos) << e.what();
  }
}

// A NaN loss gradient is reported as such before any step (no eta or step
// count could help); without raising, the literal steps carry it into the
// states, from the first step on (a NaN from inside a backward is named by
// node and step: tests/python/test_errors.py).
TEST(Engine, NanLossGradientIsNamedBeforeTheSteps) {
  Case k = chain();
  k.in.output_grads[0] = at::full_like(k.in.output_grads[0], NAN);
  EngineConfig c;
  c.eta = 0.5;
  c.steps = 5;
  c.evaluation = torch_ar::Evaluation::Literal;
  try {
    torch_ar::run_engine(k.in, keep(c));
    FAIL() << "expected an error";
  } catch (const torch_ar::RelaxationDiverged& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("loss gradient of the module's output 0"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("smaller eta"), std::string::npos) << msg;
    EXPECT_EQ(e.step(), 0);
    EXPECT_EQ(e.node(), "output 0");
  }
  c.raise_on_nonfinite = false;
  auto r = torch_ar::run_engine(k.in, keep(c));
  EXPECT_TRUE(r.stats.nonfinite);
  EXPECT_FALSE(r.stats.converged);
}

// The engine object: captured after the forward, run in the backward, it
// gives run_engine's gradients; a backward that wants other leaves than the
// forward assumed re-plans for them; without keep_graph it lets go.
TEST(Relaxation, CaptureOnceThenBackwardMatchesTheOneCallEngine) {
  for (bool literal : {false, true}) {
    Case k = chain();
    EngineConfig c;
    if (literal) {
      c.eta = 0.5;
      c.steps = 60;
      c.evaluation = torch_ar::Evaluation::Literal;
    }
    torch_ar::Relaxation r(c);
    const std::vector<bool> differentiable =
        r.capture(k.in.outputs, k.in.leaves, k.in.leaf_is_input, k.in.leaf_needs_grad, {}, {});
    ASSERT_EQ(differentiable, std::vector<bool>{true});
    torch_ar::EngineResult got;
    got.leaf_grads = r.backward(k.in.output_grads, k.in.leaf_needs_grad, {}, /*keep_graph=*/true);
    expect_matches(k, got, literal ? 1e-9 : 1e-12);
    EXPECT_EQ(r.stats().depth, k.depth);
    EXPECT_FALSE(r.released());
    // Fewer leaves wanted: re-planned, and the unwanted one gets nothing.
    std::vector<bool> fewer = {true, false, true, false};
    got.leaf_grads = r.backward(k.in.output_grads, fewer, {}, /*keep_graph=*/false);
    EXPECT_FALSE(got.leaf_grads[1].defined());
    EXPECT_FALSE(got.leaf_grads[3].defined());
    EXPECT_LT(rel_err(got.leaf_grads[0], k.expected[0]), literal ? 1e-9 : 1e-12);
    EXPECT_LT(rel_err(got.leaf_grads[2], k.expected[2]), 1e-12);
    EXPECT_TRUE(r.released());
    EXPECT_THROW(r.backward(k.in.output_grads, fewer, {}, false), c10::Error);
  }
}

TEST(Relaxation, OutputsThatReachNoWantedLeafAreNotDifferentiable) {
  Case k = chain();
  at::Tensor unrelated = param({2, 2}, 31) * 2.0;
  torch_ar::Relaxation r(EngineConfig{});
  std::vector<bool> needs = {true, true, true, true};
  const std::vector<bool> differentiable =
      r.capture({k.in.outputs[0], unrelated}, k.in.leaves, k.in.leaf_is_input, needs, {}, {});
  EXPECT_EQ(differentiable, (std::vector<bool>{true, false}));
}

TEST(Relaxation, SettingsAnswerWhatTheForwardMustDo) {
  EngineConfig exact;
  EXPECT_FALSE(exact.may_evaluate_layers_repeatedly());
  EXPECT_FALSE(exact.needs_forward_values());
  EXPECT_FALSE(exact.asks_for_relaxation());
  EngineConfig traced = exact;
  traced.trace = true;
  EXPECT_TRUE(traced.may_evaluate_layers_repeatedly());
  EXPECT_TRUE(traced.needs_forward_values());
  EXPECT_FALSE(traced.asks_for_relaxation());
  EngineConfig slow = exact;
  slow.eta = 0.1;
  slow.steps = 100;
  EXPECT_TRUE(slow.may_evaluate_layers_repeatedly());
  EXPECT_TRUE(slow.needs_forward_values());
  EXPECT_TRUE(slow.asks_for_relaxation());
  slow.init = torch_ar::InitMode::Zero;
  EXPECT_FALSE(slow.needs_forward_values());
  EngineConfig variant = exact;
  variant.use_backward_weights = true;
  EXPECT_TRUE(variant.may_evaluate_layers_repeatedly());
  EXPECT_TRUE(variant.asks_for_relaxation());
}

// The plan's seam: the structure planned for "a loss gradient at every
// output" and the gradients bound later give the plan made with them.
TEST(Plan, StructureThenBoundLossGradientsEqualsThePlanMadeWithThem) {
  Case k = chain();
  torch_ar::CapturedGraph g =
      torch_ar::capture_graph(k.in.outputs, k.in.leaves, k.in.leaf_is_input, k.in.leaf_needs_grad);
  torch_ar::Plan direct = torch_ar::make_plan(g, k.in.output_grads, torch_ar::Granularity::Layer);
  torch_ar::Plan seam =
      torch_ar::make_plan(g, std::vector<bool>{true}, torch_ar::Granularity::Layer);
  EXPECT_TRUE(torch_ar::expects_loss_gradients(seam, k.in.output_grads));
  EXPECT_FALSE(torch_ar::expects_loss_gradients(seam, {at::Tensor()}));
  torch_ar::bind_loss_gradients(seam, k.in.output_grads);
  ASSERT_EQ(seam.slots.size(), direct.slots.size());
  EXPECT_EQ(seam.depth, direct.depth);
  for (size_t s = 0; s < seam.slots.size(); ++s) {
    EXPECT_EQ(seam.slots[s].name, direct.slots[s].name);
    EXPECT_EQ(seam.slots[s].ext.defined(), direct.slots[s].ext.defined()) << s;
    if (direct.slots[s].ext.defined()) {
      EXPECT_TRUE(seam.slots[s].ext.equal(direct.slots[s].ext));
    }
  }
  // Binding again replaces what was bound before.
  torch_ar::bind_loss_gradients(seam, {k.in.output_grads[0] * 2.0});
  for (size_t s = 0; s < seam.slots.size(); ++s) {
    if (direct.slots[s].ext.defined()) {
      EXPECT_TRUE(seam.slots[s].ext.equal(direct.slots[s].ext * 2.0));
    }
  }
}

} // namespace

// A model split over devices: the rows come back in the caller's order, and
// the row indices are built once per call site, not on every update (a
// blocking host-to-device copy each time). Driven on the host: two device
// groups (CPU and meta) whose launch returns CPU rows.
TEST(PerDevice, RowsInCallerOrderWithTheIndexBuiltOnce) {
  const c10::Device cpu(c10::kCPU), meta(c10::kMeta);
  const std::vector<c10::Device> devices{cpu, meta, cpu, meta, meta};
  int launches = 0;
  auto launch = [&](const std::vector<size_t>& positions) {
    ++launches;
    at::Tensor part = at::empty({static_cast<int64_t>(positions.size()), 2}, at::kDouble);
    for (size_t k = 0; k < positions.size(); ++k) {
      part[k][0] = static_cast<double>(positions[k]);
      part[k][1] = 10.0 * static_cast<double>(positions[k]);
    }
    return part;
  };
  torch_ar::DeviceRowIndex cache;
  at::Tensor rows = torch_ar::launch_per_device(devices, launch, &cache);
  ASSERT_EQ(launches, 2);
  ASSERT_EQ(rows.size(0), 5);
  for (int64_t i = 0; i < 5; ++i) {
    EXPECT_EQ(rows[i][0].item<double>(), static_cast<double>(i));
    EXPECT_EQ(rows[i][1].item<double>(), 10.0 * static_cast<double>(i));
  }
  ASSERT_EQ(cache.index.size(), 2u);
  const void* built = cache.index[0].data_ptr();
  torch_ar::launch_per_device(devices, launch, &cache);
  EXPECT_EQ(cache.index[0].data_ptr(), built) << "the index was built again";
  // Other devices: built anew.
  const std::vector<c10::Device> other{cpu, meta, meta};
  at::Tensor again = torch_ar::launch_per_device(other, launch, &cache);
  EXPECT_EQ(cache.devices, other);
  for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(again[i][0].item<double>(), static_cast<double>(i));
}

// The closed form of the relaxation: its coefficients against direct
// polynomial arithmetic, and the engine's closed-form evaluation against the
// literal steps on hand-built graphs.
#include "engine/coefficients.h"
#include "engine/engine.h"
#include "engine/errors.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace {

using torch_ar::EngineConfig;
using torch_ar::EngineInputs;
using torch_ar::Evaluation;
using torch_ar::Schedule;
using Poly = std::vector<double>; // coefficients of J^0 .. J^K

// a * b, truncated at degree K (J^(K+1) = 0 on the graph).
Poly times(const Poly& a, const Poly& b, size_t K) {
  Poly c(K + 1, 0.0);
  for (size_t i = 0; i < a.size() && i <= K; ++i)
    for (size_t j = 0; j < b.size() && i + j <= K; ++j) c[i + j] += a[i] * b[j];
  return c;
}

Poly plus(const Poly& a, const Poly& b) {
  Poly c(std::max(a.size(), b.size()), 0.0);
  for (size_t i = 0; i < a.size(); ++i) c[i] += a[i];
  for (size_t i = 0; i < b.size(); ++i) c[i] += b[i];
  return c;
}

// The literal recursions on polynomials in J: x_{t+1} = A x_t + B b with
// Jacobi A = (1-eta) + eta J, B = eta; sweep A = (1-eta) N, B = eta N,
// N = (I - eta J)^-1 = sum eta^k J^k. Returns (coefficients of x0, of b).
std::pair<Poly, Poly> direct(Schedule schedule, double eta, int64_t T, size_t K) {
  Poly A, B;
  if (schedule == Schedule::Jacobi) {
    A = {1.0 - eta, eta};
    B = {eta};
  } else {
    Poly N(K + 1);
    for (size_t k = 0; k <= K; ++k) N[k] = std::pow(eta, static_cast<double>(k));
    A = times({1.0 - eta}, N, K);
    B = times({eta}, N, K);
  }
  Poly x0{1.0}, b{0.0};
  for (int64_t t = 0; t < T; ++t) {
    x0 = times(A, x0, K);
    b = plus(times(A, b, K), B);
  }
  x0.resize(K + 1, 0.0);
  b.resize(K + 1, 0.0);
  return {x0, b};
}

struct CoefCase {
  Schedule schedule;
  double eta;
  int64_t steps;
  int64_t max_power;
};

class Coefficients : public ::testing::TestWithParam<CoefCase> {};

TEST_P(Coefficients, EqualDirectPolynomialArithmetic) {
  const CoefCase c = GetParam();
  const auto got = torch_ar::horner_coefficients(c.schedule, c.eta, c.steps, c.max_power);
  const size_t K = got.initial.size() - 1;
  if (c.schedule == Schedule::Jacobi)
    EXPECT_EQ(K, static_cast<size_t>(std::min(c.steps, c.max_power)));
  else
    EXPECT_EQ(K, static_cast<size_t>(c.max_power));
  const auto [x0, b] = direct(c.schedule, c.eta, c.steps, c.max_power);
  for (size_t k = 0; k <= K; ++k) {
    EXPECT_NEAR(got.initial[k], x0[k], 1e-13 * std::max(1.0, std::abs(x0[k]))) << "k=" << k;
    EXPECT_NEAR(got.loss[k], b[k], 1e-13 * std::max(1.0, std::abs(b[k]))) << "k=" << k;
  }
  // Powers above min(T, K) have zero coefficients (Jacobi): none are returned.
  for (size_t k = K + 1; k < x0.size(); ++k) {
    EXPECT_EQ(x0[k], 0.0);
    EXPECT_EQ(b[k], 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Settings, Coefficients,
    ::testing::Values(CoefCase{Schedule::Jacobi, 0.1, 100, 3},
                      CoefCase{Schedule::Jacobi, 0.5, 3, 6}, CoefCase{Schedule::Jacobi, 0.9, 1, 4},
                      CoefCase{Schedule::Jacobi, 1.0, 2, 5}, CoefCase{Schedule::Jacobi, 1.0, 7, 5},
                      CoefCase{Schedule::Jacobi, 0.05, 1000, 12},
                      CoefCase{Schedule::Sweep, 0.1, 100, 3}, CoefCase{Schedule::Sweep, 0.5, 3, 6},
                      CoefCase{Schedule::Sweep, 0.9, 1, 4}, CoefCase{Schedule::Sweep, 1.0, 4, 5},
                      CoefCase{Schedule::Sweep, 0.05, 1000, 12},
                      CoefCase{Schedule::Sweep, 0.3, 40, 30}));

// A tail computed with long double from lgamma, term by term, for comparison.
long double reference_upper_tail(int64_t n, long double p, int64_t m) {
  long double sum = 0.0L;
  for (int64_t j = m; j <= n; ++j)
    sum += std::exp(std::lgamma(static_cast<long double>(n) + 1) -
                    std::lgamma(static_cast<long double>(j) + 1) -
                    std::lgamma(static_cast<long double>(n - j) + 1) + j * std::log(p) +
                    (n - j) * std::log1p(-p));
  return sum;
}

TEST(Coefficients, BinomialTailsAreAccurateFarIntoTheTail) {
  for (int64_t n : {10, 200, 3000}) {
    for (double p : {0.01, 0.1, 0.5}) {
      for (int64_t m : {int64_t(1), n / 10, n / 2, n - 1, n}) {
        const long double ref = reference_upper_tail(n, p, m);
        const double got = torch_ar::binomial_upper_tail(n, p, m);
        if (ref < 1e-300L) {
          EXPECT_LT(got, 1e-290) << n << " " << p << " " << m;
          continue;
        }
        EXPECT_NEAR(got / static_cast<double>(ref), 1.0, 1e-10) << n << " " << p << " " << m;
      }
    }
  }
}

TEST(Coefficients, StableForLongRelaxations) {
  // T = 100,000 steps, a few hundred powers: finite, in [0, 1], and the
  // b coefficients fall with k (a longer path needs more of the steps).
  for (Schedule s : {Schedule::Jacobi, Schedule::Sweep}) {
    for (double eta : {0.001, 0.1, 0.9}) {
      const auto c = torch_ar::horner_coefficients(s, eta, 100000, 300);
      ASSERT_EQ(c.loss.size(), 301u);
      for (size_t k = 0; k < c.loss.size(); ++k) {
        ASSERT_TRUE(std::isfinite(c.initial[k]) && std::isfinite(c.loss[k]));
        EXPECT_GE(c.initial[k], 0.0);
        EXPECT_LE(c.loss[k], 1.0);
        EXPECT_GE(c.loss[k], 0.0);
        if (k) {
          EXPECT_LE(c.loss[k], c.loss[k - 1] * (1.0 + 1e-15));
        }
      }
      // Jacobi at eta 0.001: Bin(1e5, 1e-3) has mean 100, so a path of 300
      // layers is far from reached, and the tail is small but not zero.
      if (s == Schedule::Jacobi && eta == 0.001) {
        const double ref = static_cast<double>(reference_upper_tail(100000, 0.001L, 301));
        EXPECT_NEAR(c.loss[300] / ref, 1.0, 1e-8);
        EXPECT_LT(c.loss[300], 1e-40);
      }
    }
  }
}

// --- the engine: closed form against literal steps -------------------------

at::Tensor param(std::vector<int64_t> shape, int seed) {
  at::manual_seed(seed);
  return at::randn(shape, at::kDouble).set_requires_grad(true);
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-300);
}

// x -> tanh -> relu -> tanh chain, a diamond into an add, and a weight used
// twice; the forward values are recorded for init="forward".
struct Graph {
  EngineInputs in;
};

Graph chain_graph() {
  Graph g;
  at::Tensor x = param({5, 4}, 1), w1 = param({6, 4}, 2), w2 = param({6, 6}, 3),
             w3 = param({6, 6}, 4), w4 = param({3, 6}, 5);
  at::Tensor h1 = at::tanh(at::mm(x, w1.t()));
  at::Tensor h2 = at::relu(at::mm(h1, w2.t()));
  at::Tensor h3 = at::tanh(at::mm(h2, w3.t()));
  at::Tensor y = at::mm(h3, w4.t());
  g.in.outputs = {y};
  g.in.output_grads = {param({5, 3}, 6).detach()};
  g.in.leaves = {w1, w2, w3, w4, x};
  g.in.leaf_is_input = {false, false, false, false, true};
  g.in.leaf_needs_grad = {true, true, true, true, true};
  g.in.forward_values = {h1, h2, h3, y};
  return g;
}

Graph diamond_graph() {
  Graph g;
  at::Tensor x = param({4, 3}, 11), w = param({5, 3}, 12), wa = param({5, 5}, 13),
             wb = param({5, 5}, 14), wc = param({2, 5}, 15);
  at::Tensor h = at::tanh(at::mm(x, w.t()));
  at::Tensor a = at::sigmoid(at::mm(h, wa.t()));
  at::Tensor s = a + at::mm(h, wb.t());
  at::Tensor y = at::mm(at::tanh(s), wc.t());
  g.in.outputs = {y, a}; // the branch is an output too, and used inside
  g.in.output_grads = {param({4, 2}, 16).detach(), param({4, 5}, 17).detach()};
  g.in.leaves = {w, wa, wb, wc, x};
  g.in.leaf_is_input = {false, false, false, false, true};
  g.in.leaf_needs_grad = {true, true, true, true, false};
  g.in.forward_values = {h, a, s};
  return g;
}

Graph shared_weight_graph() {
  Graph g;
  at::Tensor x = param({3, 4}, 21), w = param({4, 4}, 22), v = param({2, 4}, 23);
  at::Tensor h = at::tanh(at::mm(x, w.t()));
  at::Tensor k = at::tanh(at::mm(h, w.t()));
  at::Tensor y = at::mm(k, v.t());
  g.in.outputs = {y};
  g.in.output_grads = {param({3, 2}, 24).detach()};
  g.in.leaves = {w, v, x};
  g.in.leaf_is_input = {false, false, true};
  g.in.leaf_needs_grad = {true, true, false};
  g.in.forward_values = {h, k};
  return g;
}

struct Setting {
  Schedule schedule;
  torch_ar::InitMode init;
  double eta;
  int64_t steps;
};

class ClosedFormOnGraph : public ::testing::TestWithParam<Graph (*)()> {};

TEST_P(ClosedFormOnGraph, EqualsLiteralSteps) {
  Graph g = GetParam()();
  for (Schedule schedule : {Schedule::Jacobi, Schedule::Sweep}) {
    for (auto init : {torch_ar::InitMode::Forward, torch_ar::InitMode::Zero}) {
      for (double eta : {0.05, 0.1, 0.5, 0.9, 1.0}) {
        for (int64_t steps : {1, 2, 3, 4, 100, 1000}) {
          EngineConfig c;
          c.keep_graph = true;
          c.schedule = schedule;
          c.init = init;
          c.eta = eta;
          c.steps = steps;
          c.evaluation = Evaluation::Literal;
          auto literal = torch_ar::run_engine(g.in, c);
          c.evaluation = Evaluation::ClosedForm;
          auto closed = torch_ar::run_engine(g.in, c);
          ASSERT_EQ(literal.stats.evaluation, Evaluation::Literal);
          EXPECT_EQ(closed.stats.steps, steps);
          if (closed.stats.evaluation != Evaluation::ExactSweep) {
            ASSERT_EQ(closed.stats.evaluation, Evaluation::ClosedForm);
            EXPECT_LT(closed.stats.sweeps, std::max<int64_t>(closed.stats.depth, 1));
          } else {
            // The exact sweep is the closed form at eta 1 with enough steps.
            EXPECT_EQ(eta, 1.0);
          }
          for (size_t i = 0; i < literal.leaf_grads.size(); ++i) {
            ASSERT_EQ(literal.leaf_grads[i].defined(), closed.leaf_grads[i].defined());
            if (!literal.leaf_grads[i].defined()) continue;
            EXPECT_LT(rel_err(closed.leaf_grads[i], literal.leaf_grads[i]), 1e-12)
                << "leaf " << i << " eta " << eta << " steps " << steps << " schedule "
                << static_cast<int>(schedule) << " init " << static_cast<int>(init);
          }
        }
      }
    }
  }
}

TEST_P(ClosedFormOnGraph, ResidualIsWhatTheNextStepWouldMeasure) {
  // The closed form reports the residual of x_T; the literal loop's residual
  // after T + 1 steps is that same quantity.
  Graph g = GetParam()();
  EngineConfig c;
  c.keep_graph = true;
  c.eta = 0.3;
  c.steps = 12;
  auto closed = torch_ar::run_engine(g.in, c);
  ASSERT_EQ(closed.stats.evaluation, Evaluation::ClosedForm);
  c.evaluation = Evaluation::Literal;
  c.steps = 13;
  auto literal = torch_ar::run_engine(g.in, c);
  EXPECT_NEAR(closed.stats.max_residual, literal.stats.max_residual,
              1e-10 * literal.stats.max_residual);
  EXPECT_GT(closed.stats.max_residual, 1e-6);
  EXPECT_FALSE(closed.stats.converged);
}

std::string graph_name(const ::testing::TestParamInfo<Graph (*)()>& info) {
  static const char* const names[] = {"Chain", "Diamond", "SharedWeight"};
  return names[info.index];
}

INSTANTIATE_TEST_SUITE_P(HandBuilt, ClosedFormOnGraph,
                         ::testing::Values(&chain_graph, &diamond_graph, &shared_weight_graph),
                         graph_name);

TEST(ClosedForm, AutoPicksTheClosedFormForExplicitSteps) {
  Graph g = chain_graph();
  EngineConfig c;
  c.keep_graph = true;
  c.eta = 0.1;
  c.steps = 100;
  EXPECT_EQ(torch_ar::run_engine(g.in, c).stats.evaluation, Evaluation::ClosedForm);
  c.trace = true;
  EXPECT_EQ(torch_ar::run_engine(g.in, c).stats.evaluation, Evaluation::Literal);
  c.trace = false;
  c.tol = 1e-6;
  c.steps = -1;
  EXPECT_EQ(torch_ar::run_engine(g.in, c).stats.evaluation, Evaluation::Literal);
  c.tol = -1;
  c.eta = 1.0;
  c.steps = -1;
  EXPECT_EQ(torch_ar::run_engine(g.in, c).stats.evaluation, Evaluation::ExactSweep);
  c.steps = 2; // fewer than D = 3 at eta 1: not exact, the closed form of 2 steps
  EXPECT_EQ(torch_ar::run_engine(g.in, c).stats.evaluation, Evaluation::ClosedForm);
}

TEST(ClosedForm, NanLossGradientIsNamedAndOtherwiseCarried) {
  Graph g = chain_graph();
  g.in.output_grads[0] = at::full_like(g.in.output_grads[0], NAN);
  EngineConfig c;
  c.keep_graph = true;
  c.eta = 0.5;
  c.steps = 5;
  try {
    torch_ar::run_engine(g.in, c);
    FAIL() << "expected an error";
  } catch (const torch_ar::RelaxationDiverged& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("loss gradient"), std::string::npos) << msg;
    EXPECT_EQ(e.node(), "output 0");
    EXPECT_EQ(e.step(), 0);
  }
  c.raise_on_nonfinite = false;
  auto r = torch_ar::run_engine(g.in, c);
  EXPECT_TRUE(r.stats.nonfinite);
  EXPECT_FALSE(r.stats.converged);
}

} // namespace

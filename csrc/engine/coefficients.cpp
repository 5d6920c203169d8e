#include "engine/coefficients.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace torch_ar {

namespace {

// log C(n, j) as a sum of j logs: a few ulps however large n is (lgamma(n)
// would lose ~n * 1e-16 in absolute terms).
double log_choose(int64_t n, int64_t j) {
  if (j < 0 || j > n) return -std::numeric_limits<double>::infinity();
  j = std::min(j, n - j);
  double s = 0.0;
  for (int64_t i = 1; i <= j; ++i)
    s += std::log(static_cast<double>(n - j + i) / static_cast<double>(i));
  return s;
}

// P[Bin(n, p) = j] for 0 < p <= 1.
double binomial_pmf(int64_t n, double p, int64_t j) {
  if (j < 0 || j > n) return 0.0;
  if (p == 1.0) return j == n ? 1.0 : 0.0;
  const double log_q = std::log1p(-p);
  return std::exp(log_choose(n, j) + static_cast<double>(j) * std::log(p) +
                  static_cast<double>(n - j) * log_q);
}

} // namespace

double binomial_upper_tail(int64_t n, double p, int64_t m) {
  if (m <= 0) return 1.0;
  if (m > n) return 0.0;
  if (p == 1.0) return 1.0;
  const double log_p = std::log(p);
  const double log_q = std::log1p(-p);
  // Lower part P[X < m]: m terms, log C(n, j) built up one factor at a time.
  double lower = 0.0;
  double log_choose_j = 0.0; // log C(n, 0)
  for (int64_t j = 0; j < m; ++j) {
    lower += std::exp(log_choose_j + static_cast<double>(j) * log_p +
                      static_cast<double>(n - j) * log_q);
    log_choose_j += std::log(static_cast<double>(n - j) / static_cast<double>(j + 1));
  }
  if (lower <= 0.5) return 1.0 - lower; // the tail is >= 0.5: no cancellation
  // The tail is small: past the median the terms fall; sum them from m up,
  // each from the previous by the ratio of consecutive binomial terms.
  const double odds = p / (1.0 - p);
  double term =
      std::exp(log_choose_j + static_cast<double>(m) * log_p + static_cast<double>(n - m) * log_q);
  double tail = 0.0;
  for (int64_t j = m; j <= n && term > 0.0; ++j) {
    tail += term;
    if (term < tail * 1e-18) break;
    term *= static_cast<double>(n - j) / static_cast<double>(j + 1) * odds;
  }
  return tail;
}

HornerCoefficients horner_coefficients(Schedule schedule, double eta, int64_t steps,
                                       int64_t max_power) {
  TORCH_CHECK(eta > 0.0 && eta <= 1.0, "torch_ar: eta must be in (0, 1], got ", eta);
  TORCH_CHECK(steps >= 1, "torch_ar: the closed form needs steps >= 1, got ", steps);
  TORCH_CHECK(max_power >= 0, "torch_ar: max_power must be >= 0, got ", max_power);
  HornerCoefficients c;
  if (schedule == Schedule::Jacobi) {
    // J^k needs k of the T steps: powers above T never appear.
    const int64_t K = std::min(max_power, steps);
    for (int64_t k = 0; k <= K; ++k) {
      c.initial.push_back(binomial_pmf(steps, eta, k));
      c.loss.push_back(binomial_upper_tail(steps, eta, k + 1));
    }
    return c;
  }
  const double log_q = eta < 1.0 ? std::log1p(-eta) : 0.0;
  for (int64_t k = 0; k <= max_power; ++k) {
    // (1-eta)^T C(T+k-1, k) eta^k; zero at eta = 1 (T >= 1).
    c.initial.push_back(eta == 1.0 ? 0.0
                                   : std::exp(static_cast<double>(steps) * log_q +
                                              log_choose(steps + k - 1, k) +
                                              static_cast<double>(k) * std::log(eta)));
    c.loss.push_back(binomial_upper_tail(steps + k, eta, k + 1));
  }
  return c;
}

} // namespace torch_ar

#pragma once
// The coefficients of the closed-form relaxation (engine/closed_form.cpp).
//
// With frozen Jacobians the relaxation is linear: x_{t+1} = A x_t + eta b.
// J, the map "each state receives the sum of its consumers' input-VJPs", is
// nilpotent on a DAG, so after T steps
//   x_T = sum_{k=0}^{K} J^k (initial[k] x_0 + loss[k] b),
// a polynomial in J that Horner's rule evaluates with K applications of J.
//   Jacobi (A = (1-eta) I + eta J):
//     initial[k] = C(T,k) (1-eta)^(T-k) eta^k   = P[Bin(T, eta) = k]
//     loss[k]    = eta sum_{s<T} C(s,k) (1-eta)^(s-k) eta^k
//                = P[Bin(T, eta) >= k+1]
//   Sweep (reverse-topological Gauss-Seidel, x_{t+1} = (1-eta) x_t + eta (b + J x_{t+1})):
//     initial[k] = (1-eta)^T C(T+k-1,k) eta^k
//     loss[k]    = eta sum_{s<T} (1-eta)^s C(s+k,k) eta^k
//                = P[Bin(T+k, eta) >= k+1]
// Computed in double from log-binomials (sums of logs, exact to a few ulps
// for the k that matter) and binomial tails summed from their small end, so
// they stay accurate for T up to 1e5 and more and K up to thousands.

#include "engine/config.h"

#include <cstdint>
#include <vector>

namespace torch_ar {

struct HornerCoefficients {
  std::vector<double> initial; // coefficient of J^k x_0, k = 0..K
  std::vector<double> loss;    // coefficient of J^k b
};

// max_power: the largest power of J that can be nonzero (the longest chain
// of relaxing states minus one). The result has min(K, ...) + 1 entries
// where K = max_power, or fewer for Jacobi with steps < max_power (J^k with
// k > T never appears).
HornerCoefficients horner_coefficients(Schedule schedule, double eta, int64_t steps,
                                       int64_t max_power);

// P[Bin(n, p) >= m], accurate in relative terms however small it is.
double binomial_upper_tail(int64_t n, double p, int64_t m);

} // namespace torch_ar

// CPU kernel of torch_ar::horner_update_: one pass over each state computes
// the Horner stage (ops/relax_math.h), flushes tiny values and accumulates
// the norms in double. Chunks of all states share one parallel_for
// (cpu/multi_tensor.h); absent inputs read a block of zeros, so every chunk
// runs the same loop.

#include "cpu/multi_tensor.h"
#include "ops/horner_update.h"
#include "ops/relax_math.h"

#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

namespace rm = relax_math;

struct Norms {
  double out = 0.0;
  double residual = 0.0;
  double target = 0.0;
  double nonfinite = 0.0;
};

// Pointers of one item, each already offset to the item's first element.
template <typename scalar_t>
struct Operands {
  scalar_t* out;
  const scalar_t* x0;
  const scalar_t* b;
  const scalar_t* t;
  const scalar_t* r;
};

template <typename scalar_t>
Norms horner_scalar(const Operands<scalar_t>& p, int64_t n, double alpha, double beta,
                    double flush_below, bool residual) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t a = static_cast<opmath_t>(alpha);
  const opmath_t c = static_cast<opmath_t>(beta);
  const opmath_t flush = static_cast<opmath_t>(flush_below);
  Norms acc;
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t b = static_cast<opmath_t>(p.b[i]);
    opmath_t y =
        rm::horner_stage(a, static_cast<opmath_t>(p.x0[i]), c, b, static_cast<opmath_t>(p.t[i]));
    const scalar_t stored = static_cast<scalar_t>(rm::flush_tiny(y, flush));
    p.out[i] = stored;
    const double yd = static_cast<double>(static_cast<opmath_t>(stored));
    acc.out += yd * yd;
    acc.nonfinite += std::isfinite(yd) ? 0.0 : 1.0;
    if (residual) {
      const opmath_t target = rm::add(b, static_cast<opmath_t>(p.r[i]));
      const double dd = static_cast<double>(rm::sub(target, static_cast<opmath_t>(stored)));
      const double td = static_cast<double>(target);
      acc.residual += dd * dd;
      acc.target += td * td;
      acc.nonfinite += std::isfinite(td) ? 0.0 : 1.0;
    }
  }
  return acc;
}

// float and double: eight lanes in two vectors of four, each with its own
// double sums (multi_tensor_cpu::Quad). Same operations, same order as the
// scalar path, element by element.
template <typename scalar_t>
Norms horner_vec(const Operands<scalar_t>& p, int64_t n, double alpha, double beta,
                 double flush_below, bool residual) {
  using quad_t = typename multi_tensor_cpu::Quad<scalar_t>::type;
  using dquad_t = multi_tensor_cpu::Quad<double>::type;
  const quad_t a = quad_t{} + static_cast<scalar_t>(alpha);
  const quad_t c = quad_t{} + static_cast<scalar_t>(beta);
  const quad_t flush = quad_t{} + static_cast<scalar_t>(flush_below);
  const quad_t zero{};
  dquad_t out_lanes[2] = {};
  dquad_t res_lanes[2] = {};
  dquad_t tgt_lanes[2] = {};
  dquad_t bad_lanes[2] = {}; // minus the count of NaN/Inf (a true compare is -1)
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int h = 0; h < 2; ++h) {
      quad_t x0, b, t;
      std::memcpy(&x0, p.x0 + i + 4 * h, sizeof(quad_t));
      std::memcpy(&b, p.b + i + 4 * h, sizeof(quad_t));
      std::memcpy(&t, p.t + i + 4 * h, sizeof(quad_t));
      const quad_t finite = (x0 - x0 == zero) ? x0 : zero;
      quad_t y = a * finite + c * b + t;
      y = ((y < flush) & (y > -flush)) ? zero : y;
      std::memcpy(p.out + i + 4 * h, &y, sizeof(quad_t));
      const dquad_t yd = __builtin_convertvector(y, dquad_t);
      out_lanes[h] += yd * yd;
      bad_lanes[h] += __builtin_convertvector(y - y != zero, dquad_t);
      if (residual) {
        quad_t r;
        std::memcpy(&r, p.r + i + 4 * h, sizeof(quad_t));
        const quad_t target = b + r;
        const dquad_t dd = __builtin_convertvector(target - y, dquad_t);
        const dquad_t td = __builtin_convertvector(target, dquad_t);
        res_lanes[h] += dd * dd;
        tgt_lanes[h] += td * td;
        bad_lanes[h] += __builtin_convertvector(target - target != zero, dquad_t);
      }
    }
  }
  Operands<scalar_t> tail{p.out + i, p.x0 + i, p.b + i, p.t + i, p.r + i};
  Norms acc = horner_scalar<scalar_t>(tail, n - i, alpha, beta, flush_below, residual);
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 4; ++k) {
      acc.out += out_lanes[h][k];
      acc.residual += res_lanes[h][k];
      acc.target += tgt_lanes[h][k];
      acc.nonfinite -= bad_lanes[h][k];
    }
  }
  return acc;
}

template <typename scalar_t>
Norms horner_range(const Operands<scalar_t>& p, int64_t n, double alpha, double beta,
                   double flush_below, bool residual) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return horner_vec<scalar_t>(p, n, alpha, beta, flush_below, residual);
  } else {
    return horner_scalar<scalar_t>(p, n, alpha, beta, flush_below, residual);
  }
}

at::Tensor horner_update_cpu(at::TensorList out, const horner_update_detail::OptionalList& initial,
                             const horner_update_detail::OptionalList& loss_terms,
                             const horner_update_detail::OptionalList& targets,
                             const horner_update_detail::OptionalList& residual_targets,
                             double alpha, double beta, double flush_below, bool residual) {
  auto in = horner_update_detail::check_inputs(out, initial, loss_terms, targets, residual_targets,
                                               flush_below, c10::DeviceType::CPU);
  std::vector<int64_t> numels;
  for (const at::Tensor& t : in.out) numels.push_back(t.numel());
  // Absent inputs read zeros: all-zero bits are 0.0 in every floating dtype.
  alignas(64) static const double zero_block[multi_tensor_cpu::kChunkElements] = {};
  at::Tensor norms = multi_tensor_cpu::sum_over_chunks<4>(
      numels, [&](const multi_tensor_cpu::Chunk& chunk) -> std::array<double, 4> {
        const int64_t i = chunk.tensor;
        Norms sums;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, in.out[i].scalar_type(), "horner_update_cpu", [&] {
              const auto* zero = reinterpret_cast<const scalar_t*>(zero_block);
              auto read = [&](const at::Tensor& t) -> const scalar_t* {
                return t.defined() ? t.const_data_ptr<scalar_t>() + chunk.begin : zero;
              };
              Operands<scalar_t> ops{in.out[i].mutable_data_ptr<scalar_t>() + chunk.begin,
                                     read(in.initial[i]), read(in.loss_terms[i]),
                                     read(in.targets[i]), read(in.residual_targets[i])};
              sums = horner_range<scalar_t>(ops, chunk.size(), alpha, beta, flush_below, residual);
            });
        return {sums.out, sums.residual, sums.target, sums.nonfinite};
      });
  horner_update_detail::write_back(out, in.out);
  // Norms of the output, residual and target; the non-finite count stays a count.
  norms.narrow(1, 0, 3).sqrt_();
  return norms;
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CPU, m) {
  m.impl("horner_update_", &horner_update_cpu);
}

} // namespace torch_ar

// CUDA kernel of torch_ar::horner_update_: every state of the list in one
// launch (multi_tensor.cuh), with each tensor's output, residual and target
// norms and its count of non-finite values reduced in a fixed order. The
// arithmetic is ops/relax_math.h, shared with the CPU kernel.

#include "ops/horner_update.h"
#include "ops/relax_math.h"

#include "multi_tensor.cuh"

#include <vector>

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

namespace mt = multi_tensor;
namespace rm = relax_math;

struct HornerSlot {
  void* out;
  const void* x0; // nullptr: absent (zero)
  const void* b;
  const void* t;
  const void* r;
  int64_t numel;
  int32_t element_type;
};
constexpr int kLargeTable = 256;

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> load_or_zero(const void* p, int64_t i) {
  using opmath_t = at::opmath_type<scalar_t>;
  return p ? static_cast<opmath_t>(static_cast<const scalar_t*>(p)[i]) : opmath_t(0);
}

template <typename scalar_t>
__device__ void horner_chunk(const HornerSlot& slot, int64_t begin, int64_t end, double alpha,
                             double beta, double flush_below, bool residual, double& out_sq,
                             double& res_sq, double& tgt_sq, double& bad) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t a = static_cast<opmath_t>(alpha);
  const opmath_t c = static_cast<opmath_t>(beta);
  const opmath_t flush = static_cast<opmath_t>(flush_below);
  scalar_t* out = static_cast<scalar_t*>(slot.out);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const opmath_t b = load_or_zero<scalar_t>(slot.b, i);
    const opmath_t y = rm::flush_tiny(rm::horner_stage(a, load_or_zero<scalar_t>(slot.x0, i), c, b,
                                                       load_or_zero<scalar_t>(slot.t, i)),
                                      flush);
    const scalar_t stored = static_cast<scalar_t>(y);
    out[i] = stored;
    const opmath_t ys = static_cast<opmath_t>(stored);
    out_sq += static_cast<double>(ys) * static_cast<double>(ys);
    bad += isfinite(static_cast<double>(ys)) ? 0.0 : 1.0;
    if (residual) {
      const opmath_t target = rm::add(b, load_or_zero<scalar_t>(slot.r, i));
      const double d = static_cast<double>(rm::sub(target, ys));
      res_sq += d * d;
      tgt_sq += static_cast<double>(target) * static_cast<double>(target);
      bad += isfinite(static_cast<double>(target)) ? 0.0 : 1.0;
    }
  }
}

// Per chunk: the output's, residual's and target's sums of squares and the
// count of non-finite values.
template <int Capacity>
__global__ void __launch_bounds__(mt::kThreads)
    horner_update_kernel(const __grid_constant__ mt::Table<HornerSlot, Capacity> table,
                         double* __restrict__ chunk_sums, double alpha, double beta,
                         double flush_below, bool residual) {
  mt::for_each_chunk<4>(
      table, chunk_sums, [&](const HornerSlot& slot, const mt::ChunkRange& range, double* sums) {
        mt::with_element_type(slot.element_type, [&](auto element) {
          horner_chunk<decltype(element)>(slot, range.begin, range.end, alpha, beta, flush_below,
                                          residual, sums[0], sums[1], sums[2], sums[3]);
        });
      });
}

at::Tensor horner_update_cuda(at::TensorList out, const horner_update_detail::OptionalList& initial,
                              const horner_update_detail::OptionalList& loss_terms,
                              const horner_update_detail::OptionalList& targets,
                              const horner_update_detail::OptionalList& residual_targets,
                              double alpha, double beta, double flush_below, bool residual) {
  auto in = horner_update_detail::check_inputs(out, initial, loss_terms, targets, residual_targets,
                                               flush_below, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(out[0].device());
  const size_t n = out.size();
  auto ptr = [](const at::Tensor& t) -> const void* {
    return t.defined() ? t.const_data_ptr() : nullptr;
  };
  std::vector<HornerSlot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    slots[i] = {in.out[i].data_ptr(),
                ptr(in.initial[i]),
                ptr(in.loss_terms[i]),
                ptr(in.targets[i]),
                ptr(in.residual_targets[i]),
                in.out[i].numel(),
                mt::element_type_of(in.out[i].scalar_type(), "horner_update_")};
  }
  // Columns: three norms, then the non-finite count.
  at::Tensor norms = mt::launch_all<4, 3>(
      horner_update_kernel<mt::kSmallTable>, horner_update_kernel<kLargeTable>, slots,
      out[0].options().dtype(at::kDouble), alpha, beta, flush_below, residual);
  horner_update_detail::write_back(out, in.out);
  return norms;
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CUDA, m) {
  m.impl("horner_update_", &horner_update_cuda);
}

} // namespace torch_ar

// CUDA kernel of torch_ar::horner_update_: every state of the list in one
// launch. The per-tensor table travels in the kernel's parameters (no
// host-to-device copy, so a launch can be part of a CUDA graph). Blocks
// stride over fixed-size chunks of all tensors; each chunk writes its
// partial sums of squares to its own slot, and a second launch adds each
// tensor's slots in chunk order: the norms are the same on every run (no
// floating-point atomics). The arithmetic is ops/relax_math.h, shared with
// the CPU kernel.

#include "ops/horner_update.h"
#include "ops/relax_math.h"

#include <algorithm>
#include <mutex>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

namespace rm = relax_math;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunkElements = 4096;

enum ElementType : int32_t {
  kElementFloat = 0,
  kElementDouble = 1,
  kElementHalf = 2,
  kElementBFloat16 = 3,
};

struct HornerSlot {
  void* out;
  const void* x0;  // nullptr: absent (zero)
  const void* b;
  const void* t;
  const void* r;
  int64_t numel;
  int32_t element_type;
};

template <int Capacity>
struct HornerTable {
  HornerSlot tensors[Capacity];
  int64_t first_chunk[Capacity + 1];
  int32_t num_tensors;
};
constexpr int kSmallTable = 16;
constexpr int kLargeTable = 256;
static_assert(sizeof(HornerTable<kLargeTable>) < 32000, "kernel parameters over 32 KB");

int32_t element_type_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kElementFloat;
    case at::kDouble:
      return kElementDouble;
    case at::kHalf:
      return kElementHalf;
    case at::kBFloat16:
      return kElementBFloat16;
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "horner_update_: unchecked dtype ", dtype);
  return -1;
}

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> load_or_zero(const void* p, int64_t i) {
  using opmath_t = at::opmath_type<scalar_t>;
  return p ? static_cast<opmath_t>(static_cast<const scalar_t*>(p)[i]) : opmath_t(0);
}

template <typename scalar_t>
__device__ void horner_chunk(
    const HornerSlot& slot, int64_t begin, int64_t end, double alpha, double beta,
    double flush_below, bool residual, double& out_sq, double& res_sq, double& tgt_sq,
    double& bad) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t a = static_cast<opmath_t>(alpha);
  const opmath_t c = static_cast<opmath_t>(beta);
  const opmath_t flush = static_cast<opmath_t>(flush_below);
  scalar_t* out = static_cast<scalar_t*>(slot.out);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const opmath_t b = load_or_zero<scalar_t>(slot.b, i);
    const opmath_t y = rm::flush_tiny(
        rm::horner_stage(a, load_or_zero<scalar_t>(slot.x0, i), c, b,
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

// Sum over the block in a fixed order (warp shuffles, then the warps' sums).
__device__ double block_sum(double value, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < kWarps ? shared[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2)
      value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // `shared` is reused by the next call
  return value;
}

template <int Capacity>
__device__ int32_t tensor_of_chunk(const HornerTable<Capacity>& table, int64_t chunk) {
  int32_t lo = 0;
  int32_t hi = table.num_tensors - 1;
  while (lo < hi) {  // the last tensor whose first chunk is <= chunk
    const int32_t mid = (lo + hi + 1) / 2;
    if (table.first_chunk[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <int Capacity>
__global__ void __launch_bounds__(kThreads) horner_update_kernel(
    const __grid_constant__ HornerTable<Capacity> table, double alpha, double beta,
    double flush_below, bool residual, double* __restrict__ chunk_sums) {
  __shared__ double shared[kWarps];
  const int64_t num_chunks = table.first_chunk[table.num_tensors];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int32_t t = tensor_of_chunk(table, c);
    const HornerSlot& slot = table.tensors[t];
    const int64_t begin = (c - table.first_chunk[t]) * kChunkElements;
    const int64_t end = min(begin + kChunkElements, slot.numel);
    double out_sq = 0.0, res_sq = 0.0, tgt_sq = 0.0, bad = 0.0;
    switch (slot.element_type) {  // uniform over the block: no divergence
      case kElementFloat:
        horner_chunk<float>(slot, begin, end, alpha, beta, flush_below, residual, out_sq, res_sq, tgt_sq, bad);
        break;
      case kElementDouble:
        horner_chunk<double>(slot, begin, end, alpha, beta, flush_below, residual, out_sq, res_sq, tgt_sq, bad);
        break;
      case kElementHalf:
        horner_chunk<c10::Half>(slot, begin, end, alpha, beta, flush_below, residual, out_sq, res_sq, tgt_sq, bad);
        break;
      case kElementBFloat16:
        horner_chunk<c10::BFloat16>(slot, begin, end, alpha, beta, flush_below, residual, out_sq, res_sq, tgt_sq, bad);
        break;
    }
    out_sq = block_sum(out_sq, shared);
    res_sq = block_sum(res_sq, shared);
    tgt_sq = block_sum(tgt_sq, shared);
    bad = block_sum(bad, shared);
    if (threadIdx.x == 0) {
      chunk_sums[4 * c] = out_sq;
      chunk_sums[4 * c + 1] = res_sq;
      chunk_sums[4 * c + 2] = tgt_sq;
      chunk_sums[4 * c + 3] = bad;
    }
  }
}

// One thread per (tensor, column): adds the tensor's chunk sums in order.
template <int Capacity>
__global__ void norms_from_chunks_kernel(
    const __grid_constant__ HornerTable<Capacity> table, const double* __restrict__ chunk_sums,
    double* __restrict__ norms) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= 4 * table.num_tensors) return;
  const int t = index / 4;
  const int column = index % 4;
  double sum = 0.0;
  for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c)
    sum += chunk_sums[4 * c + column];
  norms[index] = column == 3 ? sum : sqrt(sum);  // the last column is a count
}

// Blocks of the kernel the device holds at once, asked once per device: a
// larger grid would only queue behind the resident blocks.
template <int Capacity>
int64_t resident_blocks() {
  static std::mutex mutex;
  static std::vector<int64_t> cache;
  const int device = at::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() <= static_cast<size_t>(device)) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, horner_update_kernel<Capacity>, kThreads, 0));
    cache[device] = int64_t(std::max(per_sm, 1)) *
        at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }
  return cache[device];
}

template <int Capacity>
void launch(const std::vector<HornerSlot>& slots, size_t first, size_t count, double alpha,
            double beta, double flush_below, bool residual, double* norms,
            const at::TensorOptions& options) {
  HornerTable<Capacity> table{};
  table.num_tensors = static_cast<int32_t>(count);
  table.first_chunk[0] = 0;
  for (size_t k = 0; k < count; ++k) {
    table.tensors[k] = slots[first + k];
    table.first_chunk[k + 1] =
        table.first_chunk[k] + (slots[first + k].numel + kChunkElements - 1) / kChunkElements;
  }
  const int64_t num_chunks = table.first_chunk[count];
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor chunk_sums = at::empty({std::max<int64_t>(num_chunks, 1), 4}, options);
  if (num_chunks > 0) {
    const int64_t grid = std::min<int64_t>(num_chunks, resident_blocks<Capacity>());
    horner_update_kernel<Capacity><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        table, alpha, beta, flush_below, residual, chunk_sums.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    chunk_sums.zero_();
  }
  const int threads = 4 * static_cast<int>(count);
  norms_from_chunks_kernel<Capacity><<<(threads + 127) / 128, 128, 0, stream>>>(
      table, chunk_sums.const_data_ptr<double>(), norms + 4 * first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor horner_update_cuda(
    at::TensorList out,
    const horner_update_detail::OptionalList& initial,
    const horner_update_detail::OptionalList& loss_terms,
    const horner_update_detail::OptionalList& targets,
    const horner_update_detail::OptionalList& residual_targets,
    double alpha,
    double beta,
    double flush_below,
    bool residual) {
  auto in = horner_update_detail::check_inputs(
      out, initial, loss_terms, targets, residual_targets, flush_below, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(out[0].device());
  const size_t n = out.size();
  auto ptr = [](const at::Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  std::vector<HornerSlot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    slots[i] = {in.out[i].data_ptr(), ptr(in.initial[i]), ptr(in.loss_terms[i]),
                ptr(in.targets[i]), ptr(in.residual_targets[i]), in.out[i].numel(),
                element_type_of(in.out[i].scalar_type())};
  }
  const auto options = out[0].options().dtype(at::kDouble);
  at::Tensor norms = at::empty({static_cast<int64_t>(n), 4}, options);
  double* norms_ptr = norms.mutable_data_ptr<double>();
  if (n <= static_cast<size_t>(kSmallTable)) {
    launch<kSmallTable>(slots, 0, n, alpha, beta, flush_below, residual, norms_ptr, options);
  } else {
    for (size_t first = 0; first < n; first += kLargeTable)
      launch<kLargeTable>(slots, first, std::min<size_t>(kLargeTable, n - first), alpha, beta,
                          flush_below, residual, norms_ptr, options);
  }
  horner_update_detail::write_back(out, in.out);
  return norms;
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CUDA, m) {
  m.impl("horner_update_", &horner_update_cuda);
}

} // namespace torch_ar

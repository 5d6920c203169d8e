// CUDA kernels of torch_ar::relax_update_ and relax_update_activation_:
// every state of the list is updated by one launch. The per-tensor table
// (pointers, sizes, fused activation) travels in the kernel's parameters, so
// a launch needs no host-to-device copy and can be recorded into a CUDA graph
// and replayed. Blocks stride over fixed-size chunks of all tensors, update
// them in place and write f'(a) * x where a state has an activation; each
// chunk writes its sums of squares to a slot of its own, and a second launch
// adds each tensor's slots in chunk order, so the norms (and a tolerance
// stop) are the same on every run. The per-element arithmetic is
// ops/relax_math.h, which the CPU kernel runs too: the CUDA kernel differs
// from it only in how it walks memory and reduces. Nothing waits on the device.

#include "ops/relax_math.h"
#include "ops/relax_update.h"

#include <algorithm>
#include <mutex>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
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
// 16 elements per thread per chunk: small enough that a single mid-sized
// state still spreads over all SMs.
constexpr int64_t kChunkElements = 4096;

enum ElementType : int32_t {
  kElementFloat = 0,
  kElementDouble = 1,
  kElementHalf = 2,
  kElementBFloat16 = 3,
};

struct TensorSlot {
  void* state;
  const void* target;
  const void* activation_input;  // nullptr: no activation
  void* activation_grad;
  int64_t numel;
  int32_t element_type;
  int32_t activation_kind;
  double p0;  // double: a float64 state must see the exact slope/bounds
  double p1;
};

// The launch's tensors, passed by value. Kernel parameters may take up to
// 32 KB since CUDA 12.1 (Volta and newer); two sizes keep small launches
// cheap. first_chunk holds the prefix sums of the tensors' chunk counts.
template <int Capacity>
struct LaunchTable {
  TensorSlot tensors[Capacity];
  int64_t first_chunk[Capacity + 1];
  int32_t num_tensors;
};
constexpr int kSmallTable = 16;
constexpr int kLargeTable = 320;
static_assert(sizeof(LaunchTable<kLargeTable>) < 32000, "kernel parameters over 32 KB");

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
  TORCH_INTERNAL_ASSERT(false, "relax_update_: unchecked dtype ", dtype);
  return -1;
}

template <typename scalar_t>
__device__ void relax_chunk(
    const TensorSlot& slot,
    int64_t begin,
    int64_t end,
    double eta,
    double flush_below,
    double& residual_sq,
    double& target_sq) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* state = static_cast<scalar_t*>(slot.state);
  const scalar_t* target = static_cast<const scalar_t*>(slot.target);
  const scalar_t* act_in = static_cast<const scalar_t*>(slot.activation_input);
  scalar_t* act_grad = static_cast<scalar_t*>(slot.activation_grad);
  const opmath_t eta_c = static_cast<opmath_t>(eta);
  const opmath_t flush_c = static_cast<opmath_t>(flush_below);
  const opmath_t p0 = static_cast<opmath_t>(slot.p0);
  const opmath_t p1 = static_cast<opmath_t>(slot.p1);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const opmath_t s = static_cast<opmath_t>(state[i]);
    const opmath_t t = static_cast<opmath_t>(target[i]);
    const opmath_t d = rm::sub(t, s);
    const opmath_t updated = rm::flush_tiny(rm::euler_step(s, t, eta_c), flush_c);
    const scalar_t stored = static_cast<scalar_t>(updated);
    state[i] = stored;
    if (act_in != nullptr) {
      // From the stored (rounded) value, as the unfused VJP would read it.
      act_grad[i] = static_cast<scalar_t>(rm::activation_vjp<opmath_t>(
          slot.activation_kind, static_cast<opmath_t>(stored),
          static_cast<opmath_t>(act_in[i]), p0, p1));
    }
    residual_sq += static_cast<double>(d) * static_cast<double>(d);
    target_sq += static_cast<double>(t) * static_cast<double>(t);
  }
}

__device__ double block_sum(double value, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    shared[warp] = value;
  }
  __syncthreads();
  value = threadIdx.x < kWarps ? shared[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  __syncthreads(); // `shared` is reused by the next call
  return value;
}

template <int Capacity>
__device__ int32_t tensor_of_chunk(const LaunchTable<Capacity>& table, int64_t chunk) {
  int32_t lo = 0;
  int32_t hi = table.num_tensors - 1;
  while (lo < hi) {  // last tensor whose first chunk is <= chunk
    const int32_t mid = (lo + hi + 1) / 2;
    if (table.first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <int Capacity>
__global__ void __launch_bounds__(kThreads) relax_update_multi_tensor_kernel(
    const __grid_constant__ LaunchTable<Capacity> table,
    double eta,
    double flush_below,
    double* __restrict__ chunk_sums) {
  __shared__ double shared[kWarps];
  const int64_t num_chunks = table.first_chunk[table.num_tensors];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int32_t t = tensor_of_chunk(table, c);
    const TensorSlot& slot = table.tensors[t];
    const int64_t begin = (c - table.first_chunk[t]) * kChunkElements;
    const int64_t end = min(begin + kChunkElements, slot.numel);
    double residual_sq = 0.0;
    double target_sq = 0.0;
    // The element type is uniform over the block: no divergence.
    switch (slot.element_type) {
      case kElementFloat:
        relax_chunk<float>(slot, begin, end, eta, flush_below, residual_sq, target_sq);
        break;
      case kElementDouble:
        relax_chunk<double>(slot, begin, end, eta, flush_below, residual_sq, target_sq);
        break;
      case kElementHalf:
        relax_chunk<c10::Half>(slot, begin, end, eta, flush_below, residual_sq, target_sq);
        break;
      case kElementBFloat16:
        relax_chunk<c10::BFloat16>(slot, begin, end, eta, flush_below, residual_sq, target_sq);
        break;
    }
    residual_sq = block_sum(residual_sq, shared);
    target_sq = block_sum(target_sq, shared);
    if (threadIdx.x == 0) {  // one slot per chunk: no atomics, a fixed order below
      chunk_sums[2 * c] = residual_sq;
      chunk_sums[2 * c + 1] = target_sq;
    }
  }
}

// One thread per (tensor, column): adds the tensor's chunk sums in chunk order.
template <int Capacity>
__global__ void norms_from_chunks_kernel(
    const __grid_constant__ LaunchTable<Capacity> table,
    const double* __restrict__ chunk_sums,
    double* __restrict__ norms) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= 2 * table.num_tensors) {
    return;
  }
  const int t = index / 2;
  const int column = index % 2;
  double sum = 0.0;
  for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
    sum += chunk_sums[2 * c + column];
  }
  norms[index] = sqrt(sum);
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
        &per_sm, relax_update_multi_tensor_kernel<Capacity>, kThreads, 0));
    cache[device] = int64_t(std::max(per_sm, 1)) *
        at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }
  return cache[device];
}

template <int Capacity>
void launch(
    const std::vector<TensorSlot>& slots,
    size_t first,
    size_t count,
    double eta,
    double flush_below,
    double* norms,
    const at::TensorOptions& options) {
  LaunchTable<Capacity> table{};
  table.num_tensors = static_cast<int32_t>(count);
  table.first_chunk[0] = 0;
  for (size_t k = 0; k < count; ++k) {
    table.tensors[k] = slots[first + k];
    const int64_t chunks = (slots[first + k].numel + kChunkElements - 1) / kChunkElements;
    table.first_chunk[k + 1] = table.first_chunk[k] + chunks;
  }
  const int64_t num_chunks = table.first_chunk[count];
  auto stream = at::cuda::getCurrentCUDAStream();
  // From the caching allocator: inside a CUDA graph capture, from its pool.
  at::Tensor chunk_sums = at::empty({std::max<int64_t>(num_chunks, 1), 2}, options);
  if (num_chunks > 0) {
    const int64_t grid = std::min<int64_t>(num_chunks, resident_blocks<Capacity>());
    relax_update_multi_tensor_kernel<Capacity>
        <<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(
            table, eta, flush_below, chunk_sums.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    chunk_sums.zero_();
  }
  const int threads = 2 * static_cast<int>(count);
  norms_from_chunks_kernel<Capacity><<<(threads + 127) / 128, 128, 0, stream>>>(
      table, chunk_sums.const_data_ptr<double>(), norms + 2 * first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor relax_update_cuda_impl(
    at::TensorList states,
    at::TensorList targets,
    double eta,
    double flush_below,
    const std::vector<relax_update_detail::ActivationOf>& activations,
    at::TensorList activation_inputs,
    at::TensorList activation_grads) {
  relax_update_detail::check_inputs(
      states, targets, flush_below, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(states[0].device());
  const size_t n = states.size();
  std::vector<at::Tensor> work_states = relax_update_detail::contiguous_tensors(states);
  const std::vector<at::Tensor> work_targets = relax_update_detail::contiguous_tensors(targets);
  const std::vector<at::Tensor> work_inputs =
      relax_update_detail::contiguous_tensors(activation_inputs);
  std::vector<at::Tensor> work_grads = relax_update_detail::contiguous_tensors(activation_grads);

  std::vector<TensorSlot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    TensorSlot& slot = slots[i];
    slot = {work_states[i].data_ptr(), work_targets[i].const_data_ptr(), nullptr, nullptr,
            work_states[i].numel(), element_type_of(work_states[i].scalar_type()),
            kDerivativeNone, 0.0, 0.0};
    if (!activations.empty() && activations[i].kind != kDerivativeNone) {
      const auto& act = activations[i];
      slot.activation_input = work_inputs[act.entry].const_data_ptr();
      slot.activation_grad = work_grads[act.entry].data_ptr();
      slot.activation_kind = static_cast<int32_t>(act.kind);
      slot.p0 = act.p0;
      slot.p1 = act.p1;
    }
  }

  const auto options = states[0].options().dtype(at::kDouble);
  at::Tensor norms_tensor = at::empty({static_cast<int64_t>(n), 2}, options);
  double* norms = norms_tensor.mutable_data_ptr<double>();
  if (n <= static_cast<size_t>(kSmallTable)) {
    launch<kSmallTable>(slots, 0, n, eta, flush_below, norms, options);
  } else {
    for (size_t first = 0; first < n; first += kLargeTable) {
      launch<kLargeTable>(
          slots, first, std::min<size_t>(kLargeTable, n - first), eta, flush_below, norms,
          options);
    }
  }
  relax_update_detail::write_back_states(states, work_states);
  relax_update_detail::write_back_states(activation_grads, work_grads);
  return norms_tensor;
}

at::Tensor relax_update_cuda(
    at::TensorList states,
    at::TensorList targets,
    double eta,
    double flush_below) {
  return relax_update_cuda_impl(states, targets, eta, flush_below, {}, {}, {});
}

at::Tensor relax_update_activation_cuda(
    at::TensorList states,
    at::TensorList targets,
    double eta,
    double flush_below,
    at::IntArrayRef activation_states,
    at::IntArrayRef activation_kinds,
    at::ArrayRef<double> activation_params,
    at::TensorList activation_inputs,
    at::TensorList activation_grads) {
  const auto activations = relax_update_detail::check_activations(
      states, activation_states, activation_kinds, activation_params, activation_inputs,
      activation_grads);
  return relax_update_cuda_impl(
      states, targets, eta, flush_below, activations, activation_inputs, activation_grads);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CUDA, m) {
  m.impl("relax_update_", &relax_update_cuda);
  m.impl("relax_update_activation_", &relax_update_activation_cuda);
}

} // namespace torch_ar

// CUDA kernel of torch_ar::relax_update_: every state of the list is updated
// by one launch. The host packs a table of tensors and a list of fixed-size
// chunks into one device buffer; blocks stride over the chunks, update them
// in place and add their squared norms to a [n, 2] double buffer with
// atomics. Nothing waits on the device.

#include "ops/relax_update.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

namespace torch_ar {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16 elements per thread per chunk: small enough that a single mid-sized
// state still spreads over all SMs.
constexpr int64_t kChunkElements = 4096;
constexpr int kBlocksPerSm = 8;

enum ElementType : int32_t {
  kElementFloat = 0,
  kElementDouble = 1,
  kElementHalf = 2,
  kElementBFloat16 = 3,
};

struct TensorSlot {
  void* state;
  const void* target;
  int64_t numel;
  int64_t element_type;
};

struct ChunkSlot {
  int64_t tensor;
  int64_t begin;
};

int64_t element_type_of(at::ScalarType dtype) {
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
  const opmath_t eta_c = static_cast<opmath_t>(eta);
  const opmath_t flush_c = static_cast<opmath_t>(flush_below);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const opmath_t s = static_cast<opmath_t>(state[i]);
    const opmath_t t = static_cast<opmath_t>(target[i]);
    const opmath_t d = t - s;
    opmath_t updated = s + eta_c * d;
    // Written without abs() so NaN stays NaN, as on the CPU.
    if (updated < flush_c && updated > -flush_c) {
      updated = opmath_t(0);
    }
    state[i] = static_cast<scalar_t>(updated);
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

__global__ void __launch_bounds__(kThreads) relax_update_multi_tensor_kernel(
    const TensorSlot* __restrict__ tensors,
    const ChunkSlot* __restrict__ chunks,
    int64_t num_chunks,
    double eta,
    double flush_below,
    double* __restrict__ squared_norms) {
  __shared__ double shared[kWarps];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const ChunkSlot chunk = chunks[c];
    const TensorSlot slot = tensors[chunk.tensor];
    const int64_t end = min(chunk.begin + kChunkElements, slot.numel);
    double residual_sq = 0.0;
    double target_sq = 0.0;
    // The element type is uniform over the block: no divergence.
    switch (slot.element_type) {
      case kElementFloat:
        relax_chunk<float>(slot, chunk.begin, end, eta, flush_below, residual_sq, target_sq);
        break;
      case kElementDouble:
        relax_chunk<double>(slot, chunk.begin, end, eta, flush_below, residual_sq, target_sq);
        break;
      case kElementHalf:
        relax_chunk<c10::Half>(slot, chunk.begin, end, eta, flush_below, residual_sq, target_sq);
        break;
      case kElementBFloat16:
        relax_chunk<c10::BFloat16>(slot, chunk.begin, end, eta, flush_below, residual_sq, target_sq);
        break;
    }
    residual_sq = block_sum(residual_sq, shared);
    target_sq = block_sum(target_sq, shared);
    if (threadIdx.x == 0) {
      atomicAdd(&squared_norms[2 * chunk.tensor], residual_sq);
      atomicAdd(&squared_norms[2 * chunk.tensor + 1], target_sq);
    }
  }
}

at::Tensor relax_update_cuda(
    at::TensorList states,
    at::TensorList targets,
    double eta,
    double flush_below) {
  relax_update_detail::check_inputs(
      states, targets, flush_below, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(states[0].device());
  const int64_t n = static_cast<int64_t>(states.size());
  std::vector<at::Tensor> work_states =
      relax_update_detail::contiguous_tensors(states);
  const std::vector<at::Tensor> work_targets =
      relax_update_detail::contiguous_tensors(targets);

  std::vector<TensorSlot> tensor_slots(n);
  std::vector<ChunkSlot> chunk_slots;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = work_states[i].numel();
    tensor_slots[i] = {
        work_states[i].data_ptr(),
        work_targets[i].const_data_ptr(),
        numel,
        element_type_of(work_states[i].scalar_type())};
    for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
      chunk_slots.push_back({i, begin});
    }
  }

  at::Tensor squared_norms =
      at::zeros({n, 2}, states[0].options().dtype(at::kDouble));
  const int64_t num_chunks = static_cast<int64_t>(chunk_slots.size());
  if (num_chunks > 0) {
    const size_t tensor_bytes = tensor_slots.size() * sizeof(TensorSlot);
    const size_t chunk_bytes = chunk_slots.size() * sizeof(ChunkSlot);
    // Pinned staging buffer: the copy is asynchronous, and the caching host
    // allocator keeps the buffer alive until the copy has run.
    at::Tensor staging = at::empty(
        {static_cast<int64_t>(tensor_bytes + chunk_bytes)},
        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    uint8_t* host = staging.mutable_data_ptr<uint8_t>();
    std::memcpy(host, tensor_slots.data(), tensor_bytes);
    std::memcpy(host + tensor_bytes, chunk_slots.data(), chunk_bytes);
    at::Tensor table = at::empty(
        staging.sizes(), states[0].options().dtype(at::kByte));
    table.copy_(staging, /*non_blocking=*/true);

    const uint8_t* device_table = table.const_data_ptr<uint8_t>();
    const int sm_count =
        at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t grid =
        std::min<int64_t>(num_chunks, int64_t(sm_count) * kBlocksPerSm);
    relax_update_multi_tensor_kernel<<<
        static_cast<unsigned int>(grid),
        kThreads,
        0,
        at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const TensorSlot*>(device_table),
        reinterpret_cast<const ChunkSlot*>(device_table + tensor_bytes),
        num_chunks,
        eta,
        flush_below,
        squared_norms.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  relax_update_detail::write_back_states(states, work_states);
  return squared_norms.sqrt_();
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CUDA, m) {
  m.impl("relax_update_", &relax_update_cuda);
}

} // namespace torch_ar

// What the multi-tensor kernels (relax_update_, horner_update_) share. A
// launch updates every tensor of a list: the per-tensor table travels in the
// kernel's parameters (no host-to-device copy, so a launch can be recorded
// into a CUDA graph and replayed). Blocks stride over fixed-size chunks of
// all tensors; each chunk writes its partial sums to a slot of its own, and
// a second launch adds each tensor's slots in a fixed order, so the norms are
// the same on every run (no floating-point atomics). The grid is as large as
// the device holds at once.

#pragma once

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace torch_ar::multi_tensor {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16 elements per thread per chunk: small enough that a single mid-sized
// state still spreads over all SMs. TORCH_AR_CUDA_CHUNK_ELEMENTS sets another
// size, for measuring it (benchmarks/chunk_size.py); read once per process.
constexpr int64_t kChunkElements = 4096;

inline int64_t chunk_elements() {
  static const int64_t value = [] {
    const char* text = std::getenv("TORCH_AR_CUDA_CHUNK_ELEMENTS");
    if (text == nullptr || *text == '\0') return kChunkElements;
    char* end = nullptr;
    const long long v = std::strtoll(text, &end, 10);
    TORCH_CHECK(*end == '\0' && v >= 1024 && v <= (1 << 20) && (v & (v - 1)) == 0,
                "torch_ar: TORCH_AR_CUDA_CHUNK_ELEMENTS must be a power of two from 1024 to "
                "1048576, got '",
                text, "'");
    return static_cast<int64_t>(v);
  }();
  return value;
}
// Tables this size and below cover most launches and keep their parameters
// cheap; longer lists go in batches of a kernel's large table.
constexpr int kSmallTable = 16;

enum ElementType : int32_t {
  kElementFloat = 0,
  kElementDouble = 1,
  kElementHalf = 2,
  kElementBFloat16 = 3,
};

inline int32_t element_type_of(at::ScalarType dtype, const char* op) {
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
  TORCH_INTERNAL_ASSERT(false, op, ": unchecked dtype ", dtype);
  return -1;
}

// Calls f with a value of the slot's element type. The type is uniform over
// a chunk, hence over the block: no divergence.
template <typename F>
__device__ __forceinline__ void with_element_type(int32_t element_type, F&& f) {
  switch (element_type) {
    case kElementFloat:
      f(float{});
      break;
    case kElementDouble:
      f(double{});
      break;
    case kElementHalf:
      f(c10::Half{});
      break;
    case kElementBFloat16:
      f(c10::BFloat16{});
      break;
  }
}

// The launch's tensors, passed by value. Kernel parameters may take up to
// 32 KB since CUDA 12.1 (Volta and newer). first_chunk holds the prefix sums
// of the tensors' chunk counts.
template <typename Slot, int Capacity>
struct Table {
  Slot tensors[Capacity];
  int64_t first_chunk[Capacity + 1];
  int64_t chunk_elements;
  int32_t num_tensors;
};

// A kernel over a table: (table, chunk sums, its own parameters...); it
// writes the launch's Columns partial sums for each chunk.
template <typename Slot, int Capacity, typename... Params>
using ChunkKernel = void (*)(Table<Slot, Capacity>, double*, Params...);

// The block's sum in a fixed order: warp shuffles, then the warps' sums.
__device__ __forceinline__ double block_sum(double value, double* shared) {
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

// The chunk's tensor and element range [begin, end) within it.
struct ChunkRange {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename Slot, int Capacity>
__device__ ChunkRange chunk_range(const Table<Slot, Capacity>& table, int64_t chunk) {
  int32_t lo = 0;
  int32_t hi = table.num_tensors - 1;
  while (lo < hi) { // the last tensor whose first chunk is <= chunk
    const int32_t mid = (lo + hi + 1) / 2;
    if (table.first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t begin = (chunk - table.first_chunk[lo]) * table.chunk_elements;
  return {lo, begin, min(begin + table.chunk_elements, table.tensors[lo].numel)};
}

// The loop every multi-tensor kernel runs: blocks stride over the table's
// chunks; for each, `chunk(slot, range, sums)` adds the thread's share of
// the chunk's Columns sums into sums[], the block adds the threads' shares
// in a fixed order, and the chunk's sums go to a slot of its own in
// chunk_sums (no atomics: a fixed order after). Each op writes only `chunk`.
template <int Columns, typename Slot, int Capacity, typename ChunkFn>
__device__ __forceinline__ void for_each_chunk(const Table<Slot, Capacity>& table,
                                               double* __restrict__ chunk_sums, ChunkFn&& chunk) {
  __shared__ double shared[kWarps];
  const int64_t num_chunks = table.first_chunk[table.num_tensors];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const ChunkRange range = chunk_range(table, c);
    double sums[Columns] = {};
    chunk(table.tensors[range.tensor], range, sums);
#pragma unroll
    for (int k = 0; k < Columns; ++k) sums[k] = block_sum(sums[k], shared);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < Columns; ++k) chunk_sums[Columns * c + k] = sums[k];
    }
  }
}

// One block per tensor: each thread adds a strided share of the tensor's
// chunk sums in chunk order, then the block's fixed-order tree adds the
// shares, so a large state's norm takes as many steps as it has chunks per
// thread and is the same on every run. Columns below RootColumns are sums of
// squares (their root is the norm); the rest are counts.
template <typename Slot, int Capacity, int Columns, int RootColumns>
__global__ void __launch_bounds__(kThreads)
    norms_from_chunks_kernel(const __grid_constant__ Table<Slot, Capacity> table,
                             const double* __restrict__ chunk_sums, double* __restrict__ norms) {
  __shared__ double shared[kWarps];
  const int t = blockIdx.x;
  const int64_t first = table.first_chunk[t];
  const int64_t last = table.first_chunk[t + 1];
  for (int column = 0; column < Columns; ++column) {
    double sum = 0.0;
    for (int64_t c = first + threadIdx.x; c < last; c += blockDim.x) {
      sum += chunk_sums[Columns * c + column];
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) {
      norms[Columns * t + column] = column < RootColumns ? sqrt(sum) : sum;
    }
  }
}

// Blocks of the kernel the device holds at once, asked once per kernel and
// device: a larger grid would only queue behind the resident blocks.
inline int64_t resident_blocks(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  const int device = at::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  int64_t& blocks = cache[{kernel, device}];
  if (blocks == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    blocks =
        int64_t(std::max(per_sm, 1)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }
  return blocks;
}

// Runs kernel over slots[first, first + count) and writes each tensor's
// Columns results to norms[first * Columns...]. The chunk sums come from the
// caching allocator: inside a CUDA graph capture, from its pool.
template <int Columns, int RootColumns, typename Slot, int Capacity, typename... Params,
          typename... Args>
void launch_batch(ChunkKernel<Slot, Capacity, Params...> kernel, const std::vector<Slot>& slots,
                  size_t first, size_t count, double* norms, const at::TensorOptions& options,
                  Args&&... args) {
  Table<Slot, Capacity> table{};
  table.num_tensors = static_cast<int32_t>(count);
  table.chunk_elements = chunk_elements();
  table.first_chunk[0] = 0;
  for (size_t k = 0; k < count; ++k) {
    table.tensors[k] = slots[first + k];
    const int64_t chunks =
        (slots[first + k].numel + table.chunk_elements - 1) / table.chunk_elements;
    table.first_chunk[k + 1] = table.first_chunk[k] + chunks;
  }
  const int64_t num_chunks = table.first_chunk[count];
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor chunk_sums = at::empty({std::max<int64_t>(num_chunks, 1), Columns}, options);
  if (num_chunks > 0) {
    const int64_t grid =
        std::min<int64_t>(num_chunks, resident_blocks(reinterpret_cast<const void*>(kernel)));
    kernel<<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(
        table, chunk_sums.mutable_data_ptr<double>(), std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    chunk_sums.zero_();
  }
  if (count == 0) return;
  norms_from_chunks_kernel<Slot, Capacity, Columns, RootColumns>
      <<<static_cast<unsigned int>(count), kThreads, 0, stream>>>(
          table, chunk_sums.const_data_ptr<double>(), norms + Columns * first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs the kernel over all slots: one small table when they fit, else
// batches of the large one. Returns the [slots, Columns] float64 results.
template <int Columns, int RootColumns, typename Slot, int Large, typename... Params,
          typename... Args>
at::Tensor launch_all(ChunkKernel<Slot, kSmallTable, Params...> small_kernel,
                      ChunkKernel<Slot, Large, Params...> large_kernel,
                      const std::vector<Slot>& slots, const at::TensorOptions& options,
                      const Args&... args) {
  static_assert(sizeof(Table<Slot, Large>) < 32000, "kernel parameters over 32 KB");
  const size_t n = slots.size();
  at::Tensor results = at::empty({static_cast<int64_t>(n), Columns}, options);
  double* out = results.mutable_data_ptr<double>();
  if (n <= static_cast<size_t>(kSmallTable)) {
    launch_batch<Columns, RootColumns>(small_kernel, slots, 0, n, out, options, args...);
  } else {
    for (size_t first = 0; first < n; first += Large) {
      launch_batch<Columns, RootColumns>(large_kernel, slots, first,
                                         std::min<size_t>(Large, n - first), out, options, args...);
    }
  }
  return results;
}

} // namespace torch_ar::multi_tensor

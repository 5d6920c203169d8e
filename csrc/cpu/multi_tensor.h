#pragma once
// What the CPU multi-tensor kernels (relax_update_, horner_update_) share,
// as kernels/multi_tensor.cuh is for CUDA: every tensor of a list is cut
// into fixed-size chunks, the chunks of all tensors share one parallel_for
// (so a list of many small states still spreads over the threads), each
// chunk returns its partial sums into a slot of its own, and the slots are
// added per tensor in chunk order: the sums do not depend on the number of
// threads. Each op writes only its per-chunk function.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <vector>

namespace torch_ar::multi_tensor_cpu {

// Elements per chunk.
constexpr int64_t kChunkElements = 32768;
// Below this total the threading overhead outweighs the work.
constexpr int64_t kSerialBelowElements = 65536;

// Four lanes of float or double in the compiler's vector types, which become
// SIMD code on any CPU (the extension is built without -mavx*; a plain loop
// over the lanes was left scalar, and wider vector types were split badly).
template <typename scalar_t>
struct Quad;
template <>
struct Quad<float> {
  typedef float type __attribute__((vector_size(4 * sizeof(float))));
};
template <>
struct Quad<double> {
  typedef double type __attribute__((vector_size(4 * sizeof(double))));
};

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t size() const { return end - begin; }
};

// Calls `chunk_fn(const Chunk&) -> std::array<double, Columns>` on every
// chunk of tensors with `numels` elements and returns a [tensors, Columns]
// float64 tensor of the per-tensor sums (zero rows for empty tensors).
template <size_t Columns, typename ChunkFn>
at::Tensor sum_over_chunks(const std::vector<int64_t>& numels, ChunkFn&& chunk_fn) {
  const int64_t n = static_cast<int64_t>(numels.size());
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += kChunkElements)
      chunks.push_back({i, begin, std::min(begin + kChunkElements, numels[i])});
    total += numels[i];
  }
  std::vector<std::array<double, Columns>> partial(chunks.size());
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) partial[j] = chunk_fn(chunks[j]);
  };
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  if (total < kSerialBelowElements)
    run(0, num_chunks);
  else
    at::parallel_for(0, num_chunks, 1, run);

  at::Tensor sums = at::zeros({n, static_cast<int64_t>(Columns)}, at::dtype(at::kDouble));
  double* acc = sums.mutable_data_ptr<double>();
  for (int64_t j = 0; j < num_chunks; ++j) {
    double* row = acc + Columns * chunks[j].tensor;
    for (size_t k = 0; k < Columns; ++k) row[k] += partial[j][k];
  }
  return sums;
}

} // namespace torch_ar::multi_tensor_cpu

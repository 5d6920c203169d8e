#pragma once
// The forward values a relaxation may start from (init="forward"), kept on
// the C++ side from forward to backward under a handle, so that the engine
// can take them over and free each one as soon as its state no longer needs
// it (a Python list would hold them all until the backward returns).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace torch_ar {

// Keeps `values` and returns their handle (0 for an empty list).
int64_t stash_forward_values(std::vector<at::Tensor> values);

// The values under `handle` (empty for 0 or an unknown handle): removed from
// the store unless `keep` (the graph is kept for another backward).
std::vector<at::Tensor> take_forward_values(int64_t handle, bool keep);

// Forgets the values under `handle`, if any (a forward without a backward).
void drop_forward_values(int64_t handle);

} // namespace torch_ar

#pragma once
// A multi-tensor launch takes tensors of one device. A model split over
// devices (pipeline stages on two GPUs) has states on several: the launch
// runs once per device and the rows of its results come back in the
// caller's order, on the first tensor's device.

#include <ATen/ATen.h>

#include <cstddef>
#include <vector>

namespace torch_ar {

// The row indices of each device group, on the first device: built on a
// call site's first launch and reused while its devices stay the same (a
// host-to-device copy of them at every update blocked the host once per
// group, every step).
struct DeviceRowIndex {
  std::vector<c10::Device> devices; // what `index` was built for
  std::vector<at::Tensor> index;    // per device group
};

// `launch(positions)` updates the listed positions (all on one device) and
// returns one result row per position. `devices[i]` is position i's device.
// `cache`, kept by the call site, holds the row indices between calls.
template <typename Launch>
at::Tensor launch_per_device(const std::vector<c10::Device>& devices, Launch&& launch,
                             DeviceRowIndex* cache = nullptr) {
  std::vector<c10::Device> seen;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < devices.size(); ++i) {
    size_t g = 0;
    while (g < seen.size() && seen[g] != devices[i]) ++g;
    if (g == seen.size()) {
      seen.push_back(devices[i]);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  if (groups.size() <= 1) {
    std::vector<size_t> all(devices.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    return launch(all);
  }
  DeviceRowIndex local;
  DeviceRowIndex& rows_index = cache ? *cache : local;
  if (rows_index.devices != devices || rows_index.index.size() != groups.size()) {
    rows_index.devices = devices;
    rows_index.index.clear();
    for (const auto& positions : groups) {
      std::vector<int64_t> index(positions.begin(), positions.end());
      rows_index.index.push_back(at::tensor(index, at::kLong).to(seen[0]));
    }
  }
  at::Tensor rows;
  for (size_t g = 0; g < groups.size(); ++g) {
    at::Tensor part = launch(groups[g]);
    if (!rows.defined()) {
      rows = at::empty({static_cast<int64_t>(devices.size()), part.size(1)},
                       part.options().device(seen[0]));
    }
    rows.index_copy_(0, rows_index.index[g], part.to(rows.device()));
  }
  return rows;
}

// Per-state partial results (sums, norms) of a model split over devices,
// joined on the first one's device: at::stack / at::cat need one device.
inline at::Tensor join_on_one_device(const std::vector<at::Tensor>& parts, bool stack) {
  if (parts.empty()) return at::Tensor();
  const c10::Device device = parts[0].device();
  bool one_device = true;
  for (const at::Tensor& p : parts) one_device = one_device && p.device() == device;
  if (one_device) return stack ? at::stack(parts) : at::cat(parts);
  std::vector<at::Tensor> moved;
  moved.reserve(parts.size());
  for (const at::Tensor& p : parts) moved.push_back(p.to(device, /*non_blocking=*/true));
  return stack ? at::stack(moved) : at::cat(moved);
}

} // namespace torch_ar

#include "ops/forward_values.h"

#include <torch/library.h>

#include <mutex>
#include <unordered_map>

namespace torch_ar {

namespace {

struct Store {
  std::mutex mutex;
  int64_t next = 1;
  std::unordered_map<int64_t, std::vector<at::Tensor>> values;
};

Store& store() {
  static Store* s = new Store(); // never destroyed: no tensors freed at exit
  return *s;
}

} // namespace

int64_t stash_forward_values(std::vector<at::Tensor> values) {
  if (values.empty()) return 0;
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mutex);
  const int64_t handle = s.next++;
  s.values.emplace(handle, std::move(values));
  return handle;
}

std::vector<at::Tensor> take_forward_values(int64_t handle, bool keep) {
  if (handle == 0) return {};
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mutex);
  auto it = s.values.find(handle);
  if (it == s.values.end()) return {};
  if (keep) return it->second;
  std::vector<at::Tensor> out = std::move(it->second);
  s.values.erase(it);
  return out;
}

void drop_forward_values(int64_t handle) {
  if (handle == 0) return;
  std::vector<at::Tensor> dropped; // freed outside the lock
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mutex);
  auto it = s.values.find(handle);
  if (it == s.values.end()) return;
  dropped = std::move(it->second);
  s.values.erase(it);
}

namespace {

int64_t stash_op(at::TensorList values) {
  return stash_forward_values(values.vec());
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CompositeExplicitAutograd, m) {
  m.impl("stash_forward_values", TORCH_FN(stash_op));
}

} // namespace torch_ar

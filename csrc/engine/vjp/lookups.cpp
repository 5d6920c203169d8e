// Lookups by index: the saved index tensors, so that capture can tell a
// lookup driven by data (token ids) from one driven by constants (positions).
#include "engine/vjp/specialised.h"

#include <torch/csrc/autograd/generated/Functions.h>

namespace torch_ar::vjp {

namespace gen = torch::autograd::generated;

namespace {
template <class T>
bool single(Node& n, torch::autograd::SavedVariable T::* field, std::vector<at::Tensor>& out) {
  auto* f = dynamic_cast<T*>(&n);
  if (!f) return false;
  out.assign(1, (f->*field).unpack());
  return true;
}
} // namespace

bool embedding_indices(Node& n, std::vector<at::Tensor>& out) {
  return single(n, &gen::EmbeddingBackward0::indices_, out);
}

bool embedding_bag_indices(Node& n, std::vector<at::Tensor>& out) {
  return single(n, &gen::EmbeddingBagBackward0::indices_, out);
}

bool index_select_indices(Node& n, std::vector<at::Tensor>& out) {
  return single(n, &gen::IndexSelectBackward0::index_, out);
}

bool gather_indices(Node& n, std::vector<at::Tensor>& out) {
  return single(n, &gen::GatherBackward0::index_, out);
}

bool take_indices(Node& n, std::vector<at::Tensor>& out) {
  return single(n, &gen::TakeBackward0::index_, out);
}

bool index_indices(Node& n, std::vector<at::Tensor>& out) {
  auto* f = dynamic_cast<gen::IndexBackward0*>(&n);
  if (!f) return false;
  out.clear();
  for (const auto& saved : f->indices_) out.push_back(saved.unpack());
  return true;
}

} // namespace torch_ar::vjp

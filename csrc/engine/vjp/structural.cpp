// Structural ops whose VJP moves the state without arithmetic: add routes it
// to both summands, cat splits it, view reshapes it.
#include "engine/vjp/specialised.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/Functions.h>

namespace torch_ar::vjp {

namespace gen = torch::autograd::generated;

bool add(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::AddBackward0*>(&n);
  if (!f) return false;
  out.assign(2, at::Tensor());
  if (!g[0].defined()) return true;
  if (m[0]) out[0] = g[0];
  if (m.size() > 1 && m[1]) out[1] = f->alpha.equal(1) ? g[0] : g[0] * f->alpha;
  return true;
}

bool sub(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::SubBackward0*>(&n);
  if (!f) return false;
  out.assign(2, at::Tensor());
  if (!g[0].defined()) return true;
  if (m[0]) out[0] = g[0];
  if (m.size() > 1 && m[1]) out[1] = f->alpha.equal(1) ? -g[0] : g[0] * (-f->alpha);
  return true;
}

bool cat(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  auto* f = dynamic_cast<gen::CatBackward0*>(&n);
  if (!f) return false;
  const auto& sizes = f->tensors_args_sizes_symint;
  if (sizes.size() != m.size()) return false;
  out.assign(m.size(), at::Tensor());
  if (!g[0].defined()) return true;
  int64_t dim = f->dim;
  if (dim < 0) dim += g[0].dim();
  c10::SymInt offset = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    // Legacy: 1-D empty tensors are skipped by cat.
    if (sizes[i].size() == 1 && sizes[i][0] == 0) continue;
    const c10::SymInt& len = sizes[i][dim];
    if (m[i]) out[i] = g[0].narrow_symint(dim, offset, len);
    offset = offset + len;
  }
  return true;
}

bool view(Node& n, const variable_list& g, const EdgeMask& m, variable_list& out) {
  const std::vector<c10::SymInt>* sizes = nullptr;
  if (auto* f = dynamic_cast<gen::ViewBackward0*>(&n))
    sizes = &f->self_sym_sizes;
  else if (auto* f2 = dynamic_cast<gen::UnsafeViewBackward0*>(&n))
    sizes = &f2->self_sym_sizes;
  else if (auto* f3 = dynamic_cast<gen::ReshapeAliasBackward0*>(&n))
    sizes = &f3->self_sym_sizes;
  if (!sizes || !mask_within(m, {0})) return false;
  out.assign(1, at::Tensor());
  if (m[0] && g[0].defined()) out[0] = g[0].reshape_symint(*sizes);
  return true;
}

} // namespace torch_ar::vjp

// C++ entry point, argument checks and the Meta kernel of
// torch_ar::horner_update_. The schema lives in registration.cpp, the CPU
// kernel in cpu/horner_update_kernel.cpp, the CUDA one in
// kernels/horner_update_kernel.cu.

#include "ops/horner_update.h"

#include "ops/flat_layout.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace torch_ar {

namespace {

horner_update_detail::OptionalList to_optional(const std::vector<at::Tensor>& v, size_t n) {
  horner_update_detail::OptionalList list;
  list.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (i < v.size() && v[i].defined())
      list.push_back(v[i]);
    else
      list.push_back(std::nullopt);
  }
  return list;
}

} // namespace

at::Tensor horner_update_(at::TensorList out, const std::vector<at::Tensor>& initial,
                          const std::vector<at::Tensor>& loss_terms,
                          const std::vector<at::Tensor>& targets,
                          const std::vector<at::Tensor>& residual_targets, double alpha,
                          double beta, double flush_below, bool residual) {
  if (out.empty()) return at::empty({0, 4}, at::TensorOptions().dtype(at::kDouble));
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ar::horner_update_", "")
          .typed<at::Tensor(
              at::TensorList, const horner_update_detail::OptionalList&,
              const horner_update_detail::OptionalList&, const horner_update_detail::OptionalList&,
              const horner_update_detail::OptionalList&, double, double, double, bool)>();
  const size_t n = out.size();
  return op.call(out, to_optional(initial, n), to_optional(loss_terms, n), to_optional(targets, n),
                 to_optional(residual_targets, n), alpha, beta, flush_below, residual);
}

namespace horner_update_detail {

namespace {

std::vector<at::Tensor> checked_list(const OptionalList& list, const char* name,
                                     at::TensorList out) {
  TORCH_CHECK(list.size() == out.size(), "horner_update_: ", name, " has ", list.size(),
              " entries for ", out.size(), " states");
  std::vector<at::Tensor> result(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    std::optional<at::Tensor> t = list[i];
    if (!t.has_value() || !t->defined()) continue;
    const at::Tensor& o = out[i];
    TORCH_CHECK(
        t->sizes() == o.sizes() && t->scalar_type() == o.scalar_type() && t->device() == o.device(),
        "horner_update_: ", name, "[", i, "] is ", t->scalar_type(), " ", t->sizes(), " on ",
        t->device(), " but out[", i, "] is ", o.scalar_type(), " ", o.sizes(), " on ", o.device());
    result[i] = *t;
  }
  return result;
}

} // namespace

Inputs check_inputs(at::TensorList out, const OptionalList& initial, const OptionalList& loss_terms,
                    const OptionalList& targets, const OptionalList& residual_targets,
                    double flush_below, c10::DeviceType device_type) {
  TORCH_CHECK(flush_below >= 0.0, "horner_update_: flush_below must be >= 0, got ", flush_below);
  Inputs in;
  for (size_t i = 0; i < out.size(); ++i) {
    const at::Tensor& o = out[i];
    TORCH_CHECK(o.defined(), "horner_update_: out[", i, "] is undefined");
    const auto dtype = o.scalar_type();
    TORCH_CHECK(
        dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
        "horner_update_: out[", i, "] has dtype ", dtype,
        "; expected float32, float64, bfloat16 or float16");
    TORCH_CHECK(o.device().type() == device_type && o.device() == out[0].device(),
                "horner_update_: out[", i, "] is on ", o.device(), "; this kernel runs on ",
                device_type, " and all states must be on ", out[0].device());
    TORCH_CHECK(at::has_internal_overlap(o) != at::MemOverlap::Yes, "horner_update_: out[", i,
                "] has elements that share memory; it cannot be written");
  }
  in.initial = checked_list(initial, "initial", out);
  in.loss_terms = checked_list(loss_terms, "loss_terms", out);
  in.targets = checked_list(targets, "targets", out);
  in.residual_targets = checked_list(residual_targets, "residual_targets", out);
  // Meta (fake) tensors have no memory to overlap or walk, and may have
  // symbolic sizes: the checks above are all that applies to them.
  if (device_type == c10::DeviceType::Meta) return in;
  for (size_t i = 0; i < out.size(); ++i) {
    // A non-dense output is written through a fresh contiguous buffer that is
    // copied back after every read, so nothing it overlaps can be read
    // half-written (and ATen cannot tell overlap for it: TooHard).
    if (!out[i].is_non_overlapping_and_dense()) {
      at::Tensor work = flat_layout::walkable(out[i]);
      for (auto* list : {&in.initial, &in.loss_terms, &in.targets, &in.residual_targets}) {
        at::Tensor& term = (*list)[i];
        if (term.defined()) term = flat_layout::walkable_like(term, work);
      }
      in.out.push_back(std::move(work));
      continue;
    }
    // Only the targets may be the output itself (the stage in place).
    // A non-contiguous input is read through a copy of its own (a snapshot
    // taken before out is written), so only a contiguous one may not overlap.
    auto snapshot_if_strided = [&](at::Tensor& term) {
      if (term.defined() && !term.is_contiguous() &&
          at::get_overlap_status(out[i], term) != at::MemOverlapStatus::No)
        term = term.contiguous();
    };
    for (auto* list : {&in.initial, &in.loss_terms, &in.residual_targets}) {
      at::Tensor& other = (*list)[i];
      snapshot_if_strided(other);
      TORCH_CHECK(
          !other.defined() || at::get_overlap_status(out[i], other) == at::MemOverlapStatus::No,
          "horner_update_: out[", i, "] overlaps one of its inputs other than targets[", i, "]");
    }
    at::Tensor& t = in.targets[i];
    if (t.defined() && at::get_overlap_status(out[i], t) == at::MemOverlapStatus::Partial)
      snapshot_if_strided(t);
    const auto status = t.defined() ? at::get_overlap_status(out[i], t) : at::MemOverlapStatus::No;
    TORCH_CHECK(status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::Full,
                "horner_update_: out[", i, "] partly overlaps targets[", i, "]");
    // A non-dense output is computed in a contiguous copy and copied back at
    // the end; in place, its targets then come from a buffer of their own.
    at::Tensor work = flat_layout::walkable(out[i]);
    for (auto* list : {&in.initial, &in.loss_terms, &in.targets, &in.residual_targets}) {
      at::Tensor& term = (*list)[i];
      if (term.defined()) term = flat_layout::walkable_like(term, work);
    }
    in.out.push_back(std::move(work));
  }
  return in;
}

void write_back(at::TensorList out, const std::vector<at::Tensor>& computed) {
  for (size_t i = 0; i < out.size(); ++i)
    if (!computed[i].is_same(out[i])) out[i].copy_(computed[i]);
}

} // namespace horner_update_detail

namespace {

at::Tensor horner_update_meta(at::TensorList out, const horner_update_detail::OptionalList& initial,
                              const horner_update_detail::OptionalList& loss_terms,
                              const horner_update_detail::OptionalList& targets,
                              const horner_update_detail::OptionalList& residual_targets,
                              double /*alpha*/, double /*beta*/, double flush_below,
                              bool /*residual*/) {
  horner_update_detail::check_inputs(out, initial, loss_terms, targets, residual_targets,
                                     flush_below, c10::DeviceType::Meta);
  return at::empty({static_cast<int64_t>(out.size()), 4}, out[0].options().dtype(at::kDouble));
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, Meta, m) {
  m.impl("horner_update_", &horner_update_meta);
}

} // namespace torch_ar

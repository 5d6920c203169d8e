#pragma once
// How the multi-tensor kernels walk a state and the tensors paired with it
// (targets, activation inputs and grads, Horner terms): as flat arrays in
// memory order, which is correct whenever the paired tensors are dense with
// the state's strides, whatever those strides are (contiguous, channels_last,
// any permutation). Only a tensor that breaks that is copied: a state that
// is not dense is walked in a contiguous copy (written back afterwards), a
// paired tensor in a copy with the walked state's strides.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace torch_ar::flat_layout {

// The tensor itself when its elements fill one block of memory, else a
// contiguous copy.
inline at::Tensor walkable(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// `t` in the memory layout of `lead` (a walkable tensor of the same shape):
// itself when its strides already match, else a copy with lead's strides.
inline at::Tensor walkable_like(const at::Tensor& t, const at::Tensor& lead) {
  if (t.strides() == lead.strides() && t.is_non_overlapping_and_dense()) return t;
  at::Tensor copy = at::empty_like(lead, t.options());
  copy.copy_(t);
  return copy;
}

} // namespace torch_ar::flat_layout

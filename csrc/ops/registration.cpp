// The schemas of every torch_ar operator, declared once (the engine object
// that ARBackward holds is bound in python_module.cpp). Kernels register
// against them with TORCH_LIBRARY_IMPL(torch_ar, <DispatchKey>, m) in their
// own files (cpu/, kernels/, ...). Add new operators here with one m.def line.

#include "engine/op_table.h"
#include "engine/step_graph.h"

#include <torch/library.h>

#include <string>
#include <vector>

namespace {

#define TORCH_AR_STRINGIFY(...) #__VA_ARGS__
#define TORCH_AR_EXPAND_STRINGIFY(...) TORCH_AR_STRINGIFY(__VA_ARGS__)

// "key=value" rows: whether the CUDA kernels are in this build, and the
// GPU architectures they were compiled for (setup.py's TORCH_CUDA_ARCH_LIST).
std::vector<std::string> build_info() {
#ifdef TORCH_AR_WITH_CUDA
  const std::string cuda = "1";
#else
  const std::string cuda = "0";
#endif
#ifdef TORCH_AR_BUILD_ARCHS
  const std::string archs = TORCH_AR_EXPAND_STRINGIFY(TORCH_AR_BUILD_ARCHS);
#else
  const std::string archs;
#endif
  return {"cuda=" + cuda, "arch_list=" + archs};
}

} // namespace

TORCH_LIBRARY(torch_ar, m) {
  // Tests only: the next CUDA graph capture is refused by the device, so the
  // fallback and its clean-up can be exercised.
  m.def("_refuse_next_cuda_graph_capture() -> ()", &torch_ar::refuse_next_capture_for_testing);
  // Gives back the memory pools of the CUDA graphs no relaxation is using and
  // empties the allocator's cache; returns how many pools it released.
  m.def("release_cuda_graph_memory() -> int", &torch_ar::release_idle_graph_memory);
  // One Euler step of the relaxation for a list of states, fused with the
  // residual norms; see ops/relax_update.h.
  m.def(
      "relax_update_(Tensor(a!)[] states, Tensor[] targets, float eta, "
      "float flush_below) -> Tensor");
  // The same step that also writes f'(a) * state for the listed states
  // (activation outputs), the first VJP of the next step.
  m.def(
      "relax_update_activation_(Tensor(a!)[] states, Tensor[] targets, "
      "float eta, float flush_below, int[] activation_states, "
      "int[] activation_kinds, float[] activation_params, "
      "Tensor[] activation_inputs, Tensor(b!)[] activation_grads) -> Tensor");
  // One Horner stage of the closed-form relaxation over a list of states,
  // with its norms; see ops/horner_update.h.
  m.def(
      "horner_update_(Tensor(a!)[] out, Tensor?[] initial, Tensor?[] loss_terms, "
      "Tensor?[] targets, Tensor?[] residual_targets, float alpha, float beta, "
      "float flush_below, bool residual) -> Tensor");
  // The supported-op table (engine/op_table.cpp), one "|"-separated row per
  // autograd node: node name, op, role, specialised VJP, activation.
  m.def("supported_ops() -> str[]", &torch_ar::supported_op_rows);
  // How this library was built (see build_info above).
  m.def("build_info() -> str[]", &build_info);
}

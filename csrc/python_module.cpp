// `import torch_ar._C`: the Python binding. Loading the library registers the
// torch_ar operators with the dispatcher (torch.ops.torch_ar.*, static
// initialisers in ops/ and kernels/); this module adds the engine object of
// one forward, `Relaxation`, and raises the engine's error types as their
// Python exceptions.
//
// Relaxation is a pybind11 class rather than a torch::class_: it lives from a
// forward to its backward inside one process, is never scripted, traced or
// serialised, and a direct binding calls it without boxing each argument into
// an IValue and gives its errors their own Python types.

#include "engine/errors.h"
#include "engine/relaxation.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace torch_ar {
namespace {

// One option's value from Python, by the C++ type of its field.
void read_option(py::handle v, double& field) {
  field = v.is_none() ? -1.0 : v.cast<double>(); // None: absent (tol)
}
void read_option(py::handle v, int64_t& field) {
  field = v.is_none() ? -1 : v.cast<int64_t>(); // None: absent (steps)
}
void read_option(py::handle v, bool& field) {
  field = v.cast<bool>();
}
void read_option(py::handle v, InitMode& field) {
  field = parse_init(v.cast<std::string>());
}
void read_option(py::handle v, Schedule& field) {
  field = parse_schedule(v.cast<std::string>());
}
void read_option(py::handle v, Granularity& field) {
  field = parse_granularity(v.cast<std::string>());
}
void read_option(py::handle v, Evaluation& field) {
  field = parse_evaluation(v.cast<std::string>());
}

// EngineConfig from keyword options named as its fields; an unknown name is
// an error (a Python option that the engine does not know).
EngineConfig config_from_options(const py::kwargs& options) {
  EngineConfig config;
  for (const auto& [key, value] : options) {
    const std::string name = key.cast<std::string>();
    bool known = false;
#define TORCH_AR_READ_OPTION(option, type, default_value) \
  if (name == #option) {                                  \
    read_option(value, config.option);                    \
    known = true;                                         \
  }
    TORCH_AR_ENGINE_OPTIONS(TORCH_AR_READ_OPTION)
#undef TORCH_AR_READ_OPTION
    TORCH_CHECK_VALUE(known, "torch_ar.Relaxation: unknown option '", name, "'");
  }
  return config;
}

const char* evaluation_name(Evaluation e) {
  switch (e) {
    case Evaluation::ExactSweep:
      return "exact_sweep";
    case Evaluation::ClosedForm:
      return "closed_form";
    case Evaluation::Literal:
      return "literal";
    case Evaluation::Auto:
      break;
  }
  return "auto";
}

// Tensors from a list whose entries may be None (undefined tensors).
std::vector<at::Tensor> tensors_or_undefined(const std::vector<std::optional<at::Tensor>>& list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.has_value() ? *t : at::Tensor());
  return out;
}

py::list tensors_or_none(std::vector<at::Tensor> tensors) {
  py::list out(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].defined())
      out[i] = py::cast(std::move(tensors[i]));
    else
      out[i] = py::none();
  }
  return out;
}

} // namespace
} // namespace torch_ar

PYBIND11_MODULE(_C, m) {
  using torch_ar::Relaxation;
  using torch_ar::RelaxStats;
  m.doc() = "torch_ar's engine: the Relaxation object and the torch.ops.torch_ar operators";

  m.def("engine_option_names", &torch_ar::engine_option_names,
        "The names Relaxation(**options) accepts, as EngineConfig's fields.");

  py::class_<RelaxStats>(m, "RelaxStats", "What one backward's relaxation did.")
      .def_readonly("steps", &RelaxStats::steps)
      .def_readonly("depth", &RelaxStats::depth)
      .def_readonly("converged", &RelaxStats::converged)
      .def_readonly("exact_shortcut", &RelaxStats::exact_shortcut)
      .def_readonly("nonfinite", &RelaxStats::nonfinite)
      .def_readonly("max_residual", &RelaxStats::max_residual)
      .def_readonly("graph_steps", &RelaxStats::graph_steps)
      .def_readonly("fused_activations", &RelaxStats::fused_activations)
      .def_property_readonly(
          "evaluation", [](const RelaxStats& s) { return torch_ar::evaluation_name(s.evaluation); })
      .def_readonly("sweeps", &RelaxStats::sweeps)
      .def_readonly("relaxing_states", &RelaxStats::relaxing_states)
      .def_readonly("params_outside_relaxation", &RelaxStats::params_outside_relaxation)
      .def_readonly("residuals", &RelaxStats::residuals)
      .def_readonly("residual_trace", &RelaxStats::residual_trace)
      .def_readonly("cosine_trace", &RelaxStats::cosine_trace)
      .def_readonly("state_names", &RelaxStats::state_names);

  py::class_<torch_ar::EngineConfig>(m, "EngineConfig",
                                     "The engine's settings (engine/config.h), read once.")
      .def(py::init(
               [](const py::kwargs& options) { return torch_ar::config_from_options(options); }),
           "EngineConfig(**options): options named as its fields (engine_option_names()).")
      .def_property_readonly("may_evaluate_layers_repeatedly",
                             &torch_ar::EngineConfig::may_evaluate_layers_repeatedly)
      .def_property_readonly("needs_forward_values", &torch_ar::EngineConfig::needs_forward_values)
      .def_property_readonly("asks_for_relaxation", &torch_ar::EngineConfig::asks_for_relaxation);

  py::class_<Relaxation>(m, "Relaxation", "The engine object of one forward (engine/relaxation.h).")
      .def_static(
          "capture",
          [](const torch_ar::EngineConfig& config, const std::vector<at::Tensor>& outputs,
             std::vector<at::Tensor> leaves, std::vector<bool> leaf_is_input,
             std::vector<bool> leaf_needs_grad, const std::vector<at::Tensor>& forward_values,
             std::vector<at::Tensor> data_indices) {
            auto relaxation = std::make_unique<Relaxation>(config);
            std::vector<bool> differentiable;
            {
              py::gil_scoped_release no_gil;
              differentiable = relaxation->capture(
                  outputs, std::move(leaves), std::move(leaf_is_input), std::move(leaf_needs_grad),
                  forward_values, std::move(data_indices));
            }
            return py::make_tuple(std::move(relaxation), differentiable);
          },
          "A Relaxation of the graph behind `outputs`, captured and planned at the end of the "
          "forward, and which outputs are differentiable.",
          py::arg("config"), py::arg("outputs"), py::arg("leaves"), py::arg("leaf_is_input"),
          py::arg("leaf_needs_grad"), py::arg("forward_values"), py::arg("data_indices"))
      .def(
          "backward",
          [](Relaxation& r, const std::vector<std::optional<at::Tensor>>& output_grads,
             const std::vector<bool>& leaf_needs_grad,
             const std::vector<std::optional<at::Tensor>>& backward_weights,
             std::vector<std::string> leaf_names) {
            std::vector<at::Tensor> grads;
            {
              py::gil_scoped_release no_gil;
              // What the running backward asked for (retain_graph).
              const bool keep_graph = torch::autograd::get_current_graph_task_keep_graph();
              grads = r.backward(torch_ar::tensors_or_undefined(output_grads), leaf_needs_grad,
                                 torch_ar::tensors_or_undefined(backward_weights), keep_graph,
                                 std::move(leaf_names));
            }
            return torch_ar::tensors_or_none(std::move(grads));
          },
          py::arg("output_grads"), py::arg("leaf_needs_grad"), py::arg("backward_weights"),
          py::arg("leaf_names") = std::vector<std::string>())
      .def_property_readonly("released", &Relaxation::released)
      .def("release", &Relaxation::release)
      .def("stats", &Relaxation::stats, py::return_value_policy::reference_internal);

  // The engine's error types as their Python exceptions (torch_ar/errors.py);
  // every other error as torch raises it.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      std::rethrow_exception(p);
    } catch (const torch_ar::RelaxationDiverged& e) {
      py::object type = py::module_::import("torch_ar.errors").attr("RelaxationDivergedError");
      py::object error = type(e.msg(), e.node(), e.step());
      PyErr_SetObject(type.ptr(), error.ptr());
    } catch (const torch_ar::UnsupportedGraph& e) {
      py::object type = py::module_::import("torch_ar.errors").attr("UnsupportedGraphError");
      py::object error = type(e.msg(), e.node());
      PyErr_SetObject(type.ptr(), error.ptr());
    } catch (...) {
      torch::translate_exception_to_python(std::current_exception());
    }
  });
}

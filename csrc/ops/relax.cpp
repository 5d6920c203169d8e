// `torch.ops.torch_ar.relax`: the engine behind ARBackward's backward. It is
// device-generic (it only calls ATen ops and autograd nodes), so one
// CompositeExplicitAutograd kernel serves CPU and CUDA.
#include "engine/engine.h"
#include "engine/graph.h"
#include "ops/forward_values.h"

#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <utility>

namespace torch_ar {

namespace {

using RelaxResult = std::tuple<c10::List<std::optional<at::Tensor>>, std::vector<double>,
                               at::Tensor, at::Tensor, at::Tensor, std::vector<std::string>>;

RelaxResult relax_op(at::TensorList outputs,
                     const c10::List<std::optional<at::Tensor>>& output_grads,
                     at::TensorList leaves, const c10::List<bool>& leaf_is_input,
                     const c10::List<bool>& leaf_needs_grad, int64_t forward_values, double eta,
                     std::optional<int64_t> steps, std::optional<double> tol, int64_t max_steps,
                     c10::string_view init, c10::string_view schedule, c10::string_view granularity,
                     bool trace, bool trace_cosine, std::optional<bool> keep_graph,
                     int64_t check_every,
                     const c10::List<std::optional<at::Tensor>>& backward_weights,
                     bool use_backward_weights, bool drop_activation_derivative,
                     bool weight_update_derivative, bool raise_on_nonfinite, bool fuse_activations,
                     bool cuda_graph, at::TensorList data_indices, c10::string_view evaluation) {
  TORCH_CHECK(outputs.size() == output_grads.size(), "torch_ar.relax: ", outputs.size(),
              " outputs but ", output_grads.size(), " output grads");
  TORCH_CHECK(leaves.size() == leaf_is_input.size() && leaves.size() == leaf_needs_grad.size(),
              "torch_ar.relax: leaves and their flags differ in length");
  TORCH_CHECK(eta > 0.0 && eta <= 1.0, "torch_ar: eta must be in (0, 1], got ", eta);

  EngineConfig config;
  config.eta = eta;
  TORCH_CHECK(!steps || *steps >= 1, "torch_ar: steps must be a positive integer, got ", *steps);
  TORCH_CHECK(!tol || *tol > 0.0, "torch_ar: tol must be positive, got ", *tol);
  // Absent steps and tol: EngineConfig's "not given" (D steps; no tolerance).
  config.steps = steps.value_or(-1);
  config.tol = tol.value_or(-1.0);
  config.max_steps = max_steps;
  config.init = parse_init(std::string(init));
  config.schedule = parse_schedule(std::string(schedule));
  config.granularity = parse_granularity(std::string(granularity));
  config.trace = trace;
  config.trace_cosine = trace_cosine;
  // Absent: do what the running backward asked for (retain_graph).
  config.keep_graph = keep_graph.value_or(torch::autograd::get_current_graph_task_keep_graph());
  config.check_every = check_every;
  config.use_backward_weights = use_backward_weights;
  config.drop_activation_derivative = drop_activation_derivative;
  config.weight_update_derivative = weight_update_derivative;
  config.raise_on_nonfinite = raise_on_nonfinite;
  config.fuse_activations = fuse_activations;
  config.cuda_graph = cuda_graph;
  config.evaluation = parse_evaluation(std::string(evaluation));

  EngineInputs in;
  in.outputs = outputs.vec();
  for (const auto& g : output_grads) {
    std::optional<at::Tensor> opt = g;
    in.output_grads.push_back(opt.has_value() ? *opt : at::Tensor());
  }
  in.leaves = leaves.vec();
  for (bool b : leaf_is_input) in.leaf_is_input.push_back(b);
  for (bool b : leaf_needs_grad) in.leaf_needs_grad.push_back(b);
  // Taken, not copied: each value is freed once its state no longer needs it
  // (kept when the graph is kept for another backward).
  in.forward_values = take_forward_values(forward_values, config.keep_graph);
  TORCH_CHECK(backward_weights.size() == 0 || backward_weights.size() == leaves.size(),
              "torch_ar.relax: backward_weights must be empty or one per leaf");
  for (const auto& w : backward_weights) {
    std::optional<at::Tensor> opt = w;
    in.backward_weights.push_back(opt.has_value() ? *opt : at::Tensor());
  }

  in.data_indices = data_indices.vec();

  EngineResult r = run_engine(std::move(in), config);

  // Plain lists, not tensors: the Python side reads them without an op each.
  c10::List<std::optional<at::Tensor>> grads;
  grads.reserve(r.leaf_grads.size());
  for (auto& g : r.leaf_grads) {
    if (g.defined())
      grads.push_back(std::move(g));
    else
      grads.push_back(std::nullopt);
  }
  const RelaxStats& st = r.stats;
  std::vector<double> summary = {static_cast<double>(st.steps),
                                 static_cast<double>(st.depth),
                                 st.converged ? 1.0 : 0.0,
                                 st.exact_shortcut ? 1.0 : 0.0,
                                 st.max_residual,
                                 config.keep_graph ? 1.0 : 0.0,
                                 st.nonfinite ? 1.0 : 0.0,
                                 static_cast<double>(st.graph_steps),
                                 static_cast<double>(st.fused_activations),
                                 static_cast<double>(st.relaxing_states),
                                 static_cast<double>(st.params_outside_relaxation),
                                 static_cast<double>(static_cast<int>(st.evaluation)),
                                 static_cast<double>(st.sweeps)};
  auto empty = at::empty({0}, at::kDouble);
  return {std::move(grads),
          std::move(summary),
          st.residuals.defined() ? st.residuals : empty,
          st.residual_trace.defined() ? st.residual_trace : empty,
          st.cosine_trace.defined() ? st.cosine_trace : empty,
          st.state_names};
}

at::Tensor differentiable_outputs_op(at::TensorList outputs, at::TensorList leaves) {
  std::vector<bool> r = outputs_reaching(outputs.vec(), leaves.vec());
  auto flags = at::zeros({static_cast<int64_t>(r.size())}, at::kBool);
  for (size_t i = 0; i < r.size(); ++i) flags[i] = static_cast<bool>(r[i]);
  return flags;
}

at::Tensor relaxing_state_values_op(at::TensorList outputs, at::TensorList leaves,
                                    const c10::List<bool>& leaf_is_input, at::TensorList values,
                                    c10::string_view granularity, at::TensorList data_indices) {
  TORCH_CHECK(leaves.size() == leaf_is_input.size(),
              "torch_ar.relaxing_state_values: leaves and leaf_is_input differ in length");
  std::vector<bool> is_input;
  for (bool b : leaf_is_input) is_input.push_back(b);
  std::vector<bool> keep =
      relaxing_state_values(outputs.vec(), leaves.vec(), is_input, values.vec(),
                            parse_granularity(std::string(granularity)), data_indices.vec());
  auto flags = at::zeros({static_cast<int64_t>(keep.size())}, at::kBool);
  auto acc = flags.accessor<bool, 1>();
  for (size_t i = 0; i < keep.size(); ++i) acc[i] = keep[i];
  return flags;
}

} // namespace

TORCH_LIBRARY_IMPL(torch_ar, CompositeExplicitAutograd, m) {
  m.impl("relax", TORCH_FN(relax_op));
  m.impl("differentiable_outputs", TORCH_FN(differentiable_outputs_op));
  m.impl("relaxing_state_values", TORCH_FN(relaxing_state_values_op));
}

} // namespace torch_ar

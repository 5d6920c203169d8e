#include "engine/engine.h"
#include "engine/graph.h"
#include "engine/plan.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <exception>
#include <optional>
#include <thread>
#include <unordered_map>

namespace torch_ar {

bool exact_by_depth(const EngineConfig& c, int64_t steps, int64_t depth) {
  return c.eta == 1.0 && (c.schedule == Schedule::Sweep ? steps >= 1 : steps >= depth);
}

bool can_take_exact_sweep(const EngineConfig& c, int64_t depth) {
  if (c.eta != 1.0 || c.trace || c.trace_cosine || c.tol > 0) return false;
  return c.steps < 0 || exact_by_depth(c, c.steps, depth);
}

bool converged_without_tol(const EngineConfig& c, int64_t steps, int64_t depth, bool nonfinite,
                           double max_residual) {
  return !nonfinite && (exact_by_depth(c, steps, depth) || max_residual <= 1e-6);
}

Evaluation choose_evaluation(const EngineConfig& c, int64_t depth) {
  if (c.evaluation == Evaluation::Literal) return Evaluation::Literal;
  // The exact sweep is the closed form's special case (eta 1, T >= D).
  if (c.evaluation != Evaluation::ExactSweep && can_take_exact_sweep(c, depth))
    return Evaluation::ExactSweep;
  if (c.evaluation == Evaluation::ExactSweep) {
    TORCH_CHECK(can_take_exact_sweep(c, depth),
                "torch_ar: the exact sweep needs eta=1, no trace or tol, and at least D steps");
    return Evaluation::ExactSweep;
  }
  const bool closed_form_gives_it =
      c.steps >= 1 && !c.trace && !c.trace_cosine && c.tol <= 0 && !c.cuda_graph;
  TORCH_CHECK(closed_form_gives_it || c.evaluation != Evaluation::ClosedForm,
              "torch_ar: evaluation='closed_form' needs explicit steps and no trace, trace_cosine, "
              "tol or cuda_graph (those need the literal steps)");
  return closed_form_gives_it ? Evaluation::ClosedForm : Evaluation::Literal;
}

std::vector<bool> relaxing_state_values(const std::vector<at::Tensor>& outputs,
                                        const std::vector<at::Tensor>& leaves,
                                        const std::vector<bool>& leaf_is_input,
                                        const std::vector<at::Tensor>& values,
                                        Granularity granularity,
                                        const std::vector<at::Tensor>& data_indices) {
  at::NoGradGuard no_grad;
  const std::vector<bool> every_leaf(leaves.size(), true);
  CapturedGraph graph = capture_graph(outputs, leaves, leaf_is_input, every_leaf, data_indices);
  Plan plan = make_plan(graph, std::vector<at::Tensor>(graph.roots.size()), granularity);
  std::unordered_map<const torch::autograd::Node*, std::vector<bool>> relaxing;
  for (const auto& slot : plan.slots) {
    if (slot.clamped) continue;
    auto& v = relaxing[graph.nodes[slot.node].get()];
    if (v.size() <= slot.output_nr) v.resize(slot.output_nr + 1, false);
    v[slot.output_nr] = true;
  }
  std::vector<bool> keep(values.size(), false);
  for (size_t i = 0; i < values.size(); ++i) {
    const at::Tensor& t = values[i];
    if (!t.defined() || !t.requires_grad() || !t.grad_fn()) continue;
    auto it = relaxing.find(t.grad_fn().get());
    const uint32_t nr = t.output_nr();
    keep[i] = it != relaxing.end() && nr < it->second.size() && it->second[nr];
  }
  return keep;
}

namespace {

std::vector<at::Tensor> match_forward_values(const Plan& plan,
                                             const std::vector<at::Tensor>& recorded) {
  std::vector<at::Tensor> result(plan.slots.size());
  if (recorded.empty()) return result;
  std::unordered_map<const torch::autograd::Node*, std::vector<at::Tensor>> by_node;
  for (const auto& t : recorded) {
    if (!t.defined() || !t.requires_grad()) continue;
    const auto& fn = t.grad_fn();
    if (!fn) continue;
    auto& v = by_node[fn.get()];
    uint32_t nr = t.output_nr();
    if (v.size() <= nr) v.resize(nr + 1);
    v[nr] = t;
  }
  for (size_t s = 0; s < plan.slots.size(); ++s) {
    const auto& slot = plan.slots[s];
    auto it = by_node.find(plan.graph->nodes[slot.node].get());
    if (it != by_node.end() && slot.output_nr < it->second.size())
      result[s] = it->second[slot.output_nr];
  }
  return result;
}

EngineResult run_here(EngineInputs& in, const EngineConfig& config) {
  at::NoGradGuard no_grad;
  CapturedGraph graph =
      capture_graph(in.outputs, in.leaves, in.leaf_is_input, in.leaf_needs_grad, in.data_indices);
  Plan plan = make_plan(graph, in.output_grads, config.granularity);

  // Release the saved forward values on every exit path unless asked to keep them.
  struct Release {
    const CapturedGraph& graph;
    bool keep;
    ~Release() {
      if (keep) return;
      for (const auto& n : graph.nodes) n->release_variables();
    }
  } release{graph, config.keep_graph};

  EngineResult result;
  Executor executor(plan, config, in.backward_weights);
  const Evaluation evaluation = choose_evaluation(config, plan.depth);
  // From here on the per-state list holds the only references we keep.
  std::vector<at::Tensor> initial = match_forward_values(plan, in.forward_values);
  in.forward_values.clear();
  if (evaluation == Evaluation::ClosedForm) {
    result.leaf_grads = executor.closed_form(std::move(initial),
                                             /*release_saved=*/!config.keep_graph, result.stats);
  } else if (evaluation == Evaluation::ExactSweep) {
    result.leaf_grads = executor.exact_sweep(/*release_saved=*/!config.keep_graph);
    RelaxStats& st = result.stats;
    st.depth = plan.depth;
    st.steps =
        config.steps >= 0 ? config.steps : (config.schedule == Schedule::Sweep ? 1 : plan.depth);
    st.nonfinite = executor.sweep_nonfinite();
    st.converged = !st.nonfinite;
    st.exact_shortcut = true;
    st.evaluation = Evaluation::ExactSweep;
    st.sweeps = 1;
    st.residuals = at::zeros({static_cast<int64_t>(plan.slots.size())}, at::kDouble);
  } else {
    std::vector<at::Tensor> reference;
    if (config.trace_cosine) {
      // The reference is autograd's gradient, whatever the variant.
      EngineConfig exact_config = config;
      exact_config.use_backward_weights = false;
      exact_config.drop_activation_derivative = false;
      Executor exact(plan, exact_config);
      reference = exact.exact_sweep();
    }
    executor.init_states(initial);
    initial.clear();
    result.stats = executor.relax(reference);
    result.leaf_grads = executor.leaf_gradients();
  }
  for (const auto& slot : plan.slots) result.stats.state_names.push_back(slot.name);
  result.stats.relaxing_states = plan.num_relaxing;
  result.stats.params_outside_relaxation = plan.params_outside_relaxation;
  return result;
}

} // namespace

EngineResult run_engine(EngineInputs in, const EngineConfig& config) {
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (!exec_info || exec_info->empty()) return run_here(in, config);

  // Inside torch.autograd.grad(..., inputs=...) the outer task marks which
  // nodes run; our inner nodes are not among them. Run where no task is current.
  at::ThreadLocalState tls;
  std::optional<c10::Stream> stream;
  for (const auto& t : in.outputs) {
    if (t.defined() && t.device().type() != c10::DeviceType::CPU) {
      c10::impl::VirtualGuardImpl impl(t.device().type());
      stream = impl.getStream(t.device());
      break;
    }
  }
  EngineResult result;
  std::exception_ptr error;
  std::thread worker([&] {
    try {
      at::init_num_threads(); // honour torch.set_num_threads in this thread too
      at::ThreadLocalStateGuard guard(tls);
      std::optional<c10::StreamGuard> stream_guard;
      if (stream) stream_guard.emplace(*stream);
      result = run_here(in, config);
    } catch (...) {
      error = std::current_exception();
    }
  });
  worker.join();
  if (error) std::rethrow_exception(error);
  return result;
}

} // namespace torch_ar

#include "engine/relaxation.h"

#include "engine/closed_form.h"
#include "engine/direct_feedback.h"
#include "engine/engine.h"
#include "engine/errors.h"
#include "engine/exact_sweep.h"
#include "engine/literal_steps.h"
#include "engine/per_device.h"
#include "engine/router.h"
#include "engine/worker_thread.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/csrc/autograd/graph_task.h>

#include <optional>
#include <unordered_map>
#include <utility>

namespace torch_ar {

namespace {

using RecordedByNode = std::unordered_map<const torch::autograd::Node*, std::vector<at::Tensor>>;

at::Tensor recorded_output(const RecordedByNode& by_node, const torch::autograd::Node* node,
                           uint32_t output_nr) {
  auto it = by_node.find(node);
  if (it == by_node.end() || output_nr >= it->second.size()) return at::Tensor();
  return it->second[output_nr];
}

// A state whose tensor never surfaced at the torch level (made inside a
// composite op: matmul's expand and view, a 3-D F.linear's final view) is an
// earlier tensor of its layer that did, seen through view-like ops: replay
// them on it. Undefined when another kind of op lies between. `base` gets the
// recorded tensor it starts from (what must be kept to replay it again).
at::Tensor replay_views(const Plan& plan, const StateSlot& slot, const RecordedByNode& by_node,
                        at::Tensor* base) {
  if (slot.layer < 0 || slot.output_nr != 0) return at::Tensor();
  const std::vector<int>& chain = plan.layers[slot.layer].chain; // top first
  if (chain.empty() || chain[0] != slot.node) return at::Tensor();
  size_t k = 1;
  at::Tensor value;
  for (; k < chain.size(); ++k) {
    // The output of node k that node k - 1 reads (a multi-output node's
    // other outputs are not this chain's).
    const torch::autograd::Node* reader = plan.graph->nodes[chain[k - 1]].get();
    const torch::autograd::Node* node = plan.graph->nodes[chain[k]].get();
    if (reader->num_outputs() != 1 || reader->next_edge(0).function.get() != node)
      return at::Tensor();
    value = recorded_output(by_node, node, reader->next_edge(0).input_nr);
    if (value.defined()) break;
  }
  if (!value.defined()) return at::Tensor();
  *base = value;
  at::NoGradGuard no_grad;
  value = value.detach();
  using namespace torch::autograd::generated;
  for (size_t j = k; j-- > 0;) {
    torch::autograd::Node* node = plan.graph->nodes[chain[j]].get();
    if (node->num_inputs() != 1) return at::Tensor();
    const std::string name = node->name();
    const auto shape = C10_AS_INTARRAYREF_SLOW(node->input_metadata(0).shape_as_dim_vector());
    if (name == "ViewBackward0" || name == "UnsafeViewBackward0" ||
        name == "ReshapeAliasBackward0" || name == "AliasBackward0" ||
        name == "UnsqueezeBackward0" || name == "SqueezeBackward0" || name == "SqueezeBackward1" ||
        name == "SqueezeBackward2") {
      value = value.reshape(shape);
    } else if (name == "ExpandBackward0") {
      value = value.expand(shape);
    } else if (auto* t = dynamic_cast<TransposeBackward0*>(node)) {
      value = value.transpose(t->dim0, t->dim1);
    } else if (auto* p = dynamic_cast<PermuteBackward0*>(node)) {
      value = value.permute(p->dims);
    } else if (name == "TBackward0") {
      value = value.t();
    } else {
      return at::Tensor();
    }
    if (value.sizes() != shape) return at::Tensor();
  }
  return value;
}

// Per state slot: the recorded forward value of its tensor, or its replay
// from an earlier tensor of its layer (replay_views), if any. `kept`, when
// given, receives what must be kept to match them again: the recorded
// tensors used, one per slot with a value.
std::vector<at::Tensor> match_forward_values(const Plan& plan,
                                             const std::vector<at::Tensor>& recorded,
                                             std::vector<at::Tensor>* kept = nullptr) {
  std::vector<at::Tensor> result(plan.slots.size());
  if (kept) kept->assign(plan.slots.size(), at::Tensor());
  if (recorded.empty()) return result;
  RecordedByNode by_node;
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
    result[s] = recorded_output(by_node, plan.graph->nodes[slot.node].get(), slot.output_nr);
    at::Tensor base = result[s];
    if (!result[s].defined()) result[s] = replay_views(plan, slot, by_node, &base);
    if (kept && result[s].defined()) (*kept)[s] = base;
  }
  return result;
}

// Runs `body` where no outer graph task's exec_info is current: inside
// torch.autograd.grad(..., inputs=...) the outer task marks which nodes run,
// and our inner nodes are not among them (see engine/worker_thread.h).
template <typename Body>
void outside_graph_task(const std::vector<at::Tensor>& outputs, Body&& body) {
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (!exec_info || exec_info->empty()) {
    body();
    return;
  }
  run_on_worker_thread(outputs, body);
}

} // namespace

Relaxation::Relaxation(EngineConfig config) : config_(std::move(config)) {}

std::vector<bool> Relaxation::capture(const std::vector<at::Tensor>& outputs,
                                      std::vector<at::Tensor> leaves,
                                      std::vector<bool> leaf_is_input,
                                      std::vector<bool> leaf_needs_grad,
                                      const std::vector<at::Tensor>& forward_values,
                                      std::vector<at::Tensor> data_indices) {
  TORCH_CHECK(leaves.size() == leaf_is_input.size() && leaves.size() == leaf_needs_grad.size(),
              "torch_ar: leaves and their flags differ in length");
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> wanted;
  for (size_t i = 0; i < leaves.size(); ++i)
    if (leaf_needs_grad[i]) wanted.push_back(leaves[i]);
  std::vector<bool> differentiable =
      outputs.empty() ? std::vector<bool>() : outputs_reaching(outputs, wanted);
  outputs_.clear();
  for (size_t i = 0; i < outputs.size(); ++i)
    if (differentiable[i]) outputs_.push_back(outputs[i]);
  leaves_ = std::move(leaves);
  leaf_is_input_ = std::move(leaf_is_input);
  data_indices_ = std::move(data_indices);
  released_ = false;
  forward_values_.clear();
  if (outputs_.empty()) return differentiable;

  plan_for(std::vector<at::Tensor>(), leaf_needs_grad);
  if (config_.needs_forward_values() && !forward_values.empty()) {
    // Only the relaxing states' values stay: the rest (pre-activations, say)
    // would otherwise outlive the forward.
    std::vector<at::Tensor> kept;
    std::vector<at::Tensor> matched = match_forward_values(*plan_, forward_values, &kept);
    for (size_t s = 0; s < matched.size(); ++s)
      if (matched[s].defined() && !plan_->slots[s].clamped)
        forward_values_.push_back(std::move(kept[s]));
  }
  return differentiable;
}

void Relaxation::plan_for(const std::vector<at::Tensor>& output_grads,
                          const std::vector<bool>& leaf_needs_grad) {
  // Empty output_grads: the forward's assumption, a loss gradient at every
  // differentiable output.
  const std::vector<bool> has_grad = output_grads.empty() ? std::vector<bool>(outputs_.size(), true)
                                                          : roots_with_grad(output_grads);
  plan_.reset(); // it points into the graph it replaces
  graph_ = std::make_unique<CapturedGraph>(
      capture_graph(outputs_, leaves_, leaf_is_input_, leaf_needs_grad, data_indices_));
  plan_ = std::make_unique<Plan>(make_plan(*graph_, has_grad, config_.granularity));
  planned_needs_ = leaf_needs_grad;
}

void Relaxation::check_loss_gradients(const std::vector<at::Tensor>& output_grads) const {
  // A NaN/Inf loss gradient is no divergence of the relaxation (no eta or
  // step count helps): say where it comes from before relaxing.
  std::vector<at::Tensor> flags;
  std::vector<size_t> which;
  for (size_t i = 0; i < output_grads.size(); ++i) {
    if (!output_grads[i].defined() || output_grads[i].numel() == 0) continue;
    flags.push_back(at::isfinite(output_grads[i]).all());
    which.push_back(i);
  }
  if (flags.empty()) return;
  const at::Tensor host = join_on_one_device(flags, /*stack=*/true).to(at::kCPU);
  auto acc = host.accessor<bool, 1>();
  for (int64_t k = 0; k < host.size(0); ++k) {
    if (acc[k]) continue;
    const std::string output = "output " + std::to_string(which[k]);
    throw RelaxationDiverged(
        "torch_ar: relaxation cannot start (step 0): the loss gradient of "
        "the module's " +
            output + " (node '" + output +
            "') is NaN or infinite. Check the inputs, the module's outputs, "
            "the loss and the targets for NaN/Inf.",
        output, 0);
  }
}

std::vector<at::Tensor> Relaxation::backward(std::vector<at::Tensor> output_grads,
                                             const std::vector<bool>& leaf_needs_grad,
                                             const std::vector<at::Tensor>& backward_weights,
                                             bool keep_graph, std::vector<std::string> leaf_names) {
  TORCH_CHECK(!released_,
              "torch_ar: trying to backward through the graph a second time; its saved forward "
              "values were freed after the first backward. Specify retain_graph=True on the "
              "first backward to backward twice.");
  TORCH_CHECK(output_grads.size() == outputs_.size(), "torch_ar: ", outputs_.size(),
              " differentiable outputs but ", output_grads.size(), " output grads");
  TORCH_CHECK(leaf_needs_grad.size() == leaves_.size(), "torch_ar: ", leaves_.size(),
              " leaves but ", leaf_needs_grad.size(), " needs");
  TORCH_CHECK(backward_weights.empty() || backward_weights.size() == leaves_.size(),
              "torch_ar: backward_weights must be empty or one per leaf");
  config_.keep_graph = keep_graph;
  leaf_names_ = std::move(leaf_names);
  if (config_.raise_on_nonfinite) check_loss_gradients(output_grads);
  std::vector<at::Tensor> grads;
  outside_graph_task(outputs_, [&] {
    at::NoGradGuard no_grad;
    if (!plan_ || leaf_needs_grad != planned_needs_ ||
        !expects_loss_gradients(*plan_, output_grads))
      plan_for(output_grads, leaf_needs_grad);
    bind_loss_gradients(*plan_, output_grads);
    grads = run(backward_weights, output_grads);
  });
  if (!keep_graph) release();
  return grads;
}

std::vector<at::Tensor> Relaxation::run(const std::vector<at::Tensor>& backward_weights,
                                        const std::vector<at::Tensor>& output_grads) {
  const Plan& plan = *plan_;
  // Release the saved forward values on every exit path unless asked to keep them.
  struct Release {
    const CapturedGraph& graph;
    bool keep;
    ~Release() {
      if (keep) return;
      for (const auto& n : graph.nodes) n->release_variables();
    }
  } release{*graph_, config_.keep_graph};

  stats_ = RelaxStats();
  std::vector<at::Tensor> leaf_grads;
  Router router(plan, config_, backward_weights, leaf_names_);
  const Evaluation evaluation = choose_evaluation(config_, plan.depth);
  std::vector<at::Tensor> reference;
  if (evaluation == Evaluation::Literal && config_.trace_cosine) {
    // The reference is autograd's gradient, whatever the variant: taken
    // before direct feedback binds its constants into the plan.
    EngineConfig exact_config = config_;
    exact_config.use_backward_weights = false;
    exact_config.drop_activation_derivative = false;
    exact_config.direct_feedback = false;
    Router exact(plan, exact_config);
    reference = ExactSweep(exact).run();
  }
  if (config_.direct_feedback) {
    Router feedback(plan, config_, backward_weights, leaf_names_);
    bind_direct_feedback(*plan_, feedback, output_grads);
  }
  // From here on the per-state list holds the only references we keep.
  std::vector<at::Tensor> initial = match_forward_values(plan, forward_values_);
  if (!config_.keep_graph) forward_values_.clear();
  const bool release_saved = !config_.keep_graph;
  if (evaluation == Evaluation::ClosedForm) {
    leaf_grads = ClosedForm(router).run(std::move(initial), release_saved, stats_);
  } else if (evaluation == Evaluation::ExactSweep) {
    ExactSweep sweep(router);
    leaf_grads = sweep.run(release_saved);
    stats_.depth = plan.depth;
    stats_.steps =
        config_.steps >= 0 ? config_.steps : (config_.schedule == Schedule::Sweep ? 1 : plan.depth);
    stats_.nonfinite = sweep.nonfinite();
    stats_.converged = !stats_.nonfinite;
    stats_.exact_shortcut = true;
    stats_.evaluation = Evaluation::ExactSweep;
    stats_.sweeps = 1;
    stats_.residuals = at::zeros({static_cast<int64_t>(plan.slots.size())}, at::kDouble);
  } else {
    LiteralSteps steps(router);
    steps.init_states(initial);
    initial.clear();
    stats_ = steps.relax(reference);
    leaf_grads = steps.leaf_gradients();
  }
  for (const auto& slot : plan.slots) stats_.state_names.push_back(slot.name);
  stats_.relaxing_states = plan.num_relaxing;
  stats_.params_outside_relaxation = plan.params_outside_relaxation;
  return leaf_grads;
}

void Relaxation::release() {
  released_ = true;
  plan_.reset();
  graph_.reset();
  outputs_.clear();
  leaves_.clear();
  data_indices_.clear();
  forward_values_.clear();
}

} // namespace torch_ar

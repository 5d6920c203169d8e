#include "engine/router.h"

#include "engine/node_vjp.h"

#include <ATen/ATen.h>

#include <cfloat>
#include <limits>

namespace torch_ar {

Router::Router(const Plan& plan, const EngineConfig& config,
               std::vector<at::Tensor> backward_weights, std::vector<std::string> leaf_names)
    : plan_(plan),
      graph_(*plan.graph),
      config_(config),
      backward_weights_(std::move(backward_weights)),
      leaf_names_(std::move(leaf_names)) {
  backward_weights_.resize(graph_.leaf_kind.size());
  backward_weights_read_direct_.resize(backward_weights_.size());
  for (size_t i = 0; i < backward_weights_.size(); ++i)
    if (backward_weights_[i].defined() && backward_weights_[i].dim() == 2)
      backward_weights_read_direct_[i] = backward_weights_[i].t();
  const size_t S = plan_.slots.size();
  vjp_dtype_.resize(S);
  state_dtype_.resize(S);
  for (size_t s = 0; s < S; ++s) {
    const auto& slot = plan_.slots[s];
    vjp_dtype_[s] = c10::typeMetaToScalarType(
        graph_.nodes[slot.node]->input_metadata(slot.output_nr).options().dtype());
    // Reduced-precision activations relax in float32: a bfloat16 state would
    // round away increments below half an ulp and stall.
    const bool reduced = vjp_dtype_[s] == at::kBFloat16 || vjp_dtype_[s] == at::kHalf;
    state_dtype_[s] = reduced ? at::kFloat : vjp_dtype_[s];
    if (!slot.clamped && slot.needed) relaxing_.push_back(static_cast<int>(s));
  }
  leaf_grad_.resize(graph_.leaf_kind.size());
  param_side_buf_.resize(graph_.nodes.size());
}

double Router::denormal_floor() const {
  // Tiny decaying states turn denormal and slow every CPU op: flush them.
  bool reduced = false;
  for (int s : relaxing_) reduced = reduced || state_dtype_[s] != at::kDouble;
  return reduced ? static_cast<double>(FLT_MIN) : DBL_MIN;
}

at::Tensor Router::initial_state(int s, const at::Tensor& forward_value, bool may_alias) const {
  const at::Tensor fv = forward_value.detach();
  if (fv.numel() == 0) return fv.to(state_dtype_[s]);
  double largest = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fv.scalar_type(), "initial_state", [&] {
    largest = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  // |v| >= largest / 2 holds for +-inf too; NaN compares false and goes
  // through nan_to_num (or the update kernel, which reads it as zero).
  const at::Tensor sentinel = fv.abs() >= largest / 2;
  if (may_alias && fv.scalar_type() == state_dtype_[s] && !sentinel.any().item<bool>()) return fv;
  at::Tensor x = fv.to(fv.options().dtype(state_dtype_[s]), /*non_blocking=*/false, /*copy=*/true);
  x.masked_fill_(sentinel, 0.0);
  at::nan_to_num_(x, 0.0, 0.0, 0.0);
  return x;
}

VjpRule Router::rule_for(const Layer& layer, size_t q, Pass pass) const {
  VjpRule rule;
  if (config_.exact_rule() || pass == Pass::Gradient || pass == Pass::Full) return rule;
  if (pass == Pass::WeightGrad) {
    // The weight update sees the state through f' unless asked otherwise:
    // the f' of the activations right after the weight op. An activation
    // behind another structural op (the ReLU after a block's BatchNorm or
    // residual add) belongs to that op's layer at layer granularity, where
    // the update never sees it; a block keeps that, so the fixed point does
    // not depend on the granularity.
    bool behind_structural = false;
    for (size_t r = q + 1; r + 1 < layer.chain.size(); ++r)
      behind_structural = behind_structural || starts_layer(layer.ops[r]);
    rule.drop_activation_derivative = config_.drop_activation_derivative &&
                                      (!config_.weight_update_derivative || behind_structural);
    return rule;
  }
  rule.drop_activation_derivative = config_.drop_activation_derivative;
  const OpInfo* op = layer.ops[q];
  if (config_.use_backward_weights && op && op->psi_vjp)
    rule.backward_weight = &backward_weight_for(layer, q);
  return rule;
}

std::string Router::leaf_name(int leaf) const {
  if (leaf >= 0 && static_cast<size_t>(leaf) < leaf_names_.size() && !leaf_names_[leaf].empty())
    return "'" + leaf_names_[leaf] + "'";
  return "leaf " + std::to_string(leaf);
}

const at::Tensor& Router::backward_weight_for(const Layer& layer, size_t q) const {
  const auto& node = *graph_.nodes[layer.chain[q]];
  const std::vector<int>& sources = layer.weight_sources[q];
  // The parameter whose psi replaces the operand: the weight itself, or the
  // one parameter with a psi among those a computed weight is made from.
  std::vector<int> with_psi;
  for (int leaf : sources)
    if (backward_weights_[leaf].defined()) with_psi.push_back(leaf);
  auto names = [&](const std::vector<int>& leaves) {
    std::string out;
    for (int leaf : leaves) out += (out.empty() ? "" : ", ") + leaf_name(leaf);
    return out.empty() ? std::string("no parameter") : out;
  };
  TORCH_CHECK(
      with_psi.size() == 1, "torch_ar: this variant replaces the weight of every linear ",
      "and convolution op by a backward weight psi, but the weight node '", node.name(),
      "' reads is made from ", names(sources),
      with_psi.empty() ? std::string(", none of which has a backward weight")
                       : ", of which " + names(with_psi) + " have backward weights",
      ". Backward weights are created for the weights of nn.Linear, nn.Conv1d/2d/3d ",
      "and Hugging Face Conv1D modules (parametrised ones too) and nn.MultiheadAttention's ",
      "input projections; give another parameter one with ARBackward(..., ",
      "backward_weight_params=[name]). A weight made from no parameter, or a slice of ",
      "one (a packed projection read in parts), cannot have one.");
  const int leaf = with_psi[0];
  const at::Tensor& psi = backward_weights_[leaf];
  // A 2-D psi is kept as W^T, the operand F.linear reads; an op that reads
  // W itself (addmm(b, x, W), x @ W) takes its transpose.
  TORCH_CHECK(psi.dim() == 2 || !layer.weight_transposed[q], "torch_ar: node '", node.name(),
              "' reads the ", psi.dim(), "-D weight ", leaf_name(leaf),
              " through a transpose; a backward weight of more than two dimensions replaces a "
              "convolution's kernel as it is");
  const auto& shape = layer.weight_operand_shape[q];
  if (config_.direct_feedback) {
    // psi is kept as the operand the op reads, with the error's size in
    // place of the op's outputs (dim 1 of a linear op's [in, out] operand,
    // dim 0 of a kernel): the same whichever way the op reads W. A kernel's
    // dim 1 is every input channel, which a grouped convolution's weight
    // splits (checked against the op's input in direct_feedback.cpp).
    const int64_t out_dim = psi.dim() == 2 ? 1 : 0;
    bool fits = psi.dim() == static_cast<int64_t>(shape.size());
    for (int64_t d = 0; fits && d < psi.dim(); ++d)
      fits = d == out_dim || (psi.dim() > 2 && d == 1) || psi.size(d) == shape[d];
    TORCH_CHECK(fits, "torch_ar: the direct feedback weight of ", leaf_name(leaf), " (shape ",
                psi.sizes(), ") cannot stand for the weight that node '", node.name(),
                "' reads (shape ", c10::IntArrayRef(shape),
                "): it must have the operand's shape with the output error's size in place of "
                "the op's outputs ([in, output_dim] for a linear op, [output_dim, in, *kernel] "
                "for a convolution)");
    return psi;
  }
  const at::Tensor& operand =
      psi.dim() != 2 || layer.weight_transposed[q] ? psi : backward_weights_read_direct_[leaf];
  TORCH_CHECK(operand.sizes().vec() == shape, "torch_ar: the backward weight of ", leaf_name(leaf),
              " (shape ", psi.sizes(), ") cannot replace the weight that node '", node.name(),
              "' reads (shape ", c10::IntArrayRef(shape),
              "): psi has W^T's shape for a 2-D weight and W's for a kernel, where W is the "
              "weight as the op reads it");
  return operand;
}

bool Router::cut_by_direct_feedback(const Layer& layer, size_t q, Pass pass) const {
  if (!config_.direct_feedback) return false;
  if (pass != Pass::Relax && pass != Pass::Propagate && pass != Pass::InputGrad) return false;
  const OpInfo* op = layer.ops[q];
  return op && op->psi_vjp;
}

variable_list Router::layer_inputs(int L, const std::vector<at::Tensor>& x, bool relaxing,
                                   bool clamped) const {
  const Layer& layer = plan_.layers[L];
  variable_list grads(layer.out_slots.size());
  for (size_t k = 0; k < layer.out_slots.size(); ++k) {
    const int s = layer.out_slots[k];
    if (s < 0) continue;
    const bool is_clamped = plan_.slots[s].clamped;
    const at::Tensor& v = is_clamped ? plan_.slots[s].ext : x[s];
    if (!v.defined() || (is_clamped ? !clamped : !relaxing)) continue;
    grads[k] = v.scalar_type() == vjp_dtype_[s] ? v : v.to(vjp_dtype_[s]);
  }
  return grads;
}

void Router::run_layer(int L, Pass pass, const std::vector<at::Tensor>& x, StateSink* sink) {
  if (!plan_.layers[L].has_work[static_cast<int>(pass)]) return;
  variable_list grads = layer_inputs(L, x, /*relaxing=*/true, /*clamped=*/true);
  bool any = false;
  for (const auto& g : grads) any = any || g.defined();
  if (any) propagate(L, pass, std::move(grads), sink);
}

void Router::propagate(int L, Pass pass, variable_list grads, StateSink* sink) {
  const Layer& layer = plan_.layers[L];
  const int p = static_cast<int>(pass);
  if (!layer.has_work[p] || cut_by_direct_feedback(layer, 0, pass)) return;
  auto& node = *graph_.nodes[layer.chain[0]];
  variable_list out =
      node_vjp(node, layer.ops[0], std::move(grads), layer.masks[p][0], rule_for(layer, 0, pass));
  propagate_from(L, pass, 0, std::move(out), sink);
}

void Router::propagate_from(int L, Pass pass, size_t first, variable_list out, StateSink* sink) {
  const Layer& layer = plan_.layers[L];
  const int p = static_cast<int>(pass);
  if (!layer.has_work[p]) return;
  variable_list grads;
  for (size_t q = first; q < layer.chain.size(); ++q) {
    const auto& mask = layer.masks[p][q];
    if (q > first) {
      if (cut_by_direct_feedback(layer, q, pass)) break;
      auto& node = *graph_.nodes[layer.chain[q]];
      out = node_vjp(node, layer.ops[q], std::move(grads), mask, rule_for(layer, q, pass));
    }
    grads.clear();
    const auto& targets = layer.targets[q];
    for (size_t j = 0; j < out.size(); ++j) {
      if (!mask[j] || !out[j].defined()) continue;
      const EdgeTarget& t = targets[j];
      switch (t.kind) {
        case TargetKind::Chain:
          grads.assign(1, out[j]);
          break;
        case TargetKind::State:
          TORCH_INTERNAL_ASSERT(sink, "torch_ar: a pass without states reached state ", t.index);
          sink->add(t.index, std::move(out[j]));
          break;
        case TargetKind::Leaf:
          contribute_leaf(t.index, out[j]);
          break;
        case TargetKind::ParamSide:
          contribute_param_side(t, out[j]);
          break;
        case TargetKind::None:
          break;
      }
    }
    if (grads.empty()) break; // nothing flows further down the chain
  }
}

void Router::contribute_leaf(int leaf, const at::Tensor& grad) {
  at::Tensor& acc = leaf_grad_[leaf];
  acc = acc.defined() ? acc + grad : grad;
}

void Router::contribute_param_side(const EdgeTarget& t, const at::Tensor& grad) {
  auto& buf = param_side_buf_[t.index];
  if (buf.empty()) buf.resize(graph_.nodes[t.index]->num_inputs());
  at::Tensor& acc = buf[t.input_nr];
  acc = acc.defined() ? acc + grad : grad;
}

void Router::reset_gradients() {
  for (auto& g : leaf_grad_) g = at::Tensor();
  for (auto& b : param_side_buf_) b.clear();
  for (const auto& [t, grad] : plan_.param_side_ext) contribute_param_side(t, grad);
}

void Router::propagate_param_side() {
  for (int n : plan_.param_side_nodes) {
    auto& buf = param_side_buf_[n];
    if (buf.empty()) continue;
    const auto& mask = plan_.param_side_masks[n];
    bool want = false;
    for (bool m : mask) want = want || m;
    variable_list grads = std::move(buf);
    buf.clear();
    if (!want) continue;
    auto& node = *graph_.nodes[n];
    variable_list out = node_vjp(node, nullptr, std::move(grads), mask);
    const auto& targets = plan_.param_side_targets[n];
    for (size_t j = 0; j < out.size(); ++j) {
      if (!mask[j] || !out[j].defined()) continue;
      if (targets[j].kind == TargetKind::Leaf)
        contribute_leaf(targets[j].index, out[j]);
      else if (targets[j].kind == TargetKind::ParamSide)
        contribute_param_side(targets[j], out[j]);
    }
  }
}

std::vector<at::Tensor> Router::take_leaf_contributions() {
  std::vector<at::Tensor> taken(leaf_grad_.size());
  taken.swap(leaf_grad_);
  return taken;
}

std::vector<at::Tensor> Router::finish_leaf_gradients() {
  // Outputs that are leaves themselves pass their loss gradient straight on.
  std::vector<at::Tensor> result(leaf_grad_.size());
  for (size_t l = 0; l < result.size(); ++l) {
    const at::Tensor& direct = plan_.leaf_direct[l];
    if (direct.defined()) contribute_leaf(static_cast<int>(l), direct);
    if (graph_.leaf_needs_grad[l]) result[l] = leaf_grad_[l];
  }
  return result;
}

} // namespace torch_ar

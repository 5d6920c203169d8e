// The relaxation loop: x <- x + eta * (ext + sum_c VJP_c(x_c) - x), Jacobi
// (every layer reads the previous step) or sweep (reverse topological
// Gauss-Seidel). No Python runs inside it.
#include "engine/executor.h"
#include "engine/node_vjp.h"
#include "ops/relax_update.h"

#include <ATen/ATen.h>

#include <cfloat>
#include <limits>
#include <cmath>
#include <sstream>

namespace torch_ar {

Executor::Executor(
    const Plan& plan,
    const EngineConfig& config,
    const std::vector<at::Tensor>& backward_weights)
    : plan_(plan), backward_weights_(backward_weights), graph_(*plan.graph), config_(config) {
  backward_weights_.resize(graph_.leaf_kind.size());
  const size_t S = plan_.slots.size();
  x_.resize(S);
  target_.resize(S);
  fresh_.assign(S, 0);
  vjp_dtype_.resize(S);
  for (size_t s = 0; s < S; ++s) {
    const auto& slot = plan_.slots[s];
    vjp_dtype_[s] = c10::typeMetaToScalarType(
        graph_.nodes[slot.node]->input_metadata(slot.output_nr).options().dtype());
  }
  for (size_t s = 0; s < S; ++s)
    if (!plan_.slots[s].clamped && plan_.slots[s].needed) relaxing_.push_back(static_cast<int>(s));
  leaf_grad_.resize(graph_.leaf_kind.size());
  param_side_buf_.resize(graph_.nodes.size());
  constant_contrib_.resize(plan_.layers.size());
  constant_ready_.assign(plan_.layers.size(), 0);
}

void Executor::init_states(const std::vector<at::Tensor>& forward_values) {
  persistent_targets_ = true;
  for (size_t s = 0; s < plan_.slots.size(); ++s) {
    const StateSlot& slot = plan_.slots[s];
    const auto& meta = graph_.nodes[slot.node]->input_metadata(slot.output_nr);
    if (slot.clamped) {
      x_[s] = slot.ext;
      continue;
    }
    if (!slot.needed) continue;
    const at::Tensor& fv = forward_values.empty() ? at::Tensor() : forward_values[s];
    // Reduced-precision activations relax in float32: a bfloat16 state would
    // round away increments below half an ulp and stall.
    auto options = meta.options();
    if (vjp_dtype_[s] == at::kBFloat16 || vjp_dtype_[s] == at::kHalf)
      options = options.dtype(at::kFloat);
    if (config_.init == InitMode::Forward && fv.defined()) {
      x_[s] = fv.detach().to(options, /*non_blocking=*/false, /*copy=*/true).contiguous();
    } else {
      x_[s] = at::zeros_symint(meta.shape_as_dim_vector(), options);
    }
    target_[s] = at::empty_like(x_[s]);
  }
}

double Executor::flush_below() const {
  // Tiny decaying states turn denormal and slow every CPU op: flush them.
  bool reduced = false;
  for (int s : relaxing_) reduced = reduced || x_[s].scalar_type() != at::kDouble;
  return reduced ? static_cast<double>(FLT_MIN) : DBL_MIN;
}

void Executor::begin_step() { std::fill(fresh_.begin(), fresh_.end(), 0); }

void Executor::contribute_state(int s, at::Tensor grad) {
  if (persistent_targets_) {
    if (!fresh_[s]) {
      const at::Tensor& ext = plan_.slots[s].ext;
      at::Tensor& target = target_[s];
      // Take over a fresh VJP result nobody else holds instead of copying it.
      const bool owned = grad.use_count() == 1 && grad.storage().use_count() == 1 &&
          grad.scalar_type() == target.scalar_type() && grad.is_contiguous() &&
          grad.device() == target.device() && grad.sizes().equals(target.sizes());
      if (owned) {
        if (ext.defined()) grad.add_(ext);
        target = std::move(grad);
      } else if (ext.defined()) {
        at::add_out(target, ext, grad);
      } else {
        target.copy_(grad);
      }
      fresh_[s] = 1;
    } else {
      target_[s].add_(grad);
    }
    return;
  }
  // Single sweep: out of place, since a VJP may hand back an alias of a state.
  if (!fresh_[s]) {
    target_[s] = plan_.slots[s].ext.defined() ? plan_.slots[s].ext + grad : grad;
    fresh_[s] = 1;
  } else {
    target_[s] = target_[s] + grad;
  }
}

void Executor::fill_missing_targets() {
  for (int s : relaxing_) {
    if (fresh_[s]) continue;
    if (plan_.slots[s].ext.defined()) target_[s].copy_(plan_.slots[s].ext);
    else target_[s].zero_();
    fresh_[s] = 1;
  }
}

VjpRule Executor::rule_for(const Layer& layer, size_t q, Pass pass) const {
  VjpRule rule;
  if (config_.exact_rule() || pass == Pass::Gradient || pass == Pass::Full) return rule;
  if (pass == Pass::WeightGrad) {
    // The weight update sees the state through f' unless asked otherwise.
    rule.drop_activation_derivative =
        config_.drop_activation_derivative && !config_.weight_update_derivative;
    return rule;
  }
  rule.drop_activation_derivative = config_.drop_activation_derivative;
  const OpInfo* op = layer.ops[q];
  if (config_.use_backward_weights && op && op->psi_vjp) {
    const int leaf = layer.weight_leaf[q];
    const auto& node = *graph_.nodes[layer.chain[q]];
    TORCH_CHECK(
        leaf >= 0 && backward_weights_[leaf].defined(),
        "torch_ar: this variant replaces W by a backward weight psi in every linear "
        "and convolution layer, but the weight of node '", node.name(),
        "' has none. Backward weights are created for nn.Linear and nn.Conv1d/2d/3d "
        "modules; compute this layer with such a module.");
    rule.backward_weight = &backward_weights_[leaf];
  }
  return rule;
}

void Executor::run_layer(int L, Pass pass) {
  const Layer& layer = plan_.layers[L];
  const int p = static_cast<int>(pass);
  if (!layer.has_work[p]) return;

  if (pass == Pass::Relax && layer.constant) {
    // Outputs are clamped: the contributions are the same every step.
    if (!constant_ready_[L]) {
      constant_ready_[L] = 1;
      // Fall through once and record what the layer sends.
    } else {
      for (const auto& [s, grad] : constant_contrib_[L]) contribute_state(s, grad);
      return;
    }
  }

  variable_list grads(layer.out_slots.size());
  bool any = false;
  for (size_t k = 0; k < layer.out_slots.size(); ++k) {
    int s = layer.out_slots[k];
    if (s >= 0 && x_[s].defined()) {
      grads[k] = x_[s].scalar_type() == vjp_dtype_[s] ? x_[s] : x_[s].to(vjp_dtype_[s]);
      any = true;
    }
  }
  if (!any) return;

  for (size_t q = 0; q < layer.chain.size(); ++q) {
    const auto& mask = layer.masks[p][q];
    auto& node = *graph_.nodes[layer.chain[q]];
    variable_list out =
        node_vjp(node, layer.ops[q], std::move(grads), mask, rule_for(layer, q, pass));
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
          if (pass == Pass::Relax && layer.constant)
            constant_contrib_[L].emplace_back(t.index, out[j]);
          contribute_state(t.index, std::move(out[j]));
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
    if (grads.empty()) break;  // nothing flows further down the chain
  }
}

at::Tensor Executor::update(const std::vector<int>& slots) {
  std::vector<at::Tensor> xs, ts;
  xs.reserve(slots.size());
  ts.reserve(slots.size());
  for (int s : slots) {
    xs.push_back(x_[s]);
    ts.push_back(target_[s]);
  }
  return relax_update_(xs, ts, config_.eta, flush_below());
}

bool Executor::check_finite(at::Tensor& norms, const std::vector<int>& slots, int64_t step) {
  auto acc = norms.accessor<double, 2>();
  for (size_t i = 0; i < slots.size(); ++i) {
    if (std::isfinite(acc[i][0]) && std::isfinite(acc[i][1])) continue;
    const at::Tensor& x = x_[slots[i]];
    const at::Tensor& t = target_[slots[i]];
    if (at::isfinite(x).all().item<bool>() && at::isfinite(t).all().item<bool>()) {
      // Finite but huge: the sum of squares overflowed. Recompute scaled; the
      // residual before the update is (target - x_new) / (1 - eta).
      auto scaled_norm = [](const at::Tensor& v) {
        at::Tensor d = v.to(at::kDouble);
        const double scale = d.abs().max().item<double>();
        return scale == 0.0 ? 0.0 : (d / scale).norm().item<double>() * scale;
      };
      acc[i][1] = scaled_norm(t);
      acc[i][0] = config_.eta < 1.0 ? scaled_norm(t - x) / (1.0 - config_.eta) : acc[i][1];
      continue;
    }
    if (!config_.raise_on_nonfinite) return false;
    const StateSlot& slot = plan_.slots[slots[i]];
    std::ostringstream msg;
    msg << "torch_ar: relaxation diverged at step " << step << ": the state of node '"
        << slot.name << "' became " << (std::isnan(acc[i][0]) ? "NaN" : "infinite")
        << " (eta=" << config_.eta << "). Check the inputs and the loss for NaN/Inf, "
        << "or use a smaller eta.";
    TORCH_CHECK(false, msg.str());
  }
  return true;
}

RelaxStats Executor::relax(const std::vector<at::Tensor>& reference_grads) {
  RelaxStats stats;
  stats.depth = plan_.depth;
  const bool sweep = config_.schedule == Schedule::Sweep;
  int64_t limit = config_.steps;
  if (limit < 0) {
    if (config_.tol > 0) limit = config_.max_steps;
    else limit = sweep ? 1 : std::max<int64_t>(plan_.depth, 1);
  }
  const size_t S = plan_.slots.size();
  const size_t R = relaxing_.size();
  std::vector<std::vector<double>> trace_rows;
  std::vector<std::vector<double>> cosine_rows;
  std::vector<double> final_residual(S, 0.0);

  auto relative = [](const std::vector<std::pair<double, double>>& dn) {
    // |d| / |target|, the target norm floored at 1e-6 of the largest one so a
    // state whose equilibrium is exactly zero still gets a finite residual.
    double scale = 0.0;
    for (const auto& p : dn) scale = std::max(scale, p.second);
    double floor = std::max(scale * 1e-6, 1e-300);
    std::vector<double> r(dn.size());
    for (size_t i = 0; i < dn.size(); ++i) r[i] = dn[i].first / std::max(dn[i].second, floor);
    return r;
  };

  int64_t step = 0;
  for (; step < limit; ++step) {
    begin_step();
    at::Tensor norms;  // [R, 2] in relaxing_ order
    if (!sweep) {
      for (int L = 0; L < static_cast<int>(plan_.layers.size()); ++L) run_layer(L, Pass::Relax);
      fill_missing_targets();
      norms = R ? update(relaxing_) : at::zeros({0, 2}, at::kDouble);
    } else {
      std::vector<at::Tensor> parts(S);
      for (int L = 0; L < static_cast<int>(plan_.layers.size()); ++L) {
        for (int s : plan_.layers[L].out_slots) {
          if (s < 0 || plan_.slots[s].clamped || !plan_.slots[s].needed) continue;
          if (!fresh_[s]) {
            if (plan_.slots[s].ext.defined()) target_[s].copy_(plan_.slots[s].ext);
            else target_[s].zero_();
            fresh_[s] = 1;
          }
          parts[s] = update({s});
        }
        run_layer(L, Pass::Relax);
      }
      std::vector<at::Tensor> rows;
      for (int s : relaxing_) rows.push_back(parts[s].to(at::kDouble));
      norms = R ? at::cat(rows, 0) : at::zeros({0, 2}, at::kDouble);
    }

    const bool last = step + 1 == limit;
    // Reading residuals back costs a device sync; on CPU it is free.
    const bool on_cpu = R == 0 || x_[relaxing_[0]].is_cpu();
    const bool check = on_cpu || config_.trace || config_.tol > 0 || last ||
        (step + 1) % std::max<int64_t>(config_.check_every, 1) == 0;
    if (!check) continue;
    at::Tensor host = norms.to(at::kCPU, at::kDouble).contiguous();
    if (!check_finite(host, relaxing_, step + 1)) {
      // Further steps cannot recover; the gradients carry the NaN/Inf.
      stats.nonfinite = true;
      stats.max_residual = std::numeric_limits<double>::infinity();
      ++step;
      break;
    }
    auto acc = host.accessor<double, 2>();
    std::vector<std::pair<double, double>> dn(R);
    for (size_t i = 0; i < R; ++i) dn[i] = {acc[i][0], acc[i][1]};
    std::vector<double> rel = relative(dn);
    std::fill(final_residual.begin(), final_residual.end(), 0.0);
    double worst = 0.0;
    for (size_t i = 0; i < R; ++i) {
      final_residual[relaxing_[i]] = rel[i];
      worst = std::max(worst, rel[i]);
    }
    stats.max_residual = worst;
    if (config_.trace) trace_rows.push_back(final_residual);
    if (config_.trace_cosine) {
      std::vector<at::Tensor> current = leaf_gradients();
      std::vector<double> row(current.size(), std::nan(""));
      for (size_t l = 0; l < current.size(); ++l) {
        if (!current[l].defined() || !reference_grads[l].defined()) continue;
        auto a = current[l].to(at::kDouble).flatten();
        auto b = reference_grads[l].to(at::kDouble).flatten();
        double na = a.norm().item<double>(), nb = b.norm().item<double>();
        row[l] = (na == 0.0 || nb == 0.0) ? (na == nb ? 1.0 : 0.0)
                                          : a.dot(b).item<double>() / (na * nb);
      }
      cosine_rows.push_back(std::move(row));
    }
    if (config_.tol > 0 && worst <= config_.tol) {
      stats.converged = true;
      ++step;
      break;
    }
  }
  stats.steps = step;
  if (config_.tol <= 0) {
    // Without a tolerance, "converged" means the last update moved nothing
    // beyond rounding, or the schedule is exact by construction.
    const bool exact_by_depth = config_.eta == 1.0 &&
        (sweep ? stats.steps >= 1 : stats.steps >= plan_.depth);
    stats.converged = !stats.nonfinite && (exact_by_depth || stats.max_residual <= 1e-6);
  }
  stats.residuals = at::tensor(final_residual, at::kDouble);
  if (config_.trace) {
    stats.residual_trace = at::empty({static_cast<int64_t>(trace_rows.size()), static_cast<int64_t>(S)}, at::kDouble);
    for (size_t i = 0; i < trace_rows.size(); ++i)
      stats.residual_trace[i].copy_(at::tensor(trace_rows[i], at::kDouble));
  }
  if (config_.trace_cosine) {
    const int64_t nl = static_cast<int64_t>(graph_.leaf_kind.size());
    stats.cosine_trace = at::empty({static_cast<int64_t>(cosine_rows.size()), nl}, at::kDouble);
    for (size_t i = 0; i < cosine_rows.size(); ++i)
      stats.cosine_trace[i].copy_(at::tensor(cosine_rows[i], at::kDouble));
  }
  return stats;
}

} // namespace torch_ar

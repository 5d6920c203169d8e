#include "engine/literal_steps.h"

#include "engine/engine.h"
#include "engine/errors.h"
#include "engine/node_vjp.h"
#include "engine/per_device.h"
#include "engine/step_graph.h"
#include "ops/relax_update.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <sstream>

namespace torch_ar {

LiteralSteps::LiteralSteps(Router& router)
    : router_(router),
      plan_(router.plan()),
      graph_(router.graph()),
      config_(router.config()),
      relaxing_(router.relaxing()) {
  const size_t S = plan_.slots.size();
  x_.resize(S);
  target_.resize(S);
  fresh_.assign(S, 0);
  constant_contrib_.resize(plan_.layers.size());
  constant_ready_.assign(plan_.layers.size(), 0);
  constant_target_.assign(S, 0);
  for (size_t s = 0; s < S; ++s) {
    const auto& consumers = plan_.slots[s].consumer_layers;
    bool all_constant = !consumers.empty();
    for (int c : consumers) all_constant = all_constant && plan_.layers[c].constant;
    constant_target_[s] = all_constant;
  }
  fused_of_slot_.assign(S, -1);
  fused_of_layer_.assign(plan_.layers.size(), -1);
}

void LiteralSteps::setup_fused_activations() {
  // With f' dropped the activation passes states through: nothing to fuse.
  if (!config_.fuse_activations || config_.drop_activation_derivative) return;
  const int p = static_cast<int>(Pass::Relax);
  for (int s : relaxing_) {
    const StateSlot& slot = plan_.slots[s];
    const Layer& layer = plan_.layers[slot.layer];
    if (layer.out_slots.size() != 1 || !layer.has_work[p]) continue;
    // Reduced-precision activations keep float32 states: the unfused path
    // converts them for the VJP.
    if (x_[s].scalar_type() != router_.vjp_dtype(static_cast<int>(s))) continue;
    // The activation may sit under reshapes (flatten): their VJPs only
    // reshape, so f' applies to the state's memory in the same order.
    size_t k = 0;
    while (k < layer.chain.size() && layer.ops[k] && layer.ops[k]->role == OpRole::View &&
           layer.ops[k]->vjp == &vjp::view)
      ++k;
    if (k == layer.chain.size()) continue;
    const OpInfo* op = layer.ops[k];
    if (!op || !op->fused_derivative) continue;
    bool single_edges = true;
    for (size_t q = 0; q <= k; ++q)
      single_edges = single_edges && layer.masks[p][q].size() == 1 && layer.masks[p][q][0];
    if (!single_edges) continue;
    torch::autograd::Node& node = *graph_.nodes[layer.chain[k]];
    vjp::FusedDerivative d;
    if (!op->fused_derivative(node, d) || !d.input.defined()) continue;
    if (d.input.numel() != x_[s].numel() || d.input.scalar_type() != x_[s].scalar_type() ||
        d.input.device() != x_[s].device())
      continue;
    // The first step reads f'(a) * x of the initial state: the nodes' own VJPs.
    variable_list first{x_[s]};
    for (size_t q = 0; q <= k && first.size() == 1 && first[0].defined(); ++q)
      first = node_vjp(*graph_.nodes[layer.chain[q]], layer.ops[q], std::move(first),
                       layer.masks[p][q], router_.rule_for(layer, q, Pass::Relax));
    if (first.size() != 1 || !first[0].defined() || first[0].numel() != x_[s].numel() ||
        first[0].scalar_type() != x_[s].scalar_type())
      continue;
    FusedActivation fa;
    fa.kind = d.kind;
    // Same shape as the state: kept in its own layout (channels_last, say),
    // which the update kernel walks without a copy when it is the state's.
    auto as_state = [&](const at::Tensor& t) {
      return t.sizes().equals(x_[s].sizes()) && t.is_non_overlapping_and_dense()
                 ? t
                 : t.contiguous().view(x_[s].sizes());
    };
    fa.input = as_state(d.input);
    fa.p0 = d.p0;
    fa.p1 = d.p1;
    fa.grad = as_state(first[0]);
    if (fa.grad.is_alias_of(x_[s]) || fa.grad.is_alias_of(fa.input)) fa.grad = fa.grad.clone();
    fa.grad_for_node = fa.grad.view(first[0].sizes());
    fa.chain_index = k;
    fused_of_slot_[s] = static_cast<int>(fused_.size());
    fused_of_layer_[slot.layer] = static_cast<int>(fused_.size());
    fused_.push_back(std::move(fa));
  }
}

std::string LiteralSteps::uncapturable_node() const {
  const int p = static_cast<int>(Pass::Relax);
  for (size_t L = 0; L < plan_.layers.size(); ++L) {
    const Layer& layer = plan_.layers[L];
    if (!layer.has_work[p] || layer.constant) continue;
    const int fused = fused_of_layer_[L];
    for (size_t q = 0; q < layer.chain.size(); ++q) {
      if (fused >= 0 && q <= fused_[fused].chain_index) continue;
      bool wanted = false;
      for (bool b : layer.masks[p][q]) wanted = wanted || b;
      if (!wanted) continue;
      const OpInfo* op = layer.ops[q];
      const bool own =
          op && (op->vjp || (config_.drop_activation_derivative && op->is_activation) ||
                 (config_.use_backward_weights && op->psi_vjp));
      if (!own) return graph_.nodes[layer.chain[q]]->name();
    }
  }
  return "";
}

void LiteralSteps::init_states(const std::vector<at::Tensor>& forward_values) {
  for (size_t s = 0; s < plan_.slots.size(); ++s) {
    const StateSlot& slot = plan_.slots[s];
    const auto& meta = graph_.nodes[slot.node]->input_metadata(slot.output_nr);
    if (slot.clamped) {
      x_[s] = slot.ext;
      continue;
    }
    if (!slot.needed) continue;
    const at::Tensor& fv = forward_values.empty() ? at::Tensor() : forward_values[s];
    const auto options = meta.options().dtype(router_.state_dtype(static_cast<int>(s)));
    if (config_.init == InitMode::Forward && fv.defined()) {
      // In the forward value's memory format (channels_last stays so): the
      // update kernels walk it as it is and the VJPs see the layout the
      // forward had.
      // A masked score (-inf or finfo.min before a softmax, say) starts from
      // zero: its gradient is what the relaxation has to find, and a start at
      // the dtype's range would overflow every term it feeds.
      x_[s] = router_.initial_state(static_cast<int>(s), fv);
    } else if (fv.defined()) {
      x_[s] = at::zeros_like(fv, options);
    } else {
      x_[s] = at::zeros_symint(meta.shape_as_dim_vector(), options);
    }
    target_[s] = at::empty_like(x_[s]);
  }
}

void LiteralSteps::add(int s, at::Tensor grad) {
  if (recording_layer_ >= 0) constant_contrib_[recording_layer_].emplace_back(s, grad);
  at::Tensor& target = target_[s];
  if (fresh_[s]) {
    target.add_(grad);
    return;
  }
  const at::Tensor& ext = plan_.slots[s].ext;
  // Take over a fresh VJP result nobody else holds instead of copying it.
  const bool owned = grad.use_count() == 1 && grad.storage().use_count() == 1 &&
                     grad.scalar_type() == target.scalar_type() &&
                     grad.strides().equals(target.strides()) &&
                     grad.is_non_overlapping_and_dense() && grad.device() == target.device() &&
                     grad.sizes().equals(target.sizes());
  if (owned) {
    if (ext.defined()) grad.add_(ext);
    target = std::move(grad);
  } else if (ext.defined()) {
    at::add_out(target, ext, grad);
  } else {
    target.copy_(grad);
  }
  fresh_[s] = 1;
}

void LiteralSteps::fill_missing_target(int s) {
  // A state no consumer wrote this step: its target is the loss term alone.
  if (fresh_[s]) return;
  if (plan_.slots[s].ext.defined())
    target_[s].copy_(plan_.slots[s].ext);
  else
    target_[s].zero_();
  fresh_[s] = 1;
}

void LiteralSteps::run_layer(int L, Pass pass) {
  const Layer& layer = plan_.layers[L];
  if (!layer.has_work[static_cast<int>(pass)]) return;
  if (pass != Pass::Relax) {
    router_.run_layer(L, pass, x_, this);
    return;
  }
  if (layer.constant) {
    // Outputs are clamped: the contributions are the same every step.
    if (constant_ready_[L]) {
      for (const auto& [s, grad] : constant_contrib_[L]) {
        // A target made only of constant contributions keeps last step's
        // value (the update reads targets, never writes them).
        if (constant_target_[s])
          fresh_[s] = 1;
        else
          add(s, grad);
      }
      return;
    }
    // Run once and record what the layer sends.
    constant_ready_[L] = 1;
    recording_layer_ = L;
  }
  const int fused = fused_of_layer_[L];
  if (fused >= 0) {
    // The update kernel wrote the activation's VJP: the chain goes on from there.
    router_.propagate_from(L, pass, fused_[fused].chain_index, {fused_[fused].grad_for_node}, this);
  } else {
    router_.run_layer(L, pass, x_, this);
  }
  recording_layer_ = -1;
}

at::Tensor LiteralSteps::update(const std::vector<int>& all_slots) {
  std::vector<c10::Device> devices;
  devices.reserve(all_slots.size());
  for (int s : all_slots) devices.push_back(x_[s].device());
  return launch_per_device(
      devices,
      [&](const std::vector<size_t>& positions) {
        std::vector<at::Tensor> xs, ts, act_inputs, act_grads;
        std::vector<int64_t> act_states, act_kinds;
        std::vector<double> act_params;
        xs.reserve(positions.size());
        ts.reserve(positions.size());
        for (size_t p : positions) {
          const int s = all_slots[p];
          const int f = fused_of_slot_[s];
          if (f >= 0) {
            act_states.push_back(static_cast<int64_t>(xs.size()));
            act_kinds.push_back(fused_[f].kind);
            act_params.push_back(fused_[f].p0);
            act_params.push_back(fused_[f].p1);
            act_inputs.push_back(fused_[f].input);
            act_grads.push_back(fused_[f].grad);
          }
          xs.push_back(x_[s]);
          ts.push_back(target_[s]);
        }
        return relax_update_activation_(xs, ts, config_.eta, router_.denormal_floor(), act_states,
                                        act_kinds, act_params, act_inputs, act_grads);
      },
      &row_index_);
}

bool LiteralSteps::check_finite(at::Tensor& norms, const std::vector<int>& slots, int64_t step) {
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
    msg << "torch_ar: relaxation diverged at step " << step << ": the state of node '" << slot.name
        << "' became " << (std::isnan(acc[i][0]) ? "NaN" : "infinite") << " (eta=" << config_.eta
        << "). At eta <= 1 the states are finite polynomials in the frozen Jacobians: check "
        << "the forward values (an overflow inside the module), the loss and custom backward "
        << "functions for NaN/Inf.";
    throw RelaxationDiverged(msg.str(), slot.name, step);
  }
  return true;
}

at::Tensor LiteralSteps::relax_step(bool sweep) {
  const size_t R = relaxing_.size();
  std::fill(fresh_.begin(), fresh_.end(), 0);
  if (!sweep) {
    for (int L = 0; L < static_cast<int>(plan_.layers.size()); ++L) run_layer(L, Pass::Relax);
    for (int s : relaxing_) fill_missing_target(s);
    return R ? update(relaxing_) : at::zeros({0, 2}, at::kDouble);
  }
  std::vector<at::Tensor> parts(plan_.slots.size());
  for (int L = 0; L < static_cast<int>(plan_.layers.size()); ++L) {
    for (int s : plan_.layers[L].out_slots) {
      if (s < 0 || plan_.slots[s].clamped || !plan_.slots[s].needed) continue;
      fill_missing_target(s);
      parts[s] = update({s});
    }
    run_layer(L, Pass::Relax);
  }
  std::vector<at::Tensor> rows;
  for (int s : relaxing_) rows.push_back(parts[s].to(at::kDouble));
  return R ? join_on_one_device(rows, /*stack=*/false) : at::zeros({0, 2}, at::kDouble);
}

RelaxStats LiteralSteps::relax(const std::vector<at::Tensor>& reference_grads) {
  RelaxStats stats;
  stats.depth = plan_.depth;
  const bool sweep = config_.schedule == Schedule::Sweep;
  int64_t limit = config_.steps;
  if (limit < 0) {
    if (config_.tol > 0)
      limit = config_.max_steps;
    else
      limit = sweep ? 1 : std::max<int64_t>(plan_.depth, 1);
  }
  const size_t S = plan_.slots.size();
  const size_t R = relaxing_.size();
  std::vector<std::vector<double>> trace_rows;
  std::vector<std::vector<double>> cosine_rows;
  std::vector<double> final_residual(S, 0.0);

  setup_fused_activations();
  stats.fused_activations = static_cast<int64_t>(fused_.size());
  // A recorded block of steps replays the rest: step 0 runs as is (it also
  // warms up library handles and the constant layers' cached contributions),
  // then `span` steps are recorded as one graph and replayed. The span divides
  // the remaining steps (no leftover steps run without the graph) and is at
  // most check_every, so the host can queue several blocks between reads.
  const bool on_cpu = R == 0 || x_[relaxing_[0]].is_cpu();
  const int64_t check_every = std::max<int64_t>(config_.check_every, 1);
  int64_t span = 1;
  if (!config_.trace && !config_.trace_cosine && limit > 1) {
    for (int64_t d = std::min(check_every, limit - 1); d >= 1; --d) {
      if ((limit - 1) % d == 0) {
        span = d;
        break;
      }
    }
  }
  bool want_graph = config_.cuda_graph && R > 0 && limit >= 3;
  if (want_graph) {
    for (int s : relaxing_) {
      if (x_[s].device() == x_[relaxing_[0]].device()) continue;
      TORCH_WARN_ONCE("torch_ar: cuda_graph=True, but the states are on more than one device (",
                      x_[relaxing_[0]].device(), " and ", x_[s].device(),
                      "); a CUDA graph records one "
                      "device's stream, so the steps run without one.");
      want_graph = false;
      break;
    }
  }
  if (want_graph) {
    const std::string node = uncapturable_node();
    if (!node.empty()) {
      // Python shows a repeated warning once per place it comes from.
      TORCH_WARN("torch_ar: cuda_graph=True, but node '", node,
                 "' runs its own backward during "
                 "relaxation, which may synchronise with the host and cannot be recorded; "
                 "relaxing without a CUDA graph.");
      want_graph = false;
    }
  }
  // Created before step 0: the eager step 0 runs where the replays will.
  std::unique_ptr<StepGraph> graph;
  if (want_graph) {
    try {
      graph = make_step_graph(x_[relaxing_[0]].device());
    } catch (const c10::Error& e) {
      TORCH_WARN(
          "torch_ar: cuda_graph=True, but no CUDA graph could be set up; relaxing "
          "without one. The device said: ",
          e.what_without_backtrace());
    }
  }
  bool recorded = false;
  // A refused capture keeps the graph object, and so its lane, until the
  // relaxation ends: the eager steps go on on the lane's stream, which the
  // object joins back into the caller's when it goes (the lane given back
  // early would leave tensors made on it read by the caller's stream while
  // another thread may lease it).
  bool refused = false;
  at::Tensor graph_norms;

  int64_t done = 0; // steps taken
  while (done < limit) {
    at::Tensor norms; // [R, 2] in relaxing_ order, of the last step taken
    const int64_t before = done;
    const bool whole_block = done >= 1 && limit - done >= span;
    if (graph && whole_block && !recorded) {
      recorded = true;
      try {
        graph->capture([&] {
          for (int64_t k = 0; k < span; ++k) graph_norms = relax_step(sweep);
        });
      } catch (const c10::Error& e) {
        // Nothing of the block ran; what it left on the host (targets, fresh
        // flags) is rewritten by the next step before it is read.
        TORCH_WARN(
            "torch_ar: the relaxation step could not be recorded as a CUDA graph; "
            "relaxing without one. The device said: ",
            e.what_without_backtrace());
        refused = true;
        graph_norms = at::Tensor();
      }
    }
    const bool replayed = graph && !refused && whole_block;
    if (replayed) {
      graph->replay();
      norms = graph_norms;
      done += span;
      stats.graph_steps += span;
    } else {
      norms = relax_step(sweep);
      ++done;
    }

    const bool last = done == limit;
    // Reading residuals back costs a device sync; on CPU it is free. The
    // tolerance is tested when they are read, so it may stop up to
    // check_every - 1 steps after it was first met.
    const bool check = on_cpu || config_.trace || last || done / check_every > before / check_every;
    if (!check) continue;
    at::Tensor host = norms.to(at::kCPU, at::kDouble).contiguous();
    if (!check_finite(host, relaxing_, done)) {
      // Further steps cannot recover; the gradients carry the NaN/Inf.
      stats.nonfinite = true;
      stats.max_residual = std::numeric_limits<double>::infinity();
      break;
    }
    auto acc = host.accessor<double, 2>();
    std::vector<std::pair<double, double>> dn(R);
    for (size_t i = 0; i < R; ++i) dn[i] = {acc[i][0], acc[i][1]};
    std::vector<double> rel = relative_residuals(dn);
    std::fill(final_residual.begin(), final_residual.end(), 0.0);
    for (size_t i = 0; i < R; ++i) final_residual[relaxing_[i]] = rel[i];
    const double worst = max_residual(rel);
    stats.max_residual = worst;
    if (config_.trace) trace_rows.push_back(final_residual);
    if (config_.trace_cosine) cosine_rows.push_back(cosines(reference_grads));
    if (config_.tol > 0 && worst <= config_.tol) {
      stats.converged = true;
      break;
    }
  }
  stats.steps = done;
  stats.evaluation = Evaluation::Literal;
  stats.sweeps = done;
  if (config_.tol <= 0) {
    // Without a tolerance, "converged" means the last update moved nothing
    // beyond rounding, or the schedule is exact by construction.
    stats.converged = converged_without_tol(config_, stats.steps, plan_.depth, stats.nonfinite,
                                            stats.max_residual);
  }
  stats.residuals = at::tensor(final_residual, at::kDouble);
  if (config_.trace) {
    stats.residual_trace =
        at::empty({static_cast<int64_t>(trace_rows.size()), static_cast<int64_t>(S)}, at::kDouble);
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

std::vector<double> LiteralSteps::cosines(const std::vector<at::Tensor>& reference_grads) {
  std::vector<at::Tensor> current = leaf_gradients();
  std::vector<double> row(current.size(), std::nan(""));
  for (size_t l = 0; l < current.size(); ++l) {
    if (!current[l].defined() || !reference_grads[l].defined()) continue;
    auto a = current[l].to(at::kDouble).flatten();
    auto b = reference_grads[l].to(at::kDouble).flatten();
    double na = a.norm().item<double>(), nb = b.norm().item<double>();
    row[l] =
        (na == 0.0 || nb == 0.0) ? (na == nb ? 1.0 : 0.0) : a.dot(b).item<double>() / (na * nb);
  }
  return row;
}

std::vector<at::Tensor> LiteralSteps::leaf_gradients() {
  router_.reset_gradients();
  for (int L = 0; L < static_cast<int>(plan_.layers.size()); ++L) {
    if (config_.exact_rule()) {
      run_layer(L, Pass::Gradient);
    } else {
      // A variant propagates with its own VJPs but updates weights from the
      // states (and, by default, f').
      run_layer(L, Pass::InputGrad);
      run_layer(L, Pass::WeightGrad);
    }
  }
  router_.propagate_param_side();
  return router_.finish_leaf_gradients();
}

} // namespace torch_ar

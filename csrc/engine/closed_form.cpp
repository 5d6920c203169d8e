// The closed form of T relaxation steps (engine/coefficients.h): Horner's
// rule over the powers of J, y_K = a_K x0 + c_K b, then
//   y_k = a_k x0 + c_k b + J y_{k+1},   k = K-1 .. 0,   x_T = y_0,
// where a J application is one input-VJP sweep (the literal step's VJPs).
//
// Layers are visited level by level (consumers first): when a level's turn
// comes, its states' stage targets are complete, so each state's buffer is
// replaced by the next stage's value as soon as its own layer has read it.
// States hold one buffer each (no separate targets of all states at once),
// and y_k is kept only where stage k-1 needs it: at states with at least k
// relaxing states beneath them (the deepest, widest layers of a CNN only
// ever hold y_0). The last stage takes each layer's gradients as soon as
// x_T is final there and frees the layer's saved values, as the exact sweep
// does. One horner_update_ launch per level and stage updates all of the
// level's states.
#include "engine/closed_form.h"

#include "engine/engine.h"
#include "engine/errors.h"
#include "engine/per_device.h"
#include "ops/horner_update.h"
#include "ops/relax_update.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace torch_ar {

namespace {

// ||v||_2 as a 0-dim device tensor, computed as max|v| * ||v / max|v|||, so
// that it is finite for every finite v (no host read).
at::Tensor scaled_norm_on_device(const at::Tensor& v) {
  const at::Tensor scale = v.abs().amax();
  const at::Tensor safe = at::where(scale > 0, scale, at::ones_like(scale));
  return at::where(scale > 0, (v / safe).norm() * safe, at::zeros_like(scale));
}

// grad <- f'(a) * grad in place, with ATen's own backward kernels (the same
// arithmetic as the activation node's VJP).
void apply_derivative_inplace(at::Tensor& g, const vjp::FusedDerivative& d) {
  switch (d.kind) {
    case kReluResult:
      at::threshold_backward_out(g, g, d.input, 0);
      break;
    case kLeakyReluInput:
      at::leaky_relu_backward_out(g, g, d.input, d.p0, false);
      break;
    case kTanhResult:
      at::tanh_backward_out(g, g, d.input);
      break;
    case kSigmoidResult:
      at::sigmoid_backward_out(g, g, d.input);
      break;
    case kHardtanhInput:
      at::hardtanh_backward_out(g, g, d.input, d.p0, d.p1);
      break;
    default: // kScale: d.input is f'(a)
      g.mul_(d.input);
      break;
  }
}

} // namespace

ClosedForm::ClosedForm(Router& router)
    : router_(router),
      plan_(router.plan()),
      graph_(router.graph()),
      config_(router.config()),
      relaxing_(router.relaxing()),
      num_layers_(static_cast<int>(plan_.layers.size())) {
  const size_t S = plan_.slots.size();
  x_.resize(S);
  target_.resize(S);
  residual_.resize(S);
  dn_.assign(S, {0.0, 0.0});
  below_.assign(S, 0);
  inplace_at_.assign(plan_.layers.size(), -2);
  inplace_derivative_.resize(plan_.layers.size());
  flush_ = router.denormal_floor();
  for (int s : relaxing_) {
    const auto& slot = plan_.slots[s];
    on_cpu_ = graph_.nodes[slot.node]->input_metadata(slot.output_nr).device().is_cpu();
    break;
  }
}

void ClosedForm::add(int s, at::Tensor grad) {
  if (below_[s] < sink_min_below_) return;
  at::Tensor& acc = (*sink_)[s];
  if (acc.defined()) {
    acc.add_(grad);
    return;
  }
  const auto dtype = router_.state_dtype(s);
  // Take over a fresh VJP result nobody else holds: the stage writes into it.
  const bool owned = grad.use_count() == 1 && grad.storage().use_count() == 1 &&
                     grad.scalar_type() == dtype && grad.is_non_overlapping_and_dense();
  acc = owned ? std::move(grad)
              : grad.to(dtype, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Preserve);
}

void ClosedForm::propagate_consuming(int L, Pass pass, variable_list grads) {
  const Layer& layer = plan_.layers[L];
  const int p = static_cast<int>(pass);
  if (inplace_at_[L] == -2) {
    // An activation at the top of the layer (under reshapes at most) whose
    // VJP is the one specialised formula, with f' kept by this variant.
    inplace_at_[L] = -1;
    size_t k = 0;
    while (k < layer.chain.size() && layer.ops[k] && layer.ops[k]->role == OpRole::View &&
           layer.ops[k]->vjp == &vjp::view)
      ++k;
    const OpInfo* op = k < layer.chain.size() ? layer.ops[k] : nullptr;
    if (op && op->fused_derivative && !config_.drop_activation_derivative &&
        layer.out_slots.size() == 1 &&
        op->fused_derivative(*graph_.nodes[layer.chain[k]], inplace_derivative_[L]) &&
        inplace_derivative_[L].input.defined())
      inplace_at_[L] = static_cast<int>(k);
  }
  const int k = inplace_at_[L];
  bool single_edges = k >= 0 && layer.has_work[p];
  for (int q = 0; single_edges && q <= k; ++q)
    single_edges = layer.masks[p][q].size() == 1 && layer.masks[p][q][0];
  const vjp::FusedDerivative& d = inplace_derivative_[L];
  if (!single_edges || grads.size() != 1 || !grads[0].defined() || !grads[0].is_contiguous() ||
      grads[0].scalar_type() != d.input.scalar_type() || grads[0].numel() != d.input.numel() ||
      grads[0].device() != d.input.device()) {
    router_.propagate(L, pass, std::move(grads), this);
    return;
  }
  at::Tensor g = grads[0].view(d.input.sizes());
  grads.clear();
  apply_derivative_inplace(g, d);
  router_.propagate_from(L, pass, static_cast<size_t>(k), {std::move(g)}, this);
}

void ClosedForm::measure() {
  const int relax_pass = static_cast<int>(Pass::Relax);
  layer_below_.assign(num_layers_, 0);
  has_clamped_.assign(num_layers_, 0);
  has_relaxing_.assign(num_layers_, 0);
  // Producers first: y_k is needed at a state only when k <= the number of
  // relaxing states beneath it.
  for (int L = num_layers_ - 1; L >= 0; --L) {
    const Layer& layer = plan_.layers[L];
    int b = 0;
    for (size_t q = 0; q < layer.chain.size(); ++q)
      for (size_t j = 0; j < layer.targets[q].size(); ++j) {
        const EdgeTarget& t = layer.targets[q][j];
        if (t.kind == TargetKind::State && layer.masks[relax_pass][q][j])
          b = std::max(b, below_[t.index] + 1);
      }
    layer_below_[L] = b;
    for (int s : layer.out_slots) {
      if (s < 0) continue;
      below_[s] = b;
      if (plan_.slots[s].clamped)
        has_clamped_[L] = 1;
      else if (plan_.slots[s].needed)
        has_relaxing_[L] = 1;
    }
  }
  int max_below = 0;
  for (int s : relaxing_) max_below = std::max(max_below, below_[s]);
  coef_ = horner_coefficients(config_.schedule, config_.eta, config_.steps, max_below);
  K_ = static_cast<int>(coef_.initial.size()) - 1;

  // The relaxing states each layer's relaxation VJP reaches, once each.
  relax_inputs_.assign(num_layers_, {});
  for (int L = 0; L < num_layers_; ++L) {
    const Layer& layer = plan_.layers[L];
    auto& inputs = relax_inputs_[L];
    for (size_t q = 0; q < layer.chain.size(); ++q)
      for (size_t j = 0; j < layer.targets[q].size(); ++j) {
        const EdgeTarget& t = layer.targets[q][j];
        if (t.kind == TargetKind::State && layer.masks[relax_pass][q][j] &&
            std::find(inputs.begin(), inputs.end(), t.index) == inputs.end())
          inputs.push_back(t.index);
      }
  }
  by_level_.clear();
  for (int L = 0; L < num_layers_; ++L) {
    if (!plan_.layers[L].needed) continue;
    const size_t level = static_cast<size_t>(plan_.layers[L].level);
    if (by_level_.size() <= level) by_level_.resize(level + 1);
    by_level_[level].push_back(L);
  }
}

void ClosedForm::initial_and_loss_terms(std::vector<at::Tensor> forward_values) {
  const size_t S = plan_.slots.size();
  // Initial states in each state's dtype, as the literal steps start them
  // (masked scores and other non-activities at zero).
  initial_.assign(S, at::Tensor());
  if (config_.init == InitMode::Forward && !forward_values.empty()) {
    for (int s : relaxing_) {
      at::Tensor fv = std::move(forward_values[s]);
      if (fv.defined()) initial_[s] = router_.initial_state(s, fv, /*may_alias=*/true);
    }
  }
  forward_values.clear();

  // b: the loss gradients entering the relaxing states, directly (outputs
  // also used inside the module) and through layers with clamped outputs.
  loss_.assign(S, at::Tensor());
  sink_ = &loss_;
  sink_min_below_ = 0;
  for (int L = 0; L < num_layers_; ++L) {
    if (!has_clamped_[L] || !plan_.layers[L].has_work[static_cast<int>(Pass::Relax)]) continue;
    router_.propagate(L, Pass::Relax,
                      router_.layer_inputs(L, x_, /*relaxing=*/false, /*clamped=*/true), this);
  }
  for (int s : relaxing_) {
    const at::Tensor& ext = plan_.slots[s].ext;
    if (ext.defined()) add(s, ext);
  }
}

void ClosedForm::settle(const at::Tensor& norms, const std::vector<int>& slots, int stage,
                        const std::vector<at::Tensor>* outs, const at::Tensor& scaled) {
  // Divergence from the non-finite counts (a norm may overflow for finite
  // float64 values); residuals of x_T in stage 0, recomputed with scaling
  // where their sums of squares overflowed (CPU: from the tensors, which are
  // still there; elsewhere from the scaled norms the launch queued beside
  // its own).
  const at::Tensor host = norms.to(at::kCPU).contiguous();
  auto acc = host.accessor<double, 2>();
  for (size_t i = 0; i < slots.size(); ++i) {
    const int s = slots[i];
    if (acc[i][3] > 0.0) {
      if (!nonfinite_ && config_.raise_on_nonfinite) {
        std::ostringstream msg;
        msg << "torch_ar: relaxation diverged in the closed form of " << config_.steps
            << " steps (stage " << stage << " of " << K_ << "): the state of node '"
            << plan_.slots[s].name << "' became NaN or infinite (eta=" << config_.eta
            << "). At eta <= 1 the states are finite polynomials in the frozen Jacobians: check "
            << "the forward values (an overflow inside the module), the loss and custom backward "
            << "functions for NaN/Inf.";
        throw RelaxationDiverged(msg.str(), plan_.slots[s].name, stage);
      }
      nonfinite_ = true;
      continue;
    }
    if (stage != 0) continue;
    double d = acc[i][1], t = acc[i][2];
    if (!std::isfinite(d) || !std::isfinite(t)) {
      if (outs) {
        auto scaled_norm = [](const at::Tensor& v) {
          at::Tensor w = v.to(at::kDouble);
          const double scale = w.abs().max().item<double>();
          return scale == 0.0 ? 0.0 : (w / scale).norm().item<double>() * scale;
        };
        at::Tensor target = at::zeros_like((*outs)[i]);
        if (loss_[s].defined()) target.add_(loss_[s]);
        if (residual_[s].defined()) target.add_(residual_[s]);
        d = scaled_norm(target - (*outs)[i]);
        t = scaled_norm(target);
      } else if (scaled.defined()) {
        auto rows = scaled.accessor<double, 2>();
        d = rows[i][0];
        t = rows[i][1];
      } else {
        d = t = std::numeric_limits<double>::quiet_NaN();
      }
    }
    dn_[s] = {d, t};
  }
}

void ClosedForm::update_states(const std::vector<int>& slots, int k) {
  // Their J y_{k+1}, if any, is complete in target_; x_ takes the result.
  if (slots.empty()) return;
  const bool last = k == 0;
  std::vector<at::Tensor> out, x0, b, t, r;
  for (int s : slots) {
    at::Tensor& acc = target_[s];
    if (!acc.defined()) {
      const auto& slot = plan_.slots[s];
      const auto& meta = graph_.nodes[slot.node]->input_metadata(slot.output_nr);
      acc = at::empty_symint(meta.shape_as_dim_vector(),
                             meta.options().dtype(router_.state_dtype(s)));
      t.emplace_back(); // nothing arrived: J y_{k+1} is zero here
    } else {
      t.push_back(acc);
    }
    out.push_back(acc);
    x0.push_back(initial_[s]);
    b.push_back(loss_[s]);
    r.push_back(last ? residual_[s] : at::Tensor());
  }
  std::vector<c10::Device> devices;
  for (const at::Tensor& o : out) devices.push_back(o.device());
  at::Tensor norms = launch_per_device(
      devices,
      [&](const std::vector<size_t>& positions) {
        if (positions.size() == out.size())
          return horner_update_(out, x0, b, t, r, coef_.initial[k], coef_.loss[k], flush_, last);
        std::vector<at::Tensor> out_d, x0_d, b_d, t_d, r_d;
        for (size_t p : positions) {
          out_d.push_back(out[p]);
          x0_d.push_back(x0[p]);
          b_d.push_back(b[p]);
          t_d.push_back(t[p]);
          r_d.push_back(r[p]);
        }
        return horner_update_(out_d, x0_d, b_d, t_d, r_d, coef_.initial[k], coef_.loss[k], flush_,
                              last);
      },
      &row_index_);
  if (on_cpu_) settle(norms, slots, k, &out, at::Tensor());
  // Off the CPU the norms are read later; a float64 sum of squares can
  // overflow for finite states (beyond 1e154), so stage 0 also queues the
  // residual's norms computed with scaling, to stand in for those.
  at::Tensor scaled;
  if (!on_cpu_ && last) {
    std::vector<at::Tensor> rows;
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i].scalar_type() != at::kDouble || out[i].numel() == 0) {
        rows.push_back(at::full({2}, std::numeric_limits<double>::quiet_NaN(),
                                out[i].options().dtype(at::kDouble)));
        continue;
      }
      at::Tensor target = at::zeros_like(out[i]);
      if (b[i].defined()) target.add_(b[i]);
      if (r[i].defined()) target.add_(r[i]);
      rows.push_back(
          at::stack({scaled_norm_on_device(target - out[i]), scaled_norm_on_device(target)}));
    }
    scaled = join_on_one_device(rows, /*stack=*/true);
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    const int s = slots[i];
    x_[s] = std::move(out[i]);
    target_[s] = at::Tensor();
    residual_[s] = at::Tensor();
    if (last) { // x0 and b have done their work here
      initial_[s] = at::Tensor();
      loss_[s] = at::Tensor();
    }
  }
  if (!on_cpu_) pending_.push_back({std::move(norms), slots, k, std::move(scaled)});
}

void ClosedForm::settle_pending() {
  if (pending_.empty()) return;
  // Every queued norm and scaled norm in one copy to the host.
  std::vector<at::Tensor> all;
  for (const auto& p : pending_) {
    all.push_back(p.norms.to(at::kDouble).reshape({-1}));
    if (p.scaled.defined()) all.push_back(p.scaled.to(at::kDouble).reshape({-1}));
  }
  const at::Tensor host = join_on_one_device(all, /*stack=*/false).to(at::kCPU);
  int64_t offset = 0;
  auto take = [&](const at::Tensor& like) {
    at::Tensor part = host.narrow(0, offset, like.numel()).view(like.sizes());
    offset += like.numel();
    return part;
  };
  for (const auto& p : pending_) {
    const at::Tensor norms = take(p.norms);
    const at::Tensor scaled = p.scaled.defined() ? take(p.scaled) : at::Tensor();
    settle(norms, p.slots, p.stage, nullptr, scaled);
  }
  pending_.clear();
}

void ClosedForm::stage(int k) {
  // Producers first: a layer reads y_{k+1} of its states before their
  // consumers have sent anything for y_k, so no state holds its old and its
  // new value at once; a state moves on once its last consumer has sent its
  // share.
  const size_t S = plan_.slots.size();
  const int relax_pass = static_cast<int>(Pass::Relax);
  auto runs = [&](int L) {
    return k < K_ && has_relaxing_[L] && layer_below_[L] >= k + 1 &&
           plan_.layers[L].has_work[relax_pass];
  };
  std::vector<int> remaining(S, 0);
  std::vector<char> own_done(S, 1);
  for (int L = 0; L < num_layers_; ++L) {
    if (!plan_.layers[L].needed || !runs(L)) continue;
    for (int u : relax_inputs_[L]) ++remaining[u];
    for (int s : plan_.layers[L].out_slots)
      if (s >= 0) own_done[s] = 0;
  }
  auto ready = [&](int s) { return needs_state(s, k) && remaining[s] == 0 && own_done[s]; };
  std::vector<char> updated(S, 0);
  std::vector<int> batch;
  for (int s : relaxing_)
    if (ready(s)) batch.push_back(s);
  update_states(batch, k);
  for (int s : batch) updated[s] = 1;
  sink_ = &target_;
  sink_min_below_ = k;
  for (int L = num_layers_ - 1; L >= 0; --L) {
    if (!plan_.layers[L].needed || !runs(L)) continue;
    // y_{k+1} dies with this pass: its buffer may take f' in place.
    propagate_consuming(L, Pass::Relax,
                        router_.layer_inputs(L, x_, /*relaxing=*/true, /*clamped=*/false));
    batch.clear();
    for (int s : plan_.layers[L].out_slots) {
      if (s < 0) continue;
      own_done[s] = 1;
      if (!updated[s] && ready(s)) batch.push_back(s);
    }
    for (int u : relax_inputs_[L]) {
      --remaining[u];
      if (!updated[u] && ready(u)) batch.push_back(u);
    }
    update_states(batch, k);
    for (int s : batch) updated[s] = 1;
  }
  for (int s : relaxing_)
    TORCH_INTERNAL_ASSERT(!needs_state(s, k) || updated[s], "closed form: state ", s,
                          " missed stage ", k);
  // Off the CPU: one read every check_every stages (and after the last).
  // Each queued launch keeps its stage, so a divergence is still reported at
  // the stage it happened in, as on the CPU; only the sweep goes on a little
  // longer before it is.
  if (k % std::max<int64_t>(1, config_.check_every) == 0) settle_pending();
}

void ClosedForm::last_stage(bool release_saved) {
  // Consumers first, level by level: y_0 = x_T is final on a level once the
  // levels above have sent J y_1; then the level's layers take their
  // gradients and send J x_T for the residuals below.
  const int relax_pass = static_cast<int>(Pass::Relax);
  auto inputs = [&](int L, bool relaxing, bool clamped) {
    return router_.layer_inputs(L, x_, relaxing, clamped);
  };
  for (const auto& layers : by_level_) {
    if (K_ > 0) {
      sink_ = &target_;
      sink_min_below_ = 0;
      for (int L : layers) {
        if (!has_relaxing_[L] || layer_below_[L] < 1) continue;
        if (!plan_.layers[L].has_work[relax_pass]) continue;
        propagate_consuming(L, Pass::Relax, inputs(L, true, false));
      }
    }
    std::vector<int> slots;
    for (int L : layers)
      for (int s : plan_.layers[L].out_slots)
        if (needs_state(s, 0)) slots.push_back(s);
    update_states(slots, 0);
    // x_T is final on this level: gradients, and the residual's J x_T.
    sink_ = &residual_;
    sink_min_below_ = 0;
    for (int L : layers) {
      const Layer& layer = plan_.layers[L];
      const bool relaxes = has_relaxing_[L] && layer.has_work[relax_pass];
      if (config_.exact_rule()) {
        if (!has_clamped_[L]) {
          propagate_consuming(L, Pass::Full, inputs(L, true, true));
        } else {
          // The loss gradients' share of the states' targets is in b.
          router_.propagate(L, Pass::Gradient, inputs(L, true, true), this);
          if (relaxes) router_.propagate(L, Pass::Relax, inputs(L, true, false), this);
        }
      } else {
        if (!has_clamped_[L]) {
          router_.propagate(L, Pass::Propagate, inputs(L, true, true), this);
        } else {
          router_.propagate(L, Pass::InputGrad, inputs(L, true, true), this);
          if (relaxes) router_.propagate(L, Pass::Relax, inputs(L, true, false), this);
        }
        router_.propagate(L, Pass::WeightGrad, inputs(L, true, true), this);
      }
      for (int s : layer.out_slots)
        if (s >= 0 && !plan_.slots[s].clamped) x_[s] = at::Tensor();
      if (release_saved)
        for (int n : layer.chain) graph_.nodes[n]->release_variables();
    }
  }
  sink_ = nullptr;
  settle_pending();
}

std::vector<at::Tensor> ClosedForm::run(std::vector<at::Tensor> forward_values, bool release_saved,
                                        RelaxStats& stats) {
  router_.reset_gradients();
  measure();
  initial_and_loss_terms(std::move(forward_values));
  for (int k = K_; k >= 1; --k) stage(k);
  last_stage(release_saved);

  std::vector<std::pair<double, double>> norms;
  for (int s : relaxing_) norms.push_back(dn_[s]);
  const std::vector<double> rel = relative_residuals(norms);
  std::vector<double> final_residual(plan_.slots.size(), 0.0);
  for (size_t i = 0; i < relaxing_.size(); ++i) final_residual[relaxing_[i]] = rel[i];
  const double worst = max_residual(rel);
  stats.evaluation = Evaluation::ClosedForm;
  stats.depth = plan_.depth;
  stats.steps = config_.steps;
  stats.sweeps = K_;
  stats.nonfinite = nonfinite_;
  stats.max_residual = nonfinite_ ? std::numeric_limits<double>::infinity() : worst;
  stats.converged = converged_without_tol(config_, config_.steps, plan_.depth, nonfinite_, worst);
  stats.residuals = at::tensor(final_residual, at::kDouble);

  router_.propagate_param_side();
  return router_.finish_leaf_gradients();
}

} // namespace torch_ar

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
#include "engine/coefficients.h"
#include "engine/engine.h"
#include "engine/errors.h"
#include "engine/executor.h"
#include "engine/per_device.h"
#include "ops/horner_update.h"
#include "ops/relax_update.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <sstream>

namespace torch_ar {

variable_list Executor::layer_grads(int L, bool relaxing, bool clamped) const {
  const Layer& layer = plan_.layers[L];
  variable_list grads(layer.out_slots.size());
  for (size_t k = 0; k < layer.out_slots.size(); ++k) {
    const int s = layer.out_slots[k];
    if (s < 0) continue;
    const bool is_clamped = plan_.slots[s].clamped;
    const at::Tensor& v = is_clamped ? plan_.slots[s].ext : x_[s];
    if (!v.defined() || (is_clamped ? !clamped : !relaxing)) continue;
    grads[k] = v.scalar_type() == vjp_dtype_[s] ? v : v.to(vjp_dtype_[s]);
  }
  return grads;
}

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

void Executor::propagate_consuming(int L, Pass pass, variable_list grads) {
  if (inplace_at_.empty()) inplace_at_.assign(plan_.layers.size(), -2);
  if (inplace_derivative_.empty()) inplace_derivative_.resize(plan_.layers.size());
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
    propagate(L, pass, std::move(grads));
    return;
  }
  at::Tensor g = grads[0].view(d.input.sizes());
  grads.clear();
  apply_derivative_inplace(g, d);
  propagate_from(L, pass, static_cast<size_t>(k), {std::move(g)});
}

std::vector<at::Tensor> Executor::closed_form(std::vector<at::Tensor> forward_values,
                                              bool release_saved, RelaxStats& stats) {
  const size_t S = plan_.slots.size();
  const int num_layers = static_cast<int>(plan_.layers.size());
  const int relax_pass = static_cast<int>(Pass::Relax);
  persistent_targets_ = false;
  reset_gradients();

  // How many relaxing states lie beneath each layer's outputs (producers
  // first): y_k is needed at a state only when k <= that number.
  std::vector<int> layer_below(num_layers, 0);
  std::vector<char> has_clamped(num_layers, 0), has_relaxing(num_layers, 0);
  for (int L = num_layers - 1; L >= 0; --L) {
    const Layer& layer = plan_.layers[L];
    int b = 0;
    for (size_t q = 0; q < layer.chain.size(); ++q)
      for (size_t j = 0; j < layer.targets[q].size(); ++j) {
        const EdgeTarget& t = layer.targets[q][j];
        if (t.kind == TargetKind::State && layer.masks[relax_pass][q][j])
          b = std::max(b, below_[t.index] + 1);
      }
    layer_below[L] = b;
    for (int s : layer.out_slots) {
      if (s < 0) continue;
      below_[s] = b;
      if (plan_.slots[s].clamped)
        has_clamped[L] = 1;
      else if (plan_.slots[s].needed)
        has_relaxing[L] = 1;
    }
  }
  int max_below = 0;
  for (int s : relaxing_) max_below = std::max(max_below, below_[s]);
  const HornerCoefficients coef =
      horner_coefficients(config_.schedule, config_.eta, config_.steps, max_below);
  const int K = static_cast<int>(coef.initial.size()) - 1;

  // Initial states (forward values, non-finite elements read as zero by the
  // kernel) in each state's dtype.
  std::vector<at::Tensor> initial(S);
  if (config_.init == InitMode::Forward && !forward_values.empty()) {
    for (int s : relaxing_) {
      at::Tensor fv = std::move(forward_values[s]);
      if (!fv.defined()) continue;
      initial[s] =
          fv.scalar_type() == state_dtype_[s] ? fv.detach() : fv.detach().to(state_dtype_[s]);
    }
  }
  forward_values.clear();

  // b: the loss gradients entering the relaxing states, directly (outputs
  // also used inside the module) and through layers with clamped outputs.
  std::vector<at::Tensor> loss(S);
  sink_ = &loss;
  sink_min_below_ = 0;
  for (int L = 0; L < num_layers; ++L) {
    if (!has_clamped[L] || !plan_.layers[L].has_work[relax_pass]) continue;
    propagate(L, Pass::Relax, layer_grads(L, /*relaxing=*/false, /*clamped=*/true));
  }
  for (int s : relaxing_) {
    const at::Tensor& ext = plan_.slots[s].ext;
    if (ext.defined()) contribute_state(s, ext);
  }

  std::vector<std::vector<int>> by_level;
  for (int L = 0; L < num_layers; ++L) {
    if (!plan_.layers[L].needed) continue;
    const size_t level = static_cast<size_t>(plan_.layers[L].level);
    if (by_level.size() <= level) by_level.resize(level + 1);
    by_level[level].push_back(L);
  }

  const double flush = [&] {
    bool reduced = false;
    for (int s : relaxing_) reduced = reduced || state_dtype_[s] != at::kDouble;
    return reduced ? static_cast<double>(FLT_MIN) : DBL_MIN;
  }();
  std::vector<at::Tensor> residual(S); // J x_T, accumulated in the last stage
  bool on_cpu = true;
  for (int s : relaxing_) {
    const auto& slot = plan_.slots[s];
    on_cpu = graph_.nodes[slot.node]->input_metadata(slot.output_nr).device().is_cpu();
    break;
  }
  // Norms are checked when they are read: at once on the CPU (free), at the
  // end elsewhere (one device sync).
  struct Pending {
    at::Tensor norms;
    std::vector<int> slots;
    int stage;
    at::Tensor scaled; // stage 0: overflow-safe (|target - x_T|, |target|), or undefined
  };
  std::vector<Pending> pending;
  std::vector<double> final_residual(S, 0.0);
  std::vector<std::pair<double, double>> dn(S, {0.0, 0.0}); // (|target - x_T|, |target|)
  bool nonfinite = false;
  // Reads one launch's norms: divergence from the non-finite counts (a norm
  // may overflow for finite float64 values), residuals of x_T in stage 0,
  // recomputed with scaling where their sums of squares overflowed (CPU:
  // from the tensors, which are still there; elsewhere from the scaled norms
  // the launch queued beside its own).
  auto settle = [&](const at::Tensor& norms, const std::vector<int>& slots, int stage,
                    const std::vector<at::Tensor>* outs, const at::Tensor& scaled) {
    const at::Tensor host = norms.to(at::kCPU).contiguous();
    auto acc = host.accessor<double, 2>();
    for (size_t i = 0; i < slots.size(); ++i) {
      const int s = slots[i];
      if (acc[i][3] > 0.0) {
        if (!nonfinite && config_.raise_on_nonfinite) {
          std::ostringstream msg;
          msg << "torch_ar: relaxation diverged in the closed form of " << config_.steps
              << " steps (stage " << stage << " of " << K << "): the state of node '"
              << plan_.slots[s].name << "' became NaN or infinite (eta=" << config_.eta
              << "). Check the inputs and the loss for NaN/Inf, or use a smaller eta.";
          throw RelaxationDiverged(msg.str(), plan_.slots[s].name, stage);
        }
        nonfinite = true;
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
          if (loss[s].defined()) target.add_(loss[s]);
          if (residual[s].defined()) target.add_(residual[s]);
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
      dn[s] = {d, t};
    }
  };

  // y_k = a_k x0 + c_k b + J y_{k+1} for `slots` (their J y_{k+1}, if any,
  // complete in target_), in one launch; x_ takes the result.
  auto update_states = [&](const std::vector<int>& slots, int k) {
    if (slots.empty()) return;
    const bool last = k == 0;
    std::vector<at::Tensor> out, x0, b, t, r;
    for (int s : slots) {
      at::Tensor& acc = target_[s];
      if (!acc.defined()) {
        const auto& slot = plan_.slots[s];
        const auto& meta = graph_.nodes[slot.node]->input_metadata(slot.output_nr);
        acc = at::empty_symint(meta.shape_as_dim_vector(), meta.options().dtype(state_dtype_[s]));
        t.emplace_back(); // nothing arrived: J y_{k+1} is zero here
      } else {
        t.push_back(acc);
      }
      out.push_back(acc);
      x0.push_back(initial[s]);
      b.push_back(loss[s]);
      r.push_back(last ? residual[s] : at::Tensor());
    }
    std::vector<c10::Device> devices;
    for (const at::Tensor& o : out) devices.push_back(o.device());
    at::Tensor norms = launch_per_device(devices, [&](const std::vector<size_t>& positions) {
      if (positions.size() == out.size())
        return horner_update_(out, x0, b, t, r, coef.initial[k], coef.loss[k], flush, last);
      std::vector<at::Tensor> out_d, x0_d, b_d, t_d, r_d;
      for (size_t p : positions) {
        out_d.push_back(out[p]);
        x0_d.push_back(x0[p]);
        b_d.push_back(b[p]);
        t_d.push_back(t[p]);
        r_d.push_back(r[p]);
      }
      return horner_update_(out_d, x0_d, b_d, t_d, r_d, coef.initial[k], coef.loss[k], flush, last);
    });
    if (on_cpu) settle(norms, slots, k, &out, at::Tensor());
    // Off the CPU the norms are read later; a float64 sum of squares can
    // overflow for finite states (beyond 1e154), so stage 0 also queues the
    // residual's norms computed with scaling, to stand in for those.
    at::Tensor scaled;
    if (!on_cpu && last) {
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
      scaled = at::stack(rows);
    }
    for (size_t i = 0; i < slots.size(); ++i) {
      const int s = slots[i];
      x_[s] = std::move(out[i]);
      target_[s] = at::Tensor();
      residual[s] = at::Tensor();
      if (last) { // x0 and b have done their work here
        initial[s] = at::Tensor();
        loss[s] = at::Tensor();
      }
    }
    if (!on_cpu) pending.push_back({std::move(norms), slots, k, std::move(scaled)});
  };

  // One read of every norm queued since the last read.
  auto settle_pending = [&] {
    if (pending.empty()) return;
    std::vector<at::Tensor> all;
    for (const auto& p : pending) all.push_back(p.norms);
    const at::Tensor host = at::cat(all).to(at::kCPU);
    int64_t row = 0;
    for (const auto& p : pending) {
      const int64_t n = static_cast<int64_t>(p.slots.size());
      const at::Tensor scaled = p.scaled.defined() ? p.scaled.to(at::kCPU) : at::Tensor();
      settle(host.narrow(0, row, n), p.slots, p.stage, nullptr, scaled);
      row += n;
    }
    pending.clear();
  };

  // The relaxing states each layer's relaxation VJP reaches, once each.
  std::vector<std::vector<int>> relax_inputs(num_layers);
  for (int L = 0; L < num_layers; ++L) {
    const Layer& layer = plan_.layers[L];
    auto& inputs = relax_inputs[L];
    for (size_t q = 0; q < layer.chain.size(); ++q)
      for (size_t j = 0; j < layer.targets[q].size(); ++j) {
        const EdgeTarget& t = layer.targets[q][j];
        if (t.kind == TargetKind::State && layer.masks[relax_pass][q][j] &&
            std::find(inputs.begin(), inputs.end(), t.index) == inputs.end())
          inputs.push_back(t.index);
      }
  }
  auto needs_state = [&](int s, int k) {
    return s >= 0 && !plan_.slots[s].clamped && plan_.slots[s].needed && below_[s] >= k;
  };

  // Stages K .. 1, producers first: a layer reads y_{k+1} of its states
  // before their consumers have sent anything for y_k, so no state holds its
  // old and its new value at once; a state moves on once its last consumer
  // has sent its share.
  for (int k = K; k >= 1; --k) {
    auto runs = [&](int L) {
      return k < K && has_relaxing[L] && layer_below[L] >= k + 1 &&
             plan_.layers[L].has_work[relax_pass];
    };
    std::vector<int> remaining(S, 0);
    std::vector<char> own_done(S, 1);
    for (int L = 0; L < num_layers; ++L) {
      if (!plan_.layers[L].needed || !runs(L)) continue;
      for (int u : relax_inputs[L]) ++remaining[u];
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
    for (int L = num_layers - 1; L >= 0; --L) {
      if (!plan_.layers[L].needed || !runs(L)) continue;
      // y_{k+1} dies with this pass: its buffer may take f' in place.
      propagate_consuming(L, Pass::Relax, layer_grads(L, /*relaxing=*/true, /*clamped=*/false));
      batch.clear();
      for (int s : plan_.layers[L].out_slots) {
        if (s < 0) continue;
        own_done[s] = 1;
        if (!updated[s] && ready(s)) batch.push_back(s);
      }
      for (int u : relax_inputs[L]) {
        --remaining[u];
        if (!updated[u] && ready(u)) batch.push_back(u);
      }
      update_states(batch, k);
      for (int s : batch) updated[s] = 1;
    }
    for (int s : relaxing_)
      TORCH_INTERNAL_ASSERT(!needs_state(s, k) || updated[s], "closed form: state ", s,
                            " missed stage ", k);
    // Off the CPU: one read per stage, so a divergence is reported at the
    // stage it happened in (as on the CPU) instead of after the whole sweep.
    settle_pending();
  }

  // Stage 0, consumers first, level by level: y_0 = x_T is final on a level
  // once the levels above have sent J y_1; then the level's layers take
  // their gradients and send J x_T for the residuals below.
  for (size_t level = 0; level < by_level.size(); ++level) {
    const auto& layers = by_level[level];
    if (K > 0) {
      sink_ = &target_;
      sink_min_below_ = 0;
      for (int L : layers) {
        if (!has_relaxing[L] || layer_below[L] < 1) continue;
        if (!plan_.layers[L].has_work[relax_pass]) continue;
        propagate_consuming(L, Pass::Relax, layer_grads(L, /*relaxing=*/true, /*clamped=*/false));
      }
    }
    std::vector<int> slots;
    for (int L : layers)
      for (int s : plan_.layers[L].out_slots)
        if (needs_state(s, 0)) slots.push_back(s);
    update_states(slots, 0);
    // x_T is final on this level: gradients, and the residual's J x_T.
    sink_ = &residual;
    sink_min_below_ = 0;
    for (int L : layers) {
      const Layer& layer = plan_.layers[L];
      if (config_.exact_rule()) {
        if (!has_clamped[L]) {
          propagate_consuming(L, Pass::Full, layer_grads(L, true, true));
        } else {
          // The loss gradients' share of the states' targets is in b.
          propagate(L, Pass::Gradient, layer_grads(L, true, true));
          if (has_relaxing[L] && layer.has_work[relax_pass])
            propagate(L, Pass::Relax, layer_grads(L, true, false));
        }
      } else {
        if (!has_clamped[L]) {
          propagate(L, Pass::Propagate, layer_grads(L, true, true));
        } else {
          propagate(L, Pass::InputGrad, layer_grads(L, true, true));
          if (has_relaxing[L] && layer.has_work[relax_pass])
            propagate(L, Pass::Relax, layer_grads(L, true, false));
        }
        propagate(L, Pass::WeightGrad, layer_grads(L, true, true));
      }
      for (int s : layer.out_slots)
        if (s >= 0 && !plan_.slots[s].clamped) x_[s] = at::Tensor();
      if (release_saved)
        for (int n : layer.chain) graph_.nodes[n]->release_variables();
    }
  }
  sink_ = nullptr;

  settle_pending();
  double scale = 0.0;
  for (int s : relaxing_) scale = std::max(scale, dn[s].second);
  const double floor = std::max(scale * 1e-6, 1e-300);
  double worst = 0.0;
  for (int s : relaxing_) {
    final_residual[s] = dn[s].first / std::max(dn[s].second, floor);
    worst = std::max(worst, final_residual[s]); // NaN (unknown) is skipped
  }
  stats.evaluation = Evaluation::ClosedForm;
  stats.depth = plan_.depth;
  stats.steps = config_.steps;
  stats.sweeps = K;
  stats.nonfinite = nonfinite;
  stats.max_residual = nonfinite ? std::numeric_limits<double>::infinity() : worst;
  stats.converged = converged_without_tol(config_, config_.steps, plan_.depth, nonfinite, worst);
  stats.residuals = at::tensor(final_residual, at::kDouble);

  propagate_param_side();
  return finish_leaf_gradients();
}

} // namespace torch_ar

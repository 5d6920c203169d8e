#pragma once
// The VJP routing every evaluation shares: a layer's chain of VJPs run from
// the gradients at its outputs, each result sent where the plan says (the
// next node of the chain, a state, a leaf, a parameter-only node), and the
// leaf gradients accumulated from there. The evaluations (exact_sweep.h,
// literal_steps.h, closed_form.h) differ only in how they keep their states,
// so a state's share goes to the evaluation's StateSink.

#include "engine/config.h"
#include "engine/node_vjp.h"
#include "engine/plan.h"

#include <string>
#include <vector>

namespace torch_ar {

using torch::autograd::variable_list;

// Where the VJP results meant for relaxation states go.
class StateSink {
 public:
  virtual void add(int slot, at::Tensor grad) = 0;

 protected:
  ~StateSink() = default;
};

class Router {
 public:
  // backward_weights: per leaf, the psi of a linear/conv weight (or undefined).
  // leaf_names: per leaf, the name errors call it by (may be empty).
  Router(const Plan& plan, const EngineConfig& config,
         std::vector<at::Tensor> backward_weights = {}, std::vector<std::string> leaf_names = {});

  const Plan& plan() const { return plan_; }
  const CapturedGraph& graph() const { return graph_; }
  const EngineConfig& config() const { return config_; }
  // Needed, non-clamped slots: the states that relax.
  const std::vector<int>& relaxing() const { return relaxing_; }
  // The dtype a slot's VJPs expect, and the one its relaxing state has
  // (float32 for reduced-precision activations).
  at::ScalarType vjp_dtype(int s) const { return vjp_dtype_[s]; }
  at::ScalarType state_dtype(int s) const { return state_dtype_[s]; }
  // Below this magnitude the update kernels flush a decaying state to zero.
  double denormal_floor() const;
  // Slot s's initial state from its forward value, a fresh tensor in the
  // state dtype and the value's memory format. Elements that are not
  // activities start at zero: NaN, +-inf, and sentinels within a factor two
  // of the forward dtype's largest finite value (a score masked with
  // finfo.min), whose transient no finite-precision relaxation can carry.
  // may_alias: return the forward value itself when it is already right
  // apart from NaN/inf (the closed form's kernel reads those as zero).
  at::Tensor initial_state(int s, const at::Tensor& forward_value, bool may_alias = false) const;

  // The rule layer L's node q follows in this pass (a variant's psi or
  // dropped f'; default: the node's own VJP).
  VjpRule rule_for(const Layer& layer, size_t q, Pass pass) const;
  // The psi that replaces the weight operand of layer's node q, in the layout
  // the node reads it; a clear error naming the parameters where there is none.
  // With direct feedback psi maps the output error instead of the op's own
  // output: its output dimension is the error's (checked by the caller).
  const at::Tensor& backward_weight_for(const Layer& layer, size_t q) const;
  // Direct feedback: whether layer's node q is a linear/conv op whose
  // input-VJP in this pass is the constant bound before the evaluation
  // (engine/direct_feedback.h), so that nothing flows through it.
  bool cut_by_direct_feedback(const Layer& layer, size_t q, Pass pass) const;

  // The gradients at layer L's outputs, in the dtypes its VJPs expect: the
  // states x of relaxing outputs and/or the loss gradients of clamped ones.
  variable_list layer_inputs(int L, const std::vector<at::Tensor>& x, bool relaxing,
                             bool clamped) const;
  // Layer L's VJP chain from its output states x (clamped ones read their
  // loss gradient); nothing when no output has a value.
  void run_layer(int L, Pass pass, const std::vector<at::Tensor>& x, StateSink* sink);
  // Layer L's VJP chain on `grads` (one per top output).
  void propagate(int L, Pass pass, variable_list grads, StateSink* sink);
  // The chain from node `first` on, whose VJP result `out` is already known.
  void propagate_from(int L, Pass pass, size_t first, variable_list out, StateSink* sink);

  // Leaf gradients: cleared (and seeded with the loss gradients that enter
  // parameter-only nodes), then the parameter-only part of the graph by
  // ordinary reverse accumulation, then the result per leaf.
  void reset_gradients();
  void propagate_param_side();
  std::vector<at::Tensor> finish_leaf_gradients();
  // The leaf contributions gathered so far, taken (cleared here).
  std::vector<at::Tensor> take_leaf_contributions();

 private:
  void contribute_leaf(int leaf, const at::Tensor& grad);
  void contribute_param_side(const EdgeTarget& t, const at::Tensor& grad);

  const Plan& plan_;
  const CapturedGraph& graph_;
  EngineConfig config_;
  std::vector<at::Tensor> backward_weights_;
  std::vector<std::string> leaf_names_;
  // "'name'" of leaf i, or "leaf i" without names.
  std::string leaf_name(int leaf) const;
  // Per leaf with a 2-D psi (kept as W^T): psi^T, for ops that read W itself.
  std::vector<at::Tensor> backward_weights_read_direct_;
  std::vector<int> relaxing_;
  std::vector<at::ScalarType> vjp_dtype_;   // per slot
  std::vector<at::ScalarType> state_dtype_; // per slot
  std::vector<at::Tensor> leaf_grad_;
  std::vector<variable_list> param_side_buf_; // per graph node
};

} // namespace torch_ar

#include "engine/plan.h"

#include "engine/plan_phases.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace torch_ar {

namespace {

at::Tensor accumulate(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// How a linear/conv node reads its weight: whether through the transpose
// F.linear inserts, and the parameter leaves the operand is made from (the
// parameter itself, or every parameter of a computed weight: weight norm,
// weight standardisation, ...; empty when no parameter is behind it).
struct WeightRead {
  std::vector<int> sources;
  bool transposed = false;
  std::vector<int64_t> operand_shape;
};

WeightRead weight_read_of(const CapturedGraph& g, int n, const OpInfo* op) {
  WeightRead read;
  if (!op || op->weight_edge < 0) return read;
  const auto& node = *g.nodes[n];
  if (op->weight_edge >= static_cast<int>(node.num_outputs())) return read;
  const Edge& weight = node.next_edge(op->weight_edge);
  if (!weight.is_valid()) return read;
  for (const c10::SymInt& d :
       weight.function->input_metadata(weight.input_nr).shape_as_dim_vector())
    read.operand_shape.push_back(d.guard_int(__FILE__, __LINE__));
  const Edge* e = &weight;
  const int first = g.index_of(e->function.get());
  if (first >= 0 && !g.activation[first] && g.nodes[first]->name() == "TBackward0") {
    read.transposed = true;
    e = &g.nodes[first]->next_edge(0);
  }
  // The parameters behind the operand: a walk through the nodes that only
  // transform parameters.
  std::vector<const Edge*> todo{e};
  std::vector<char> seen(g.nodes.size(), 0);
  while (!todo.empty()) {
    const Edge* f = todo.back();
    todo.pop_back();
    if (!f->is_valid()) continue;
    const int leaf = g.leaf_index(f->function.get());
    if (leaf >= 0) {
      if (g.leaf_kind[leaf] == LeafKind::Parameter &&
          std::find(read.sources.begin(), read.sources.end(), leaf) == read.sources.end())
        read.sources.push_back(leaf);
      continue;
    }
    const int m = g.index_of(f->function.get());
    if (m < 0 || g.activation[m] || seen[m]) continue;
    seen[m] = 1;
    for (const Edge& next : g.nodes[m]->next_edges()) todo.push_back(&next);
  }
  std::sort(read.sources.begin(), read.sources.end());
  return read;
}

bool is_residual_add(const Node& node) {
  const std::string name = node.name();
  return name == "AddBackward0" || name == "AddBackward1";
}

} // namespace

namespace plan_phases {

Builder::Builder(const CapturedGraph& graph, Granularity granularity_, Plan& plan_)
    : g(graph),
      granularity(granularity_),
      plan(plan_),
      N(static_cast<int>(graph.nodes.size())),
      op(N, nullptr),
      uses(N),
      has_ext(N),
      activation_edges(N, 0),
      joined_edge(N, -2),
      layer_of(N, -1),
      leaf_direct(graph.leaf_kind.size(), 0) {
  plan.graph = &g;
  plan.leaf_direct.resize(g.leaf_kind.size());
  for (int i = 0; i < N; ++i) {
    op[i] = find_op(g.nodes[i]->name());
    uses[i].resize(g.nodes[i]->num_inputs());
    has_ext[i].assign(g.nodes[i]->num_inputs(), 0);
  }
}

bool Builder::single_use(int n, uint32_t k) const {
  return g.nodes[n]->num_inputs() == 1 && !has_ext[n][k] && uses[n][k].size() == 1;
}

bool Builder::parametrised(int m) const {
  if (op[m]) return op[m]->role == OpRole::Lookup || op[m]->weight_edge >= 0;
  for (const Edge& e : g.nodes[m]->next_edges()) {
    if (!e.is_valid()) continue;
    const int leaf = g.leaf_index(e.function.get());
    if (leaf >= 0 ? g.leaf_kind[leaf] == LeafKind::Parameter
                  : !g.activation[g.index_of(e.function.get())])
      return true;
  }
  return false;
}

int Builder::join_edge_of(int m) {
  if (joined_edge[m] != -2) return joined_edge[m];
  int chosen = -1;
  const auto& edges = g.nodes[m]->next_edges();
  for (size_t j = 0; j < edges.size() && chosen < 0; ++j) {
    if (!edges[j].is_valid() || g.leaf_index(edges[j].function.get()) >= 0) continue;
    const int n = g.index_of(edges[j].function.get());
    if (n >= 0 && g.activation[n] && single_use(n, edges[j].input_nr)) chosen = static_cast<int>(j);
  }
  return joined_edge[m] = chosen;
}

// A tensor is internal to a layer when it is used once, is not a module
// output, and its one consumer joins it to the consumer's layer:
// - layer granularity: an elementwise or view op with no other activation
//   input;
// - block granularity: any op of the table that is not parametrised
//   (linear, conv, matmul or lookup) with no other activation input, or a
//   residual add, whose first single-use input joins it (the other input is
//   then an input of the layer).
bool Builder::internal(int n, uint32_t k) {
  if (granularity == Granularity::Op || !single_use(n, k)) return false;
  const Use& use = uses[n][k][0];
  const int m = use.node;
  if (granularity == Granularity::Layer) return !starts_layer(op[m]) && activation_edges[m] == 1;
  if (parametrised(m)) return false;
  if (activation_edges[m] == 1) return true;
  return is_residual_add(*g.nodes[m]) && join_edge_of(m) == static_cast<int>(use.edge);
}

int Builder::slot_of(int n, uint32_t k) const {
  int L = layer_of[n];
  TORCH_INTERNAL_ASSERT(L >= 0 && plan.layers[L].chain.front() == n, "state on a non-top node");
  return plan.layers[L].out_slots[k];
}

void find_uses(Builder& b) {
  const CapturedGraph& g = b.g;
  const int N = b.N;
  auto& uses = b.uses;
  auto& activation_edges = b.activation_edges;
  for (int m = 0; m < N; ++m) {
    if (!g.activation[m]) continue;
    const auto& edges = g.nodes[m]->next_edges();
    for (size_t j = 0; j < edges.size(); ++j) {
      if (!edges[j].is_valid()) continue;
      int leaf = g.leaf_index(edges[j].function.get());
      if (leaf >= 0) {
        if (g.leaf_kind[leaf] == LeafKind::Input) ++activation_edges[m];
        continue;
      }
      int n = g.index_of(edges[j].function.get());
      if (!g.activation[n]) continue;
      ++activation_edges[m];
      uses[n][edges[j].input_nr].push_back({m, j});
    }
  }
}

void place_loss_gradients(Builder& b, const std::vector<bool>& root_has_grad) {
  const CapturedGraph& g = b.g;
  Plan& plan = b.plan;
  auto& has_ext = b.has_ext;
  auto& leaf_direct = b.leaf_direct;
  plan.root_has_grad = root_has_grad;
  plan.loss_entries.assign(g.roots.size(), EdgeTarget{});
  for (size_t r = 0; r < g.roots.size(); ++r) {
    const Edge& root = g.roots[r];
    if (!root.is_valid() || !root_has_grad[r]) continue;
    int leaf = g.leaf_index(root.function.get());
    if (leaf >= 0) {
      leaf_direct[leaf] = 1;
      plan.loss_entries[r] = {TargetKind::Leaf, leaf, 0};
      continue;
    }
    int n = g.index_of(root.function.get());
    TORCH_INTERNAL_ASSERT(n >= 0);
    if (g.activation[n]) {
      has_ext[n][root.input_nr] = 1;
    } else {
      plan.loss_entries[r] = {TargetKind::ParamSide, n, root.input_nr};
    }
  }
}

void form_layers(Builder& b) {
  const CapturedGraph& g = b.g;
  Plan& plan = b.plan;
  const int N = b.N;
  auto& uses = b.uses;
  auto& has_ext = b.has_ext;
  auto& layer_of = b.layer_of;
  for (int top = 0; top < N; ++top) {
    if (!g.activation[top]) continue;
    if (g.nodes[top]->num_inputs() == 1 && b.internal(top, 0)) continue;
    Layer layer;
    int cur = top;
    while (true) {
      layer.chain.push_back(cur);
      layer_of[cur] = static_cast<int>(plan.layers.size());
      // Continue down through this node's single activation input if internal.
      // (internal() admits at most one input of each consumer.)
      int next = -1;
      for (const Edge& e : g.nodes[cur]->next_edges()) {
        if (!e.is_valid() || g.leaf_index(e.function.get()) >= 0) continue;
        int n = g.index_of(e.function.get());
        if (n >= 0 && g.activation[n] && b.internal(n, e.input_nr)) next = n;
      }
      if (next < 0) break;
      cur = next;
    }
    // Output states of the top node.
    const uint32_t outs = g.nodes[top]->num_inputs();
    layer.out_slots.assign(outs, -1);
    for (uint32_t k = 0; k < outs; ++k) {
      if (uses[top][k].empty() && !has_ext[top][k]) continue;
      StateSlot s;
      s.node = top;
      s.output_nr = k;
      s.layer = static_cast<int>(plan.layers.size());
      s.clamped = uses[top][k].empty();
      layer.out_slots[k] = static_cast<int>(plan.slots.size());
      plan.slots.push_back(std::move(s));
    }
    plan.layers.push_back(std::move(layer));
  }
}

void resolve_loss_entries(Builder& b) {
  const CapturedGraph& g = b.g;
  Plan& plan = b.plan;
  for (size_t r = 0; r < g.roots.size(); ++r) {
    const Edge& root = g.roots[r];
    if (!root.is_valid() || !plan.root_has_grad[r] || plan.loss_entries[r].kind != TargetKind::None)
      continue;
    const int n = g.index_of(root.function.get());
    plan.loss_entries[r] = {TargetKind::State, b.slot_of(n, root.input_nr), 0};
  }
}

void classify_edges(Builder& b) {
  const CapturedGraph& g = b.g;
  Plan& plan = b.plan;
  const int N = b.N;
  // Edge targets of every chain node, and of param-side nodes.
  plan.param_side_targets.resize(N);
  plan.param_side_masks.resize(N);
  auto classify = [&](const Edge& e, int chain_next) -> EdgeTarget {
    if (!e.is_valid()) return {};
    int leaf = g.leaf_index(e.function.get());
    if (leaf >= 0) return {TargetKind::Leaf, leaf, 0};
    int n = g.index_of(e.function.get());
    if (!g.activation[n]) return {TargetKind::ParamSide, n, e.input_nr};
    if (n == chain_next) return {TargetKind::Chain, n, 0};
    int s = b.slot_of(n, e.input_nr);
    TORCH_INTERNAL_ASSERT(s >= 0, "activation input without a state");
    return {TargetKind::State, s, 0};
  };
  for (int L = 0; L < static_cast<int>(plan.layers.size()); ++L) {
    Layer& layer = plan.layers[L];
    for (size_t p = 0; p < layer.chain.size(); ++p) {
      int n = layer.chain[p];
      int chain_next = p + 1 < layer.chain.size() ? layer.chain[p + 1] : -1;
      std::vector<EdgeTarget> t;
      for (const Edge& e : g.nodes[n]->next_edges()) t.push_back(classify(e, chain_next));
      for (const auto& et : t)
        if (et.kind == TargetKind::State) plan.slots[et.index].consumer_layers.push_back(L);
      layer.targets.push_back(std::move(t));
      layer.ops.push_back(b.op[n]);
      WeightRead read = weight_read_of(g, n, b.op[n]);
      layer.weight_leaf.push_back(read.sources.size() == 1 ? read.sources[0] : -1);
      layer.weight_sources.push_back(std::move(read.sources));
      layer.weight_transposed.push_back(read.transposed);
      layer.weight_operand_shape.push_back(std::move(read.operand_shape));
    }
  }
  for (int n = 0; n < N; ++n) {
    if (g.activation[n]) continue;
    plan.param_side_nodes.push_back(n);
    std::vector<bool> mask;
    for (const Edge& e : g.nodes[n]->next_edges()) {
      EdgeTarget t = classify(e, -1);
      bool want = (t.kind == TargetKind::Leaf && g.leaf_needs_grad[t.index]) ||
                  (t.kind == TargetKind::ParamSide && g.needed[t.index]);
      plan.param_side_targets[n].push_back(t);
      mask.push_back(want);
    }
    plan.param_side_masks[n] = std::move(mask);
  }
}

void mark_needed(Builder& b) {
  const CapturedGraph& g = b.g;
  Plan& plan = b.plan;
  // Which layers matter: producer-first, a layer is needed when one of its
  // nodes reaches a wanted leaf; then its output states are needed.
  for (auto& layer : plan.layers) {
    for (int n : layer.chain) layer.needed = layer.needed || g.needed[n];
    for (int s : layer.out_slots)
      if (s >= 0) plan.slots[s].needed = layer.needed;
  }
}

void build_pass_masks(Builder& b) {
  const CapturedGraph& g = b.g;
  Plan& plan = b.plan;
  // Masks per pass, built bottom-up so a chain edge is kept only when some
  // node below it has work to do.
  for (auto& layer : plan.layers) {
    const size_t P = layer.chain.size();
    for (int pass = 0; pass < kNumPasses; ++pass) {
      layer.masks[pass].assign(P, {});
      bool work_below = false;
      for (size_t q = P; q-- > 0;) {
        const auto& t = layer.targets[q];
        std::vector<bool> m(t.size(), false);
        bool any = false;
        for (size_t j = 0; j < t.size(); ++j) {
          const unsigned wanted = pass_targets(static_cast<Pass>(pass));
          bool want = false;
          switch (t[j].kind) {
            case TargetKind::State:
              want = (wanted & kToState) && plan.slots[t[j].index].needed;
              break;
            case TargetKind::Leaf: {
              const bool input = g.leaf_kind[t[j].index] == LeafKind::Input;
              want =
                  (wanted & (input ? kToInputLeaf : kToParamLeaf)) && g.leaf_needs_grad[t[j].index];
              break;
            }
            case TargetKind::ParamSide:
              want = (wanted & kToParamSide) && g.needed[t[j].index];
              break;
            case TargetKind::Chain:
              want = work_below;
              break;
            case TargetKind::None:
              break;
          }
          m[j] = want;
          any = any || want;
        }
        work_below = any;
        layer.masks[pass][q] = std::move(m);
      }
      layer.has_work[pass] = work_below && layer.needed;
    }
  }
}

void assign_levels(Builder& b) {
  Plan& plan = b.plan;
  // Levels (consumers first): a relaxing state sits one layer below the
  // highest of its consumers; the depth D is the largest level.
  for (auto& layer : plan.layers) {
    for (int s : layer.out_slots) {
      if (s < 0) continue;
      StateSlot& slot = plan.slots[s];
      if (!slot.clamped) {
        int lvl = 0;
        for (int c : slot.consumer_layers) lvl = std::max(lvl, plan.layers[c].level);
        slot.level = lvl + 1;
      }
      layer.level = std::max(layer.level, slot.level);
    }
    bool all_clamped = true;
    for (int s : layer.out_slots)
      if (s >= 0 && !plan.slots[s].clamped) all_clamped = false;
    layer.constant = all_clamped;
  }
  for (auto& slot : plan.slots) {
    if (!slot.clamped && slot.needed) {
      plan.depth = std::max(plan.depth, slot.level);
      ++plan.num_relaxing;
    }
  }
}

void count_params_outside_relaxation(Builder& b) {
  const CapturedGraph& g = b.g;
  Plan& plan = b.plan;
  const int N = b.N;
  const auto& leaf_direct = b.leaf_direct;
  // Which parameter gradients depend on a relaxing state: layers whose
  // outputs relax pass that on through param-side nodes to the leaves.
  {
    const size_t num_leaves = g.leaf_kind.size();
    std::vector<char> reached(num_leaves, 0), relaxed(num_leaves, 0);
    std::vector<char> side_reached(N, 0), side_relaxed(N, 0);
    auto reach = [&](const EdgeTarget& t, bool from_relaxation) {
      if (t.kind == TargetKind::Leaf) {
        reached[t.index] = 1;
        relaxed[t.index] = relaxed[t.index] || from_relaxation;
      } else if (t.kind == TargetKind::ParamSide) {
        side_reached[t.index] = 1;
        side_relaxed[t.index] = side_relaxed[t.index] || from_relaxation;
      }
    };
    const int gp = static_cast<int>(Pass::Gradient);
    for (const auto& layer : plan.layers) {
      if (!layer.needed) continue;
      bool from_relaxation = false;
      for (int s : layer.out_slots)
        from_relaxation =
            from_relaxation || (s >= 0 && !plan.slots[s].clamped && plan.slots[s].needed);
      for (size_t q = 0; q < layer.chain.size(); ++q)
        for (size_t j = 0; j < layer.targets[q].size(); ++j)
          if (layer.masks[gp][q][j]) reach(layer.targets[q][j], from_relaxation);
    }
    for (const auto& t : plan.loss_entries)
      if (t.kind == TargetKind::ParamSide) reach(t, false);
    for (int n : plan.param_side_nodes) {
      if (!side_reached[n]) continue;
      for (size_t j = 0; j < plan.param_side_targets[n].size(); ++j)
        if (plan.param_side_masks[n][j]) reach(plan.param_side_targets[n][j], side_relaxed[n]);
    }
    for (size_t l = 0; l < num_leaves; ++l) {
      if (leaf_direct[l]) reached[l] = 1;
      if (g.leaf_kind[l] == LeafKind::Parameter && g.leaf_needs_grad[l] && reached[l] &&
          !relaxed[l])
        ++plan.params_outside_relaxation;
    }
  }
}

void name_states(Builder& b) {
  const CapturedGraph& g = b.g;
  Plan& plan = b.plan;
  // Names for stats and traces: "<index>:<top>+<chain...>[:output]".
  for (size_t s = 0; s < plan.slots.size(); ++s) {
    StateSlot& slot = plan.slots[s];
    const Layer& layer = plan.layers[slot.layer];
    std::string name = std::to_string(s) + ":";
    for (size_t p = layer.chain.size(); p-- > 0;) {
      name += g.nodes[layer.chain[p]]->name();
      if (p) name += "+";
    }
    if (layer.out_slots.size() > 1) name += "[" + std::to_string(slot.output_nr) + "]";
    slot.name = std::move(name);
  }
}

} // namespace plan_phases

Plan make_plan(const CapturedGraph& g, const std::vector<bool>& root_has_grad,
               Granularity granularity) {
  TORCH_INTERNAL_ASSERT(root_has_grad.size() == g.roots.size());
  Plan plan;
  plan_phases::Builder b(g, granularity, plan);
  plan_phases::find_uses(b);
  plan_phases::place_loss_gradients(b, root_has_grad);
  plan_phases::form_layers(b);
  plan_phases::resolve_loss_entries(b);
  plan_phases::classify_edges(b);
  plan_phases::mark_needed(b);
  plan_phases::build_pass_masks(b);
  plan_phases::assign_levels(b);
  plan_phases::count_params_outside_relaxation(b);
  plan_phases::name_states(b);
  return plan;
}

std::vector<bool> roots_with_grad(const std::vector<at::Tensor>& output_grads) {
  std::vector<bool> has(output_grads.size());
  for (size_t r = 0; r < output_grads.size(); ++r) has[r] = output_grads[r].defined();
  return has;
}

bool expects_loss_gradients(const Plan& plan, const std::vector<at::Tensor>& output_grads) {
  const auto& roots = plan.graph->roots;
  if (output_grads.size() != roots.size()) return false;
  for (size_t r = 0; r < roots.size(); ++r)
    if (roots[r].is_valid() && plan.root_has_grad[r] != output_grads[r].defined()) return false;
  return true;
}

void bind_loss_gradients(Plan& plan, const std::vector<at::Tensor>& output_grads) {
  TORCH_INTERNAL_ASSERT(expects_loss_gradients(plan, output_grads),
                        "bind_loss_gradients: the plan was made for other loss gradients");
  for (auto& slot : plan.slots) slot.ext = at::Tensor();
  for (auto& direct : plan.leaf_direct) direct = at::Tensor();
  plan.param_side_ext.clear();
  for (size_t r = 0; r < output_grads.size(); ++r) {
    const EdgeTarget& t = plan.loss_entries[r];
    const at::Tensor& grad = output_grads[r];
    switch (t.kind) {
      case TargetKind::State:
        plan.slots[t.index].ext = accumulate(plan.slots[t.index].ext, grad);
        break;
      case TargetKind::Leaf:
        plan.leaf_direct[t.index] = accumulate(plan.leaf_direct[t.index], grad);
        break;
      case TargetKind::ParamSide:
        plan.param_side_ext.push_back({t, grad});
        break;
      default:
        break;
    }
  }
}

Plan make_plan(const CapturedGraph& graph, const std::vector<at::Tensor>& output_grads,
               Granularity granularity) {
  Plan plan = make_plan(graph, roots_with_grad(output_grads), granularity);
  bind_loss_gradients(plan, output_grads);
  return plan;
}

} // namespace torch_ar

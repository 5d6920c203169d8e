#pragma once
// The phases of make_plan (engine/plan.cpp), in the order it runs them, each
// a function of its own over the state they share, so that each can be
// tested on its own (tests/cpp/test_plan.cpp).

#include "engine/plan.h"

#include <vector>

namespace torch_ar::plan_phases {

struct Use {
  int node; // consumer node
  size_t edge;
};

// What the phases share while one plan is made.
struct Builder {
  Builder(const CapturedGraph& graph, Granularity granularity, Plan& plan);

  const CapturedGraph& g;
  Granularity granularity;
  Plan& plan;
  int N;
  std::vector<const OpInfo*> op;                   // per node: its op table row, or null
  std::vector<std::vector<std::vector<Use>>> uses; // per node output: activation consumers
  std::vector<std::vector<char>> has_ext;          // per node output: a loss gradient enters
  std::vector<int> activation_edges;               // per node: its activation inputs
  std::vector<int> joined_edge;                    // per node: see join_edge_of (-2: not yet)
  std::vector<int> layer_of;                       // per node: its layer, -1
  std::vector<char> leaf_direct;                   // per leaf: a loss gradient reaches it directly

  // A node output read once, by one activation node, and not a module output.
  bool single_use(int n, uint32_t k) const;
  // Block granularity's layer boundaries: the table's linear/conv/matmul ops
  // and lookups, and an op outside the table that reads a parameter (or a
  // value computed from parameters only) directly.
  bool parametrised(int m) const;
  // The edge of a block-granularity residual add that continues its layer
  // (its first single-use activation input); -1: none.
  int join_edge_of(int m);
  // Whether node n's output k is internal to its consumer's layer.
  bool internal(int n, uint32_t k);
  // The state of node n's output k (n a layer's top node).
  int slot_of(int n, uint32_t k) const;
};

// 1. Every activation tensor's uses by activation nodes.
void find_uses(Builder& b);
// 2. Where loss gradients will enter: the module outputs that expect one
//    (states are resolved in 4).
void place_loss_gradients(Builder& b, const std::vector<bool>& root_has_grad);
// 3. Layers (consumers first) and their output states: a top node and the
//    chain of nodes below it whose outputs are internal.
void form_layers(Builder& b);
// 4. The state each loss gradient enters at.
void resolve_loss_entries(Builder& b);
// 5. Every chain node's edge targets (state, chain, leaf, param side), the
//    states' consumer layers, and the param-side nodes' targets and masks.
void classify_edges(Builder& b);
// 6. Which layers and states some wanted gradient depends on.
void mark_needed(Builder& b);
// 7. Per pass, which edges of each chain node carry work.
void build_pass_masks(Builder& b);
// 8. Levels (one layer below the highest consumer), the depth D, the
//    relaxing states, and the layers whose outputs are all clamped.
void assign_levels(Builder& b);
// 9. Parameters whose gradient depends on no relaxing state.
void count_params_outside_relaxation(Builder& b);
// 10. Names for stats and traces: "<index>:<top>+<chain...>[:output]".
void name_states(Builder& b);

} // namespace torch_ar::plan_phases

// make_plan's phases one by one (engine/plan_phases.h), on hand-built graphs.
#include "engine/graph.h"
#include "engine/plan.h"
#include "engine/plan_phases.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

using torch_ar::CapturedGraph;
using torch_ar::Granularity;
using torch_ar::Plan;
using torch_ar::TargetKind;
namespace phases = torch_ar::plan_phases;

at::Tensor param(std::vector<int64_t> shape, int seed) {
  at::manual_seed(seed);
  return at::randn(shape, at::kDouble).set_requires_grad(true);
}

// x -> tanh(x W1^T) -> tanh(. W2^T) -> . W3^T = y, the module's one output.
struct Chain {
  at::Tensor x = param({5, 4}, 1), w1 = param({6, 4}, 2), w2 = param({6, 6}, 3),
             w3 = param({3, 6}, 4);
  at::Tensor y;
  Chain() { y = at::mm(at::tanh(at::mm(at::tanh(at::mm(x, w1.t())), w2.t())), w3.t()); }
  CapturedGraph capture(std::vector<bool> needs = {true, true, true, false}) const {
    return torch_ar::capture_graph({y}, {w1, w2, w3, x}, {false, false, false, true}, needs);
  }
};

// Runs the phases up to and including `last` (1-based, in make_plan's order).
void run_phases(phases::Builder& b, int last) {
  using Phase = void (*)(phases::Builder&);
  static const Phase after_loss[] = {phases::form_layers,
                                     phases::resolve_loss_entries,
                                     phases::classify_edges,
                                     phases::mark_needed,
                                     phases::build_pass_masks,
                                     phases::assign_levels,
                                     phases::count_params_outside_relaxation,
                                     phases::name_states};
  if (last >= 1) phases::find_uses(b);
  if (last >= 2) phases::place_loss_gradients(b, std::vector<bool>(b.g.roots.size(), true));
  for (int p = 3; p <= last; ++p) after_loss[p - 3](b);
}

int node_named(const CapturedGraph& g, const std::string& name, int skip = 0) {
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (g.nodes[i]->name() == name && skip-- == 0) return static_cast<int>(i);
  return -1;
}

// Capture: the nodes behind the outputs, consumers first; which depend on
// data (activations) and which only transform parameters; which reach a
// wanted leaf.
TEST(Capture, ReadsTheGraphBehindTheOutputs) {
  Chain c;
  CapturedGraph g = c.capture({true, false, false, false}); // W1 only
  ASSERT_EQ(g.roots.size(), 1u);
  EXPECT_TRUE(g.roots[0].is_valid());
  EXPECT_EQ(g.index_of(g.roots[0].function.get()), 0); // the output's node comes first
  int mm = 0, t = 0;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const std::string name = g.nodes[i]->name();
    if (name == "MmBackward0") {
      ++mm;
      EXPECT_TRUE(g.activation[i]) << i;
    } else if (name == "TBackward0") {
      ++t;
      EXPECT_FALSE(g.activation[i]) << "W^T depends on no data";
    }
    // Consumers before producers.
    for (const auto& e : g.nodes[i]->next_edges()) {
      const int j = e.is_valid() ? g.index_of(e.function.get()) : -1;
      if (j >= 0) {
        EXPECT_GT(j, static_cast<int>(i));
      }
    }
  }
  EXPECT_EQ(mm, 3);
  EXPECT_EQ(t, 3);
  EXPECT_EQ(g.leaf_kind.size(), 4u);
  EXPECT_EQ(g.leaf_kind[3], torch_ar::LeafKind::Input);
  // W1 is wanted: every matmul lies above it; W3's transpose does not.
  const int w3t = g.index_of(g.nodes[0]->next_edge(1).function.get()); // mm(h2, W3^T)
  ASSERT_GE(w3t, 0);
  ASSERT_EQ(g.nodes[w3t]->name(), "TBackward0");
  EXPECT_TRUE(g.needed[0]);
  EXPECT_FALSE(g.needed[w3t]);
}

TEST(Capture, AnOutputIsDifferentiableWhenItReachesAWantedLeaf) {
  Chain c;
  at::Tensor other = param({2}, 9) * 3.0;
  EXPECT_EQ(torch_ar::outputs_reaching({c.y, other}, {c.w1}), (std::vector<bool>{true, false}));
  EXPECT_EQ(torch_ar::outputs_reaching({c.y, other}, {c.x}), (std::vector<bool>{true, false}));
}

TEST(PlanPhases, FindUsesCountsActivationConsumersOnly) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  run_phases(b, 1);
  // Each tanh output is read by one matmul; the weights' transposes are not
  // activations and count for nothing.
  for (int k = 0; k < 2; ++k) {
    const int tanh = node_named(g, "TanhBackward0", k);
    ASSERT_GE(tanh, 0);
    ASSERT_EQ(b.uses[tanh][0].size(), 1u);
    EXPECT_EQ(g.nodes[b.uses[tanh][0][0].node]->name(), "MmBackward0");
  }
  const int top = node_named(g, "MmBackward0");
  EXPECT_EQ(b.activation_edges[top], 1); // its activation input, not W3^T
  EXPECT_TRUE(b.uses[top][0].empty());   // the output: nothing inside reads it
}

TEST(PlanPhases, LossGradientsEnterAtTheOutputsThatExpectOne) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  phases::find_uses(b);
  phases::place_loss_gradients(b, {true});
  const int top = node_named(g, "MmBackward0");
  EXPECT_TRUE(b.has_ext[top][0]);
  EXPECT_EQ(plan.loss_entries[0].kind, TargetKind::None); // a state: resolved later
  Plan without;
  phases::Builder none(g, Granularity::Layer, without);
  phases::find_uses(none);
  phases::place_loss_gradients(none, {false});
  EXPECT_FALSE(none.has_ext[top][0]);
}

TEST(PlanPhases, LayersFollowTheGranularity) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan layer_plan, op_plan;
  phases::Builder layer(g, Granularity::Layer, layer_plan);
  phases::Builder op(g, Granularity::Op, op_plan);
  run_phases(layer, 3);
  run_phases(op, 3);
  // The paper's neurons: the output matmul, and two (matmul + tanh) layers.
  ASSERT_EQ(layer_plan.layers.size(), 3u);
  EXPECT_EQ(layer_plan.layers[0].chain.size(), 1u);
  EXPECT_EQ(layer_plan.layers[1].chain.size(), 2u);
  EXPECT_EQ(layer_plan.slots.size(), 3u);
  EXPECT_TRUE(layer_plan.slots[0].clamped);
  EXPECT_FALSE(layer_plan.slots[1].clamped);
  // One state per op.
  EXPECT_EQ(op_plan.layers.size(), 5u);
  EXPECT_EQ(op_plan.slots.size(), 5u);
}

TEST(PlanPhases, TheLossGradientEntersTheClampedOutputState) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  run_phases(b, 4);
  ASSERT_EQ(plan.loss_entries[0].kind, TargetKind::State);
  EXPECT_TRUE(plan.slots[plan.loss_entries[0].index].clamped);
}

TEST(PlanPhases, EdgesAreClassifiedAndConsumersRecorded) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  run_phases(b, 5);
  // The output layer reads the state below it and W3 (through W3^T).
  std::vector<TargetKind> kinds;
  for (const auto& t : plan.layers[0].targets[0]) kinds.push_back(t.kind);
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), TargetKind::State), kinds.end());
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), TargetKind::ParamSide), kinds.end());
  EXPECT_EQ(plan.slots[1].consumer_layers, std::vector<int>{0});
  EXPECT_EQ(plan.slots[2].consumer_layers, std::vector<int>{1});
  EXPECT_EQ(plan.layers[2].weight_leaf.back(), 0); // the first layer's matmul reads W1
}

TEST(PlanPhases, OnlyWhatAWantedGradientDependsOnIsNeeded) {
  Chain c;
  CapturedGraph g = c.capture({false, false, true, false}); // W3 only
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  run_phases(b, 6);
  EXPECT_TRUE(plan.layers[0].needed);
  EXPECT_FALSE(plan.layers[1].needed);
  EXPECT_FALSE(plan.slots[2].needed);
}

TEST(PlanPhases, PassMasksKeepEachPassToItsTargets) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  run_phases(b, 7);
  const auto& layer = plan.layers[0];
  const auto& targets = layer.targets[0];
  const auto& relax = layer.masks[static_cast<int>(torch_ar::Pass::Relax)][0];
  const auto& weights = layer.masks[static_cast<int>(torch_ar::Pass::WeightGrad)][0];
  for (size_t j = 0; j < targets.size(); ++j) {
    EXPECT_EQ(relax[j], targets[j].kind == TargetKind::State) << j;
    EXPECT_EQ(weights[j], targets[j].kind == TargetKind::ParamSide) << j;
  }
  EXPECT_TRUE(layer.has_work[static_cast<int>(torch_ar::Pass::Full)]);
}

TEST(PlanPhases, LevelsGiveTheDepth) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  run_phases(b, 8);
  EXPECT_EQ(plan.slots[0].level, 0);
  EXPECT_EQ(plan.slots[1].level, 1);
  EXPECT_EQ(plan.slots[2].level, 2);
  EXPECT_EQ(plan.depth, 2);
  EXPECT_EQ(plan.num_relaxing, 2);
  EXPECT_TRUE(plan.layers[0].constant);
  EXPECT_FALSE(plan.layers[1].constant);
}

TEST(PlanPhases, TheOutputLayersWeightIsOutsideTheRelaxation) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  run_phases(b, 9);
  EXPECT_EQ(plan.params_outside_relaxation, 1); // W3: its gradient reads the clamped output
}

TEST(PlanPhases, StatesAreNamedByTheirNodes) {
  Chain c;
  CapturedGraph g = c.capture();
  Plan plan;
  phases::Builder b(g, Granularity::Layer, plan);
  run_phases(b, 10);
  EXPECT_EQ(plan.slots[0].name, "0:MmBackward0");
  EXPECT_EQ(plan.slots[1].name, "1:MmBackward0+TanhBackward0");
}

// h = tanh(x W1^T); z = h W2^T + h; y = z W3^T: block granularity joins the
// residual add to the layer of its first single-use input.
TEST(PlanPhases, BlockGranularityJoinsTheResidualAdd) {
  at::Tensor x = param({5, 4}, 11), w1 = param({4, 4}, 12), w2 = param({4, 4}, 13),
             w3 = param({2, 4}, 14);
  at::Tensor h = at::tanh(at::mm(x, w1.t()));
  at::Tensor y = at::mm(at::mm(h, w2.t()) + h, w3.t());
  CapturedGraph g = torch_ar::capture_graph({y}, {w1, w2, w3, x}, {false, false, false, true},
                                            {true, true, true, false});
  Plan layer_plan, block_plan;
  phases::Builder layer(g, Granularity::Layer, layer_plan);
  phases::Builder block(g, Granularity::Block, block_plan);
  run_phases(layer, 10);
  run_phases(block, 10);
  EXPECT_LT(block_plan.layers.size(), layer_plan.layers.size());
  const int add = node_named(g, "AddBackward0");
  ASSERT_GE(add, 0);
  EXPECT_GE(block.join_edge_of(add), 0);
  EXPECT_EQ(block_plan.layers[block.layer_of[add]].chain.size(), 2u); // the add and the matmul
}

} // namespace

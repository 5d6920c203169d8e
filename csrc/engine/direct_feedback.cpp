#include "engine/direct_feedback.h"

#include "engine/node_vjp.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/Functions.h>

#include <string>

namespace torch_ar {

namespace {

namespace gen = torch::autograd::generated;

std::vector<int64_t> concrete_shape(const torch::autograd::InputMetadata& meta) {
  std::vector<int64_t> out;
  for (const c10::SymInt& d : meta.shape_as_dim_vector()) out.push_back(d.expect_int());
  return out;
}

std::string shape_text(c10::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// The forward output shape of the view that un-flattens a linear op's rows
// (F.linear on [.., tokens, in] runs one addmm on [rows, in]); empty if none.
std::vector<int64_t> unflattened_shape(const CapturedGraph& graph, const Node& op) {
  for (const auto& n : graph.nodes) {
    const std::string name = n->name();
    const bool is_view = name.rfind("View", 0) == 0 || name.rfind("UnsafeView", 0) == 0 ||
                         name.rfind("Reshape", 0) == 0;
    if (!is_view || n->num_inputs() != 1) continue;
    for (const auto& edge : n->next_edges())
      if (edge.function.get() == &op) return concrete_shape(n->input_metadata(0));
  }
  return {};
}

// e ([N, D]) laid out as the cotangent of `node`'s output: the op's output
// with D channels (a conv) or D features (a linear op), e repeated over every
// position of a sample.
at::Tensor error_at(const CapturedGraph& graph, Node& node, const at::Tensor& e) {
  const int64_t N = e.size(0), D = e.size(1);
  const auto& meta = node.input_metadata(0);
  const std::vector<int64_t> out = concrete_shape(meta);
  const auto options = meta.options();
  auto refuse = [&](const std::string& why) {
    TORCH_CHECK(false, "torch_ar: direct feedback alignment cannot project the output error (", N,
                " samples) onto node '", node.name(), "' (output ", shape_text(out), "): ", why);
  };
  if (auto* conv = dynamic_cast<gen::ConvolutionBackward0*>(&node)) {
    if (conv->transposed) refuse("a transposed convolution has no direct feedback weight");
    if (out.size() < 3 || out[0] != N) refuse("its first dimension is not the batch");
    std::vector<int64_t> view(out.size(), 1), expanded = out;
    view[0] = N;
    view[1] = D;
    expanded[1] = D;
    return e.to(options).view(view).expand(expanded).contiguous();
  }
  // A linear op: [rows, out], rows the samples or their flattened positions.
  if (out.size() != 2) refuse("a linear op's output must be 2-D");
  if (out[0] == N) return e.to(options);
  const std::vector<int64_t> full = unflattened_shape(graph, node);
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < full.size(); ++d) rows *= full[d];
  if (full.size() < 3 || rows != out[0] || full.back() != out[1])
    refuse("its rows are not the samples and no view un-flattens them into positions");
  std::vector<int64_t> batch_dims;
  for (size_t d = 0; d + 1 < full.size(); ++d)
    if (full[d] == N) batch_dims.push_back(static_cast<int64_t>(d));
  if (batch_dims.empty())
    refuse("no dimension of its un-flattened shape " + shape_text(full) +
           " has the batch's size: the model folds the samples into another dimension (as "
           "window or patch attention does), so which rows belong to which sample is unknown");
  if (batch_dims.size() > 1)
    refuse("in its un-flattened shape " + shape_text(full) + ", " +
           std::to_string(batch_dims.size()) +
           " dimensions have the batch's size, so the samples cannot be told apart from the "
           "positions; use a batch size that no other dimension has");
  std::vector<int64_t> view(full.size(), 1), expanded = full;
  view[batch_dims[0]] = N;
  view.back() = D;
  expanded.back() = D;
  return e.to(options).view(view).expand(expanded).reshape({out[0], D});
}

// Adds what reaches a state to its constant term.
class ExtSink final : public StateSink {
 public:
  explicit ExtSink(Plan& plan) : plan_(plan) {}
  void add(int slot, at::Tensor grad) override {
    at::Tensor& ext = plan_.slots[slot].ext;
    ext = ext.defined() ? ext + grad : std::move(grad);
  }

 private:
  Plan& plan_;
};

} // namespace

void bind_direct_feedback(Plan& plan, Router& router, const std::vector<at::Tensor>& output_grads) {
  at::Tensor error;
  int with_grad = 0;
  for (const auto& g : output_grads)
    if (g.defined()) {
      error = g;
      ++with_grad;
    }
  TORCH_CHECK(with_grad == 1,
              "torch_ar: direct feedback alignment projects the loss gradient of the module's "
              "one output onto every layer, but this backward has ",
              with_grad,
              " outputs with a loss gradient; return one tensor (or put the loss on one output)");
  TORCH_CHECK(error.dim() >= 1 && error.size(0) > 0,
              "torch_ar: direct feedback alignment needs an output with a batch dimension, got "
              "shape ",
              error.sizes());
  const at::Tensor e = error.reshape({error.size(0), -1});
  const int64_t D = e.size(1);
  const CapturedGraph& graph = router.graph();
  ExtSink sink(plan);
  const int p = static_cast<int>(Pass::Propagate);
  for (int L = 0; L < static_cast<int>(plan.layers.size()); ++L) {
    const Layer& layer = plan.layers[L];
    if (!layer.has_work[p]) continue;
    for (size_t q = 0; q < layer.chain.size(); ++q) {
      const OpInfo* op = layer.ops[q];
      const auto& mask = layer.masks[p][q];
      bool wanted = false;
      for (bool m : mask) wanted = wanted || m;
      if (!op || !op->psi_vjp || !wanted) continue;
      Node& node = *graph.nodes[layer.chain[q]];
      const at::Tensor& psi = router.backward_weight_for(layer, q);
      const int64_t out_dim = psi.dim() == 2 ? 1 : 0;
      TORCH_CHECK(psi.size(out_dim) == D, "torch_ar: the direct feedback weight that node '",
                  node.name(), "' reads (shape ", psi.sizes(), ") projects an error of size ",
                  psi.size(out_dim), " per sample, but the module's output has ", D,
                  " per sample (pass ARBackward(..., output_dim=", D, "))");
      if (auto* conv = dynamic_cast<gen::ConvolutionBackward0*>(&node)) {
        const at::Tensor input = conv->input_.unpack();
        TORCH_CHECK(input.defined() && input.dim() == psi.dim() && psi.size(1) == input.size(1),
                    "torch_ar: the direct feedback weight that node '", node.name(),
                    "' reads (shape ", psi.sizes(),
                    ") must read every channel of the convolution's input: [output_dim, ",
                    input.defined() && input.dim() > 1 ? input.size(1) : -1, ", *kernel]");
      }
      VjpRule rule;
      rule.backward_weight = &psi;
      variable_list out = node_vjp(node, op, {error_at(graph, node, e)}, mask, rule);
      router.propagate_from(L, Pass::Propagate, q, std::move(out), &sink);
    }
  }
  std::vector<at::Tensor> leaves = router.take_leaf_contributions();
  for (size_t l = 0; l < leaves.size(); ++l) {
    if (!leaves[l].defined() || !graph.leaf_needs_grad[l]) continue;
    at::Tensor& direct = plan.leaf_direct[l];
    direct = direct.defined() ? direct + leaves[l] : leaves[l];
  }
}

} // namespace torch_ar

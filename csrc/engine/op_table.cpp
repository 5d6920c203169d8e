#include "engine/op_table.h"

#include <unordered_map>

namespace torch_ar {

namespace {

using R = OpRole;

std::vector<OpInfo> build_table() {
  return {
      // Specialised structural ops.
      {"AddmmBackward0", "linear (addmm)", R::Structural, vjp::addmm, false, 2, vjp::addmm_psi},
      {"MmBackward0", "linear without bias (mm)", R::Structural, vjp::mm, false, 1, vjp::mm_psi},
      {"ConvolutionBackward0", "conv1d/conv2d/conv3d", R::Structural, vjp::convolution, false, 1,
       vjp::convolution_psi},
      {"MaxPool2DWithIndicesBackward0", "max_pool2d (and max_pool1d)", R::Structural,
       vjp::max_pool2d, false},
      {"AvgPool2DBackward0", "avg_pool2d", R::Structural, vjp::avg_pool2d, false},
      {"AdaptiveAvgPool2DBackward0", "adaptive_avg_pool2d", R::Structural, vjp::adaptive_avg_pool2d,
       false},
      {"NativeBatchNormBackward0", "batch_norm (train and eval)", R::Structural, vjp::batch_norm,
       false},
      // What batch_norm records elsewhere: cuDNN on CUDA (float32/float64,
      // float16 with float32 weights), MIOpen on ROCm, the functional forms.
      {"CudnnBatchNormBackward0", "batch_norm on CUDA (cuDNN)", R::Structural,
       vjp::cudnn_batch_norm, false},
      {"MiopenBatchNormBackward0", "batch_norm on ROCm (MIOpen)", R::Structural,
       vjp::miopen_batch_norm, false},
      {"NativeBatchNormLegitBackward0", "_native_batch_norm_legit", R::Structural,
       vjp::batch_norm_legit, false},
      {"NativeBatchNormLegitNoTrainingBackward0", "_native_batch_norm_legit_no_training",
       R::Structural, vjp::batch_norm_legit_no_training, false},
      {"BatchNormWithUpdateBackward0", "_batch_norm_with_update", R::Structural,
       vjp::batch_norm_with_update, false},
      {"BatchNormNoUpdateBackward0", "_batch_norm_no_update", R::Structural,
       vjp::batch_norm_no_update, false},
      {"AddBackward0", "add", R::Structural, vjp::add, false},
      {"SubBackward0", "sub", R::Structural, vjp::sub, false},
      {"CatBackward0", "cat", R::Structural, vjp::cat, false},
      // Lookups by index: a neuron when the indices are data (graph.cpp).
      {"EmbeddingBackward0", "embedding", R::Lookup, nullptr, false, -1, nullptr, nullptr,
       vjp::embedding_indices},
      {"EmbeddingBagBackward0", "embedding_bag", R::Lookup, nullptr, false, -1, nullptr, nullptr,
       vjp::embedding_bag_indices},
      {"IndexSelectBackward0", "index_select", R::Lookup, nullptr, false, -1, nullptr, nullptr,
       vjp::index_select_indices},
      {"IndexBackward0", "indexing (tensor[indices])", R::Lookup, nullptr, false, -1, nullptr,
       nullptr, vjp::index_indices},
      {"GatherBackward0", "gather", R::Lookup, nullptr, false, -1, nullptr, nullptr,
       vjp::gather_indices},
      {"TakeBackward0", "take", R::Lookup, nullptr, false, -1, nullptr, nullptr, vjp::take_indices},
      // Specialised elementwise activations.
      {"ReluBackward0", "relu", R::Elementwise, vjp::relu, true, -1, nullptr, vjp::relu_derivative},
      {"LeakyReluBackward0", "leaky_relu", R::Elementwise, vjp::leaky_relu, true, -1, nullptr,
       vjp::leaky_relu_derivative},
      {"TanhBackward0", "tanh", R::Elementwise, vjp::tanh, true, -1, nullptr, vjp::tanh_derivative},
      {"SigmoidBackward0", "sigmoid", R::Elementwise, vjp::sigmoid, true, -1, nullptr,
       vjp::sigmoid_derivative},
      {"GeluBackward0", "gelu", R::Elementwise, vjp::gelu, true, -1, nullptr, vjp::gelu_derivative},
      {"SiluBackward0", "silu", R::Elementwise, vjp::silu, true, -1, nullptr, vjp::silu_derivative},
      {"HardtanhBackward0", "hardtanh / relu6", R::Elementwise, vjp::hardtanh, true, -1, nullptr,
       vjp::hardtanh_derivative},
      {"EluBackward0", "elu", R::Elementwise, vjp::elu, true, -1, nullptr, vjp::elu_derivative},
      // Specialised views.
      {"ViewBackward0", "view / flatten", R::View, vjp::view, false},
      {"UnsafeViewBackward0", "reshape (copying)", R::View, vjp::view, false},
      {"ReshapeAliasBackward0", "reshape", R::View, vjp::view, false},
      // Elementwise and view ops that join a layer but use the generic node.
      {"SoftplusBackward0", "softplus", R::Elementwise, nullptr, true},
      {"MishBackward0", "mish", R::Elementwise, nullptr, true},
      {"HardswishBackward0", "hardswish", R::Elementwise, nullptr, true},
      {"HardsigmoidBackward0", "hardsigmoid", R::Elementwise, nullptr, true},
      {"LogSigmoidForwardBackward0", "logsigmoid", R::Elementwise, nullptr, true},
      {"NativeDropoutBackward0", "dropout", R::Elementwise, nullptr, false},
      {"MulBackward0", "mul (by a mask or constant tensor)", R::Elementwise, nullptr, false},
      {"MulBackward1", "mul (by a scalar)", R::Elementwise, nullptr, false},
      {"DivBackward0", "div (by a constant tensor)", R::Elementwise, nullptr, false},
      {"DivBackward1", "div (by a scalar)", R::Elementwise, nullptr, false},
      {"NegBackward0", "neg", R::Elementwise, nullptr, false},
      {"CloneBackward0", "clone", R::Elementwise, nullptr, false},
      {"ToCopyBackward0", "to (dtype cast)", R::Elementwise, nullptr, false},
      {"AliasBackward0", "alias", R::View, nullptr, false},
      {"SqueezeBackward0", "squeeze", R::View, nullptr, false},
      {"SqueezeBackward1", "squeeze(dim)", R::View, nullptr, false},
      {"SqueezeBackward2", "squeeze(dims)", R::View, nullptr, false},
      {"UnsqueezeBackward0", "unsqueeze", R::View, nullptr, false},
      {"PermuteBackward0", "permute", R::View, nullptr, false},
      {"TransposeBackward0", "transpose", R::View, nullptr, false},
      {"TBackward0", "t", R::View, nullptr, false},
  };
}

} // namespace

const std::vector<OpInfo>& op_table() {
  static const std::vector<OpInfo> table = build_table();
  return table;
}

std::vector<std::string> supported_op_rows() {
  std::vector<std::string> rows;
  for (const OpInfo& info : op_table()) {
    const char* role = info.role == OpRole::Structural    ? "structural"
                       : info.role == OpRole::Elementwise ? "elementwise"
                       : info.role == OpRole::Lookup      ? "lookup"
                                                          : "view";
    rows.push_back(std::string(info.node_name) + "|" + info.op + "|" + role + "|" +
                   (info.vjp ? "specialised" : "generic") + "|" +
                   (info.is_activation ? "activation" : "") + "|" +
                   (info.psi_vjp ? "backward-weight" : "") + "|" +
                   (info.fused_derivative ? "fused" : ""));
  }
  return rows;
}

const OpInfo* find_op(const std::string& node_name) {
  static const std::unordered_map<std::string, const OpInfo*> index = [] {
    std::unordered_map<std::string, const OpInfo*> m;
    for (const auto& info : op_table()) m.emplace(info.node_name, &info);
    return m;
  }();
  auto it = index.find(node_name);
  return it == index.end() ? nullptr : it->second;
}

} // namespace torch_ar

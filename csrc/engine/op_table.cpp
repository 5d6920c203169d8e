#include "engine/op_table.h"

#include <unordered_map>

namespace torch_ar {

namespace {

using R = OpRole;

std::vector<OpInfo> build_table() {
  return {
      // Specialised structural ops.
      {.node_name = "AddmmBackward0",
       .op = "linear (addmm)",
       .role = R::Structural,
       .vjp = vjp::addmm,
       .weight_edge = 2,
       .psi_vjp = vjp::addmm_psi},
      {.node_name = "MmBackward0",
       .op = "linear without bias (mm)",
       .role = R::Structural,
       .vjp = vjp::mm,
       .weight_edge = 1,
       .psi_vjp = vjp::mm_psi},
      {.node_name = "ConvolutionBackward0",
       .op = "conv1d/conv2d/conv3d",
       .role = R::Structural,
       .vjp = vjp::convolution,
       .weight_edge = 1,
       .psi_vjp = vjp::convolution_psi},
      {.node_name = "MaxPool2DWithIndicesBackward0",
       .op = "max_pool2d (and max_pool1d)",
       .role = R::Structural,
       .vjp = vjp::max_pool2d},
      {.node_name = "AvgPool2DBackward0",
       .op = "avg_pool2d",
       .role = R::Structural,
       .vjp = vjp::avg_pool2d},
      {.node_name = "AdaptiveAvgPool2DBackward0",
       .op = "adaptive_avg_pool2d",
       .role = R::Structural,
       .vjp = vjp::adaptive_avg_pool2d},
      {.node_name = "NativeBatchNormBackward0",
       .op = "batch_norm (train and eval)",
       .role = R::Structural,
       .vjp = vjp::batch_norm},
      // What batch_norm records elsewhere: cuDNN on CUDA (float32/float64,
      // float16 with float32 weights), MIOpen on ROCm, the functional forms.
      {.node_name = "CudnnBatchNormBackward0",
       .op = "batch_norm on CUDA (cuDNN)",
       .role = R::Structural,
       .vjp = vjp::cudnn_batch_norm},
      {.node_name = "MiopenBatchNormBackward0",
       .op = "batch_norm on ROCm (MIOpen)",
       .role = R::Structural,
       .vjp = vjp::miopen_batch_norm},
      {.node_name = "NativeBatchNormLegitBackward0",
       .op = "_native_batch_norm_legit",
       .role = R::Structural,
       .vjp = vjp::batch_norm_legit},
      {.node_name = "NativeBatchNormLegitNoTrainingBackward0",
       .op = "_native_batch_norm_legit_no_training",
       .role = R::Structural,
       .vjp = vjp::batch_norm_legit_no_training},
      {.node_name = "BatchNormWithUpdateBackward0",
       .op = "_batch_norm_with_update",
       .role = R::Structural,
       .vjp = vjp::batch_norm_with_update},
      {.node_name = "BatchNormNoUpdateBackward0",
       .op = "_batch_norm_no_update",
       .role = R::Structural,
       .vjp = vjp::batch_norm_no_update},
      {.node_name = "AddBackward0", .op = "add", .role = R::Structural, .vjp = vjp::add},
      {.node_name = "SubBackward0", .op = "sub", .role = R::Structural, .vjp = vjp::sub},
      {.node_name = "CatBackward0", .op = "cat", .role = R::Structural, .vjp = vjp::cat},
      // Lookups by index: a neuron when the indices are data (graph.cpp).
      {.node_name = "EmbeddingBackward0",
       .op = "embedding",
       .role = R::Lookup,
       .index_tensors = vjp::embedding_indices},
      {.node_name = "EmbeddingBagBackward0",
       .op = "embedding_bag",
       .role = R::Lookup,
       .index_tensors = vjp::embedding_bag_indices},
      {.node_name = "IndexSelectBackward0",
       .op = "index_select",
       .role = R::Lookup,
       .index_tensors = vjp::index_select_indices},
      {.node_name = "IndexBackward0",
       .op = "indexing (tensor[indices])",
       .role = R::Lookup,
       .index_tensors = vjp::index_indices},
      {.node_name = "GatherBackward0",
       .op = "gather",
       .role = R::Lookup,
       .index_tensors = vjp::gather_indices},
      {.node_name = "TakeBackward0",
       .op = "take",
       .role = R::Lookup,
       .index_tensors = vjp::take_indices},
      // Specialised elementwise activations.
      {.node_name = "ReluBackward0",
       .op = "relu",
       .role = R::Elementwise,
       .vjp = vjp::relu,
       .is_activation = true,
       .fused_derivative = vjp::relu_derivative},
      {.node_name = "LeakyReluBackward0",
       .op = "leaky_relu",
       .role = R::Elementwise,
       .vjp = vjp::leaky_relu,
       .is_activation = true,
       .fused_derivative = vjp::leaky_relu_derivative},
      {.node_name = "TanhBackward0",
       .op = "tanh",
       .role = R::Elementwise,
       .vjp = vjp::tanh,
       .is_activation = true,
       .fused_derivative = vjp::tanh_derivative},
      {.node_name = "SigmoidBackward0",
       .op = "sigmoid",
       .role = R::Elementwise,
       .vjp = vjp::sigmoid,
       .is_activation = true,
       .fused_derivative = vjp::sigmoid_derivative},
      {.node_name = "GeluBackward0",
       .op = "gelu",
       .role = R::Elementwise,
       .vjp = vjp::gelu,
       .is_activation = true,
       .fused_derivative = vjp::gelu_derivative},
      {.node_name = "SiluBackward0",
       .op = "silu",
       .role = R::Elementwise,
       .vjp = vjp::silu,
       .is_activation = true,
       .fused_derivative = vjp::silu_derivative},
      {.node_name = "HardtanhBackward0",
       .op = "hardtanh / relu6",
       .role = R::Elementwise,
       .vjp = vjp::hardtanh,
       .is_activation = true,
       .fused_derivative = vjp::hardtanh_derivative},
      {.node_name = "EluBackward0",
       .op = "elu",
       .role = R::Elementwise,
       .vjp = vjp::elu,
       .is_activation = true,
       .fused_derivative = vjp::elu_derivative},
      // Specialised views.
      {.node_name = "ViewBackward0", .op = "view / flatten", .role = R::View, .vjp = vjp::view},
      {.node_name = "UnsafeViewBackward0",
       .op = "reshape (copying)",
       .role = R::View,
       .vjp = vjp::view},
      {.node_name = "ReshapeAliasBackward0", .op = "reshape", .role = R::View, .vjp = vjp::view},
      // Elementwise and view ops that join a layer but use the generic node.
      {.node_name = "SoftplusBackward0",
       .op = "softplus",
       .role = R::Elementwise,
       .is_activation = true},
      {.node_name = "MishBackward0", .op = "mish", .role = R::Elementwise, .is_activation = true},
      {.node_name = "HardswishBackward0",
       .op = "hardswish",
       .role = R::Elementwise,
       .is_activation = true},
      {.node_name = "HardsigmoidBackward0",
       .op = "hardsigmoid",
       .role = R::Elementwise,
       .is_activation = true},
      {.node_name = "LogSigmoidForwardBackward0",
       .op = "logsigmoid",
       .role = R::Elementwise,
       .is_activation = true},
      {.node_name = "NativeDropoutBackward0", .op = "dropout", .role = R::Elementwise},
      {.node_name = "MulBackward0",
       .op = "mul (by a mask or constant tensor)",
       .role = R::Elementwise},
      {.node_name = "MulBackward1", .op = "mul (by a scalar)", .role = R::Elementwise},
      {.node_name = "DivBackward0", .op = "div (by a constant tensor)", .role = R::Elementwise},
      {.node_name = "DivBackward1", .op = "div (by a scalar)", .role = R::Elementwise},
      {.node_name = "NegBackward0", .op = "neg", .role = R::Elementwise},
      {.node_name = "CloneBackward0", .op = "clone", .role = R::Elementwise},
      {.node_name = "ToCopyBackward0", .op = "to (dtype cast)", .role = R::Elementwise},
      {.node_name = "AliasBackward0", .op = "alias", .role = R::View},
      {.node_name = "SqueezeBackward0", .op = "squeeze", .role = R::View},
      {.node_name = "SqueezeBackward1", .op = "squeeze(dim)", .role = R::View},
      {.node_name = "SqueezeBackward2", .op = "squeeze(dims)", .role = R::View},
      {.node_name = "UnsqueezeBackward0", .op = "unsqueeze", .role = R::View},
      {.node_name = "PermuteBackward0", .op = "permute", .role = R::View},
      {.node_name = "TransposeBackward0", .op = "transpose", .role = R::View},
      {.node_name = "TBackward0", .op = "t", .role = R::View},
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

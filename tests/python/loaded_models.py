"""Models as users load them: Hugging Face transformers built from tiny
configs and timm architectures at small inputs, no download. Shared by
tests/python/test_loaded_models.py and benchmarks/supported_models.py (the
Supported models table of the docs).

Each entry builds a float64 model in train mode with dropout off and a batch
for it; `loss_of(model, batch)` is a scalar whatever the model returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LoadedModel:
    name: str
    family: str  # "transformers" or "timm"
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[Any, ...]]
    # The model computes part of its forward in float32 whatever its dtype
    # (Llama's RMSNorm, ViT's eager softmax cast to float32): those states relax, and their
    # gradients agree, to float32's rounding.
    float32_inside: bool = False
    # Weights standardised inside the forward (timm's ScaledStdConv2d): the op
    # reads a weight no attribute holds, so "transpose" starts psi at the raw
    # parameter and psi = W cannot be set from outside.
    weights_computed_in_forward: bool = False

    def tolerance(self, float64: float) -> float:
        return max(float64, FLOAT32_INSIDE) if self.float32_inside else float64

    def make(self, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, tuple[Any, ...]]:
        torch.manual_seed(0)
        model = self.build().to(dtype).train()
        torch.manual_seed(1)
        batch = tuple(b.to(dtype) if b.is_floating_point() else b for b in self.batch())
        return model, batch


def loss_of(model: nn.Module, batch: tuple[Any, ...]) -> torch.Tensor:
    out = model(*batch)
    if hasattr(out, "logits"):
        out = out.logits
    elif hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.double().pow(2).mean()


def _tokens(vocab: int = 64, length: int = 8) -> Callable[[], tuple[torch.Tensor]]:
    return lambda: (torch.randint(0, vocab, (2, length)),)


def _images(size: int = 32) -> Callable[[], tuple[torch.Tensor]]:
    return lambda: (torch.randn(2, 3, size, size),)


def _transformers_models() -> list[LoadedModel]:
    import transformers as hf

    tiny = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

    def gpt2(attn: str) -> nn.Module:
        config = hf.GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            vocab_size=64,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation=attn,
        )
        return hf.GPT2LMHeadModel(config)

    def bert() -> nn.Module:
        config = hf.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            attn_implementation="eager",
            **tiny,
        )
        return hf.BertForSequenceClassification(config)

    def llama() -> nn.Module:
        config = hf.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        return hf.LlamaForCausalLM(config)

    def vit() -> nn.Module:
        config = hf.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=5,
            attn_implementation="eager",
            **tiny,
        )
        return hf.ViTForImageClassification(config)

    return [
        LoadedModel("gpt2-eager", "transformers", lambda: gpt2("eager"), _tokens()),
        LoadedModel("gpt2-sdpa", "transformers", lambda: gpt2("sdpa"), _tokens()),
        LoadedModel("bert", "transformers", bert, _tokens()),
        LoadedModel("llama", "transformers", llama, _tokens(), float32_inside=True),
        LoadedModel("vit", "transformers", vit, _images(16), float32_inside=True),
    ]


# timm architectures across families, each at a small input (name, kwargs, size).
TIMM = [
    ("resnet10t", {}, 32),
    ("resnet18d", {}, 32),
    ("tinynet_e", {}, 32),
    ("mobilenetv3_small_050", {}, 32),
    ("lcnet_050", {}, 32),
    ("ghostnet_050", {}, 32),
    ("convnext_atto", {}, 32),
    ("regnetx_002", {}, 32),
    ("regnety_002", {}, 32),
    ("nf_regnet_b0", {}, 32),
    ("repvgg_a0", {}, 32),
    ("dla34", {}, 32),
    ("edgenext_xx_small", {}, 64),
    ("mobilevit_xxs", {}, 64),
    ("poolformer_s12", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32),
    ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32),
    ("mixer_s16_224", {"img_size": 32}, 32),
    (
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "window_size": 2, "depths": (1, 1, 1, 1)},
        32,
    ),
    ("pvt_v2_b0", {}, 32),
]


# The timm architectures whose convolutions standardise their weights in the forward.
STD_CONV = ("nf_regnet_b0",)


def _timm_models() -> list[LoadedModel]:
    import timm

    def builder(name: str, kwargs: dict) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = timm.create_model(
                name, pretrained=False, num_classes=5, drop_rate=0.0, **kwargs
            )
            # Some heads start at zero (Mixer's), which would make every other
            # gradient zero: a small random head keeps the checks meaningful.
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if isinstance(module, nn.Linear) and not weight.detach().any():
                    nn.init.trunc_normal_(weight, std=0.02)
            return model

        return build

    return [
        LoadedModel(
            n, "timm", builder(n, kw), _images(size), weights_computed_in_forward=n in STD_CONV
        )
        for n, kw, size in TIMM
    ]


def loaded_models(family: str) -> list[LoadedModel]:
    """The models of `family` ("transformers" or "timm"); empty when the
    library is not installed."""
    try:
        return _transformers_models() if family == "transformers" else _timm_models()
    except ImportError:
        return []


# ------------------------------------------------------------------ measuring

EXACT = 1e-10  # float64 relative error of the exact evaluations
AGREE = 1e-8  # closed form against literal steps from zero
FLOAT32_INSIDE = 1e-5  # either, for a model with float32 states
# From the forward values, 12 steps leave a transient up to 1e8 times the
# gradients on the deepest models (D up to 106): the two evaluations agree to
# its rounding, measured against the whole gradient.
AGREE_FORWARD = 1e-6
PSI_VARIANTS = ("feedback_alignment", "sign_symmetry", "combined", "direct_feedback_alignment")
# Models that fold the samples into windows or patches before a linear op:
# direct feedback cannot tell which rows belong to which sample and refuses
# (docs/variants.md), with this message.
DFA_REFUSED = ("edgenext_xx_small", "mobilevit_xxs", "swin_tiny_patch4_window7_224")
DFA_REFUSAL = "direct feedback alignment cannot project the output error"
RELAXED = {"eta": 0.5, "steps": 12}
# Where a parameter's gradient is zero in exact arithmetic (a bias before a
# train-mode norm, a key bias before a softmax) its error is measured against
# this share of the whole gradient's norm.
ZERO_FLOOR = 1e-3


def _grads(model: nn.Module, wrapped: nn.Module, batch, named) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss_of(wrapped, batch), [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


def worst_error(got: dict, expected: dict) -> tuple[float, str]:
    """The largest per-parameter relative error and its parameter, measured
    against the whole gradient's norm where a parameter's own gradient is
    zero in exact arithmetic (a bias before a train-mode norm)."""
    if got.keys() != expected.keys():
        return float("inf"), ", ".join(sorted(got.keys() ^ expected.keys())[:3])
    total = float(torch.cat([g.flatten() for g in expected.values()]).norm())
    errors = {
        n: float((got[n] - expected[n]).norm())
        / max(float(expected[n].norm()), ZERO_FLOOR * total, 1e-300)
        for n in expected
    }
    name = max(errors, key=errors.get)
    return errors[name], name


def whole_error(got: dict, expected: dict) -> float:
    """|got - expected| / |expected| over all parameters at once."""
    if got.keys() != expected.keys():
        return float("inf")
    diff = torch.cat([(got[n] - expected[n]).flatten() for n in expected])
    return float(diff.norm() / torch.cat([g.flatten() for g in expected.values()]).norm())


def measure(case: LoadedModel) -> dict[str, Any]:
    """Depth and states at block and layer granularity, and each check's
    outcome: exact sweep against autograd, closed form against literal steps
    at eta 0.5, learned psi at "transpose" against autograd, and which psi
    variants give finite gradients to every parameter autograd reaches."""
    import torch_ar

    model, batch = case.make()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expected = _grads(model, model, batch, named)

    def ar(**kwargs):
        torch.manual_seed(2)
        wrapped = torch_ar.ARBackward(model, **kwargs)
        return _grads(model, wrapped, batch, named), wrapped

    row: dict[str, Any] = {"name": case.name, "family": case.family}
    for granularity in ("block", "layer"):
        got, wrapped = ar(granularity=granularity)
        stats = wrapped.last_stats
        row[f"depth_{granularity}"] = stats.depth
        row[f"states_{granularity}"] = stats.relaxing_states
        row[f"exact_{granularity}"] = worst_error(got, expected)
        row[f"evaluation_{granularity}"] = stats.evaluation
    closed, _ = ar(evaluation="closed_form", init="zero", **RELAXED)
    literal, _ = ar(evaluation="literal", init="zero", **RELAXED)
    row["closed_vs_literal"] = worst_error(closed, literal)
    closed, _ = ar(evaluation="closed_form", **RELAXED)
    literal, _ = ar(evaluation="literal", **RELAXED)
    row["closed_vs_literal_forward"] = whole_error(closed, literal)
    learned, wrapped = ar(variant="learned_backward_weights", backward_weight_init="transpose")
    row["backward_weights"] = len(wrapped.backward_weights())
    row["learned_transpose"] = worst_error(learned, expected)
    row["variants_finite"], row["variants_refused"] = [], []
    for variant in PSI_VARIANTS:
        try:
            grads, _ = ar(variant=variant)
        except RuntimeError as err:
            if variant != "direct_feedback_alignment" or DFA_REFUSAL not in str(err):
                raise
            row["variants_refused"].append(variant)
            continue
        if grads.keys() == expected.keys() and all(torch.isfinite(g).all() for g in grads.values()):
            row["variants_finite"].append(variant)
    return row

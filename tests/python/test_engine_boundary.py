"""The Python/C++ boundary: every option defined once per language and mapped
by name, the engine's rules asked of the engine, typed errors, named stats."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import torch_ar
from torch_ar import engine
from torch_ar.config import OPTION_CHOICES, RelaxConfig, option_help
from torch_ar.experiments import cli, training
from torch_ar.variants import VARIANTS

# RelaxConfig's options that Python alone acts on (psi is made in Python;
# nonfinite becomes raise_on_nonfinite per forward; the variant crosses as
# what it changes).
PYTHON_ONLY = {
    "variant",
    "variant_spec",
    "backward_weight_init",
    "backward_weight_std",
    "backward_weight_decay",
    "nonfinite",
}


def test_every_engine_option_comes_from_relaxconfig_by_name():
    fields = {f.name for f in dataclasses.fields(RelaxConfig)}
    variant_fields = set(VARIANTS["exact"].engine_options())
    engine_names = set(engine.ENGINE_OPTION_NAMES)
    assert engine_names == (fields - PYTHON_ONLY) | variant_fields | {"raise_on_nonfinite"}
    options = engine.engine_options(RelaxConfig(eta=0.2, steps=7, granularity="block"), True)
    assert set(options) == engine_names
    assert options["eta"] == 0.2 and options["steps"] == 7 and options["granularity"] == "block"
    engine.EngineConfig(**options)  # the engine reads every one of them


def test_the_engine_refuses_an_option_it_does_not_know():
    with pytest.raises(ValueError, match="unknown option 'etaa'"):
        engine.EngineConfig(etaa=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"trace": True},
        {"eta": 0.1, "steps": 100},
        {"eta": 0.1, "steps": 100, "init": "zero"},
        {"steps": 5},
        {"tol": 1e-6},
        {"variant": "feedback_alignment"},
        {"variant": "no_nonlinear_derivative"},
    ],
)
def test_the_forward_asks_the_engine_what_the_settings_need(kwargs):
    """The rules are the engine's; these are what they say (the exact sweep of
    the exact rule alone evaluates each layer once and needs no forward value)."""
    cfg = RelaxConfig(**kwargs)
    e = engine.EngineConfig(**engine.engine_options(cfg, True))
    exact_sweep = (
        cfg.eta == 1
        and cfg.variant == "exact"
        and cfg.steps is None
        and cfg.tol is None
        and not cfg.trace
    )
    literal = cfg.eta != 1 or cfg.trace or cfg.tol is not None or cfg.steps is not None
    assert e.may_evaluate_layers_repeatedly == (not exact_sweep)
    assert e.needs_forward_values == (cfg.init == "forward" and literal)


def test_divergence_is_a_typed_error_naming_node_and_step():
    class NaNGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            # The NaN comes from the second block's backward into the first's state.
            return self.c(NaNGrad.apply(torch.tanh(self.b(torch.tanh(self.a(x))))))

    for kwargs in ({}, {"eta": 0.5, "steps": 10}, {"eta": 0.5, "steps": 10, "trace": True}):
        ar = torch_ar.ARBackward(Net(), **kwargs)
        with pytest.raises(torch_ar.RelaxationDivergedError) as info:
            ar(torch.randn(3, 4)).sum().backward()
        err = info.value
        assert isinstance(err, RuntimeError)
        assert isinstance(err.step, int) and err.step >= 0
        assert err.node and err.node in str(err), (err.node, str(err))
        assert f"step {err.step}" in str(err) or f"stage {err.step}" in str(err)


def test_stats_come_back_by_name():
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    for kwargs, evaluation in (({}, "exact_sweep"), ({"eta": 0.5, "steps": 3}, "closed_form")):
        ar = torch_ar.ARBackward(net, **kwargs)
        ar(torch.randn(5, 4)).sum().backward()
        s = ar.last_stats
        assert (s.evaluation, s.depth, s.relaxing_states) == (evaluation, 1, 1)
        assert s.steps == kwargs.get("steps", 1)
        assert s.state_names == ["0:AddmmBackward0", "1:AddmmBackward0+TanhBackward0"]
        assert set(s.residuals) == set(s.state_names)


def test_train_flags_are_made_from_relaxconfig():
    parser = cli.build_parser()
    train = next(
        a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train")
    )
    flags = {a.dest: a for a in train._actions}
    assert training.AR_OPTIONS  # TrainConfig's fields of RelaxConfig's names
    for name in training.AR_OPTIONS:
        action = flags[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert action.default is None
        assert option_help(name).split()[0] in action.help
        if name in OPTION_CHOICES:
            assert tuple(action.choices) == OPTION_CHOICES[name]


def test_one_crossing_into_cpp_each_way_per_training_step():
    """benchmarks/crossings.py's count: the forward captures once, the backward
    runs once, whatever the setting."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import crossings

    for settings in crossings.SETTINGS.values():
        r = crossings.count_step(settings)
        assert r["forward_calls"] == {"_C.Relaxation.capture": 1}, r
        assert r["backward_calls"] == {"_C.Relaxation.backward": 1}, r


def test_a_graph_that_cannot_be_relaxed_is_a_typed_error_naming_its_node():
    outside = nn.Parameter(torch.randn(6, 2, dtype=torch.float64))

    class UsesOutsideTensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6).double()

        def forward(self, x):
            return torch.tanh(self.lin(x)) @ outside

    ar = torch_ar.ARBackward(UsesOutsideTensor())
    with pytest.raises(torch_ar.UnsupportedGraphError) as info:
        ar(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    assert isinstance(info.value, RuntimeError)
    assert "AccumulateGrad" in info.value.node
    assert "Double [6, 2] on cpu" in str(info.value), str(info.value)
    assert "Register it as a parameter or pass it as an input" in str(info.value)

"""ARBackward: the wrapper that makes loss.backward() compute AR gradients."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from torch_ar import backward_weights as psi_lib
from torch_ar.call_site import warn_at_call_site
from torch_ar.capture import ForwardValueRecorder, make_input_leaf
from torch_ar.checkpointing import inline_checkpoints
from torch_ar.config import RelaxConfig
from torch_ar.engine import EngineConfig, Relaxation, engine_options
from torch_ar.errors import NonFiniteValueError, RelaxationDivergedError
from torch_ar.stats import RelaxationStats, stats_from_engine

__all__ = ["ARBackward", "NonFiniteValueError", "RelaxationDivergedError", "RelaxationStats"]

# Counts parameter and submodule registrations in any module: a wrapper
# re-lists its module's parameters only when this moved. (Replacing a
# parameter without registering it, through module._parameters, is not
# seen: the capture then refuses the unknown tensor with a clear error.)
_registrations = [0]


def _count_registration(*_: Any) -> None:
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


# Why the wrapper itself is never compiled (one message for torch.compile(ar)
# and ar.compile(); docs/limitations.md says the same).
_COMPILE_REFUSAL = (
    "ARBackward cannot be compiled with torch.compile: the relaxation reads the eager "
    "autograd graph of the wrapped forward, which compiled code replaces with one opaque "
    "node, so compiling the wrapper would compile nothing. Call the wrapper uncompiled; "
    "inside a compiled function or a compiled module that contains it, it runs as an eager "
    "region (a graph break) and the code around it is compiled."
)


def _refuse_compiling_a_wrapper(module: nn.Module, name: str, submodule: Any) -> None:
    # torch.compile(ar) makes an OptimizedModule whose _orig_mod is the wrapper:
    # refuse there, before dynamo has traced anything.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if (
        eval_frame is not None
        and isinstance(submodule, ARBackward)
        and isinstance(module, eval_frame.OptimizedModule)
    ):
        raise TypeError(_COMPILE_REFUSAL)


torch.nn.modules.module.register_module_module_registration_hook(_refuse_compiling_a_wrapper)


def _is_compiled(module: nn.Module) -> bool:
    for m in module.modules():
        if hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None:
            return True
    return False


def _describe(t: torch.Tensor) -> str:
    what = "NaN" if torch.isnan(t).any() else "infinite"
    return f"{what} values, shape {tuple(t.shape)}, {t.dtype} on {t.device}"


def _nonfinite_from_outside(
    run: _ForwardRun, grads: tuple, psis: list[torch.Tensor | None]
) -> list[tuple[str, str]]:
    """(node, what it is) of the tensors that bring NaN/Inf into the
    relaxation from outside it, nodes named as the engine names them ("input
    0", "output 0", a parameter's name); psis: the backward weights the
    relaxation used; asked only after the engine raised."""
    found = []

    def check(node: str, label: str, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            found.append((node, f"{label} ({_describe(t.detach())})"))

    for i, t in enumerate(run.inputs):
        check(f"input {i}", f"input {i}", t)
    for name, p in zip(run.param_names, run.params):
        check(name, f"parameter '{name}'", p)
    for name, psi in zip(run.param_names, psis):
        check(name, f"backward weight (psi) of '{name}'", psi)
    for k, pos in enumerate(run.tensor_positions):
        check(f"output {k}", f"output {k} of the module's forward", run.out_flat[pos])
    for slot in run.output_slots:
        grad = grads[slot] if slot < len(grads) else None
        check(f"output {slot}", f"the loss gradient of output {slot}", grad)
    return found


class _ForwardRun:
    """Everything one forward leaves for its backward (the private inner graph)."""

    def __init__(self, owner: ARBackward, args: tuple, kwargs: dict) -> None:
        self.owner = owner
        self.config = owner.relax_config
        self.flat, self.spec = _flatten_inputs(args, kwargs)
        self.input_positions = [
            i
            for i, v in enumerate(self.flat)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        ]
        # Integer inputs (token ids): a lookup by them makes a neuron.
        self.data_indices = [
            v
            for v in self.flat
            if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex()
        ]
        self.inlined_checkpoints = 0
        for i, v in enumerate(self.flat):
            if isinstance(v, torch.Tensor):
                _check_supported_tensor(v, f"input {i}")
        # A frozen weight with a psi still carries the relaxation through its
        # op: it joins the forward as a leaf that gets no gradient.
        named = [
            (n, p)
            for n, p in owner._named_parameters()
            if p.requires_grad or n in owner._psi_layout
        ]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.frozen = [p for p in self.params if not p.requires_grad]
        # Backward weights, one per parameter that has one (else None).
        # Direct feedback's psi are fixed and may be made only at the first
        # backward: the backward reads them, they are no inputs of the forward.
        self.psis: list[torch.Tensor | None] = (
            [owner._backward_weight_of(n) for n in self.param_names]
            if owner._psi_layout and not self.config.variant_spec.direct_feedback
            else [None] * len(self.params)
        )
        self.psi_tensors = [p for p in self.psis if p is not None]
        self.input_leaves: list[torch.Tensor] = []
        self.output_slots: list[int] = []  # the differentiable outputs' index among tensors
        self.out_flat: list[Any] = []
        self.out_spec = None
        self.tensor_positions: list[int] = []
        # Under autocast a GradScaler may be in use: it expects inf/NaN
        # gradients (to skip the step), not an exception.
        nonfinite = owner.relax_config.nonfinite
        raise_on_nonfinite = nonfinite == "raise" or (
            nonfinite == "auto" and not any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
        )
        self.engine_config = owner._engine_configs[raise_on_nonfinite]
        # The engine object of this forward: captured and planned when the
        # forward ends, it runs the relaxation in the backward.
        self.relaxation: Relaxation | None = None

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.flat[i] for i in self.input_positions]

    def run_module(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        flat = list(self.flat)
        self.input_leaves = [make_input_leaf(t) for t in inputs]
        for pos, leaf in zip(self.input_positions, self.input_leaves):
            flat[pos] = leaf
        args, kwargs = (tuple(flat), {}) if self.spec is None else tree_unflatten(flat, self.spec)
        repeats, needs_forward_values = self.owner._forward_rules
        forward_values: list[torch.Tensor] = []
        with torch.enable_grad(), inline_checkpoints(repeats) as inlined:
            if needs_forward_values:
                recorder = ForwardValueRecorder()
                with recorder:
                    out = self.owner.module(*args, **kwargs)
                forward_values = recorder.values
            else:
                out = self.owner.module(*args, **kwargs)
        self.inlined_checkpoints = inlined[0]
        if isinstance(out, torch.Tensor):  # the common case, without pytree's cost
            self.out_flat, self.out_spec = [out], None
        else:
            self.out_flat, self.out_spec = tree_flatten(out)
        self.tensor_positions = [
            i for i, v in enumerate(self.out_flat) if isinstance(v, torch.Tensor)
        ]
        candidates = []
        for k, pos in enumerate(self.tensor_positions):
            t = self.out_flat[pos]
            _check_supported_tensor(t, f"output {k}")
            if t.requires_grad:
                candidates.append(k)
        if candidates:
            # As in autograd, an output is differentiable only when it depends
            # on a parameter or on an input that requires grad (the private
            # input leaves always require grad, so the engine looks at the
            # graph); the graph behind those is captured and planned here, once.
            self.relaxation, reach = Relaxation.capture(
                self.engine_config,
                [self.out_flat[self.tensor_positions[k]] for k in candidates],
                self.params + self.input_leaves,
                [False] * len(self.params) + [True] * len(self.input_leaves),
                self.expected_needs(inputs),
                forward_values,
                self.data_indices,
            )
            self.output_slots = [k for k, ok in zip(candidates, reach) if ok]
        return [self.out_flat[pos].detach() for pos in self.tensor_positions]

    def expected_needs(self, inputs: tuple[torch.Tensor, ...]) -> list[bool]:
        """Which leaves the backward will want gradients of, as far as the
        forward can tell (autograd's needs_input_grad then confirms it): a
        frozen weight's only when its learned psi moves by it."""
        frozen = {id(p) for p in self.frozen}
        return [
            id(p) not in frozen or (psi is not None and psi.requires_grad)
            for p, psi in zip(self.params, self.psis)
        ] + [t.requires_grad for t in inputs]

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        flat = list(self.out_flat)
        for pos, t in zip(self.tensor_positions, tensors):
            flat[pos] = t
        return flat[0] if self.out_spec is None else tree_unflatten(flat, self.out_spec)

    def release(self) -> None:
        if self.relaxation is not None:
            self.relaxation.release()
        self.input_leaves = []


@contextlib.contextmanager
def _requiring_grad(frozen: list[torch.Tensor]):
    """Frozen weights require grad for the inner forward only, so that the
    engine sees the ops that read them."""
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _flatten_inputs(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    """(flat list, spec) of the forward's arguments; spec None for plain tensor
    positional arguments (the common case, without pytree's cost)."""
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        return list(args), None
    return tree_flatten((args, kwargs))


def _check_supported_tensor(t: torch.Tensor, what: str) -> None:
    if t.is_complex():
        raise TypeError(
            f"ARBackward: {what} is complex ({t.dtype}); only real tensors are supported"
        )
    if t.layout != torch.strided:
        raise TypeError(
            f"ARBackward: {what} has layout {t.layout}; only dense (strided) tensors are supported"
        )


class _ARFunction(torch.autograd.Function):
    """One node in the outer graph; its backward is the relaxation."""

    @staticmethod
    def forward(ctx, run: _ForwardRun, *tensors: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.run = run
        with _requiring_grad(run.frozen):  # until the engine has captured the graph
            returned = run.run_module(tensors[len(run.params) + len(run.psi_tensors) :])
        differentiable = set(run.output_slots)
        ctx.mark_non_differentiable(*[t for k, t in enumerate(returned) if k not in differentiable])
        return tuple(returned)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        # Autograd runs a backward with grad mode on exactly when asked to
        # create a graph of it: refused here, not at the second differentiation.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ARBackward: double backward (create_graph=True) is not supported: the "
                "relaxation's gradients are not themselves differentiable. Call backward or "
                "torch.autograd.grad without create_graph; for a penalty on gradients, "
                "differentiate the unwrapped module with autograd."
            )
        run: _ForwardRun = ctx.run
        relaxation = run.relaxation
        n_params, n_psi = len(run.params), len(run.psi_tensors)
        needs_all = list(ctx.needs_input_grad[1:])
        needs_psi = needs_all[n_params : n_params + n_psi]
        needs = needs_all[:n_params] + needs_all[n_params + n_psi :]
        # psi's increment is W's (transposed), so W's gradient is needed for it.
        k = 0
        for i, psi in enumerate(run.psis):
            if psi is not None:
                needs[i] = needs[i] or needs_psi[k]
                k += 1
        if not any(needs):
            return (None, *([None] * len(needs_all)))
        cfg = run.config
        variant = cfg.variant_spec
        if variant.sign_feedback is not None:
            run.owner.refresh_sign_feedback()
        psis = run.psis
        if variant.direct_feedback:
            run.owner._direct_feedback_weights_for([grads[k] for k in run.output_slots])
            psis = [run.owner._backward_weight_of(n) for n in run.param_names]
        backward_weights = (
            [p.detach() if p is not None else None for p in psis] + [None] * len(run.input_leaves)
            if variant.uses_backward_weights
            else []
        )
        leaf_names = (
            [*run.param_names, *(f"input {i}" for i in range(len(run.input_leaves)))]
            if backward_weights
            else []
        )
        try:
            out = relaxation.backward(
                [grads[k] for k in run.output_slots], needs, backward_weights, leaf_names
            )
        except RuntimeError as err:
            if type(err).__name__ == "CheckpointError":
                raise RuntimeError(
                    "ARBackward: a checkpointed region inside the module can be unpacked only "
                    "once per backward, but the relaxation evaluates its layers several times. "
                    "Regions made with torch.utils.checkpoint.checkpoint run as plain code "
                    "inside ARBackward; this one came from another checkpoint implementation "
                    f"({err}). Use torch.utils.checkpoint.checkpoint, or relax with the exact "
                    "sweep (eta=1, exact variant, no steps/tol/trace)."
                ) from err
            if isinstance(err, RelaxationDivergedError):
                found = _nonfinite_from_outside(run, grads, psis)
                if found:
                    raise NonFiniteValueError(
                        "torch_ar: NaN or infinite values reached the relaxation from outside "
                        "it (the relaxation did not diverge): "
                        + "; ".join(text for _, text in found)
                        + ". The first named is where to look: the others may follow from it.",
                        [node for node, _ in found],
                    ) from err
            raise
        run.owner._record_stats(run)
        run.owner._warn_if_degenerate(relaxation)
        param_grads, input_grads = out[:n_params], out[n_params:]
        psi_grads = []
        decay = float(cfg.backward_weight_decay)
        for i, psi in enumerate(run.psis):
            if psi is None:
                continue
            w_grad = param_grads[i]
            grad = None
            if w_grad is not None and needs_psi[len(psi_grads)]:
                transposed = run.owner._psi_layout[run.param_names[i]] == "transposed"
                grad = psi_lib.backward_weight_gradient(w_grad, psi, transposed, decay)
            if w_grad is not None and decay:
                param_grads[i] = w_grad + decay * run.params[i].detach()
            if not needs_all[i]:
                param_grads[i] = None
            psi_grads.append(grad)
        run.owner._check_backward_weights_step(run)
        return (None, *param_grads, *psi_grads, *input_grads)


class ARBackward(nn.Module):
    """Wraps a module so that backward computes its gradients by Activation Relaxation.

    After the forward pass every layer output holds a state that relaxes, in
    parallel, towards the backprop adjoint; the parameter gradients are read
    off the equilibrium and reach `.grad` through autograd as usual. With the
    defaults (eta=1, steps=None) the gradients equal autograd's.

    ```python
    ar = torch_ar.ARBackward(net, eta=0.1, steps=100)
    loss = F.mse_loss(ar(x), y)
    loss.backward()  # net's .grad now holds AR gradients
    ar.last_stats.depth  # layers between the deepest state and the output
    ```

    The keyword options are `RelaxConfig`'s, documented there, and
    `backward_weight_params`: with a variant that uses backward weights, psi
    is made for the weights of nn.Linear, nn.Conv1d/2d/3d and Hugging Face
    Conv1D modules and for nn.MultiheadAttention's input projections (packed
    or separate q/k/v); name any other parameter that the model reads as the
    weight of `F.linear`, `addmm`/`mm`/`matmul` (2-D: psi has W^T's shape
    whichever way the op reads W) or `F.conv*` (psi of its shape) here to give
    it one too:

    ```python
    ar = torch_ar.ARBackward(
        net, variant="feedback_alignment", backward_weight_params=["head.weight_raw"]
    )
    ```

    `output_dim` (direct_feedback_alignment only): the size of the output's
    loss gradient per sample (the classes of a classifier), which each psi
    projects; psi is made here when it is given, else at the first backward
    from the loss gradient's shape (a state dict with psi loads either way).

    Calling it returns exactly what `module(*args, **kwargs)` returns
    (tensors, tuples, dicts, non-tensor values); under `torch.no_grad()` it is
    the plain module. `loss.backward()` and `torch.autograd.grad` both give AR
    gradients; inputs that require grad receive AR gradients too.
    """

    def __init__(
        self,
        module: nn.Module,
        eta: float = 1.0,
        steps: int | None = None,
        tol: float | None = None,
        init: str = "forward",
        schedule: str = "jacobi",
        granularity: str = "block",
        trace: bool = False,
        trace_cosine: bool = False,
        max_steps: int = 10_000,
        check_every: int = 10,
        variant: str = "exact",
        weight_update_derivative: bool = True,
        backward_weight_init: str = "normal",
        backward_weight_std: float = 0.05,
        backward_weight_decay: float = 0.0,
        nonfinite: str = "auto",
        fuse_activations: bool = True,
        cuda_graph: bool = False,
        evaluation: str = "auto",
        backward_weight_params: Sequence[str] = (),
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"ARBackward wraps an nn.Module, got {type(module).__name__}")
        if _is_compiled(module):
            raise TypeError(
                "ARBackward: the module (or a submodule) is compiled with torch.compile; "
                "compiled regions are one opaque backward node, so activation relaxation "
                "over them is meaningless. Wrap the uncompiled module instead."
            )
        self.module = module
        # Not `config`: that is what Hugging Face's Trainer and many model
        # tools read (and write) as the wrapped model's own configuration.
        self.relax_config = RelaxConfig(
            eta=eta,
            steps=steps,
            tol=tol,
            init=init,
            schedule=schedule,
            granularity=granularity,
            trace=trace,
            trace_cosine=trace_cosine,
            max_steps=max_steps,
            check_every=check_every,
            variant=variant,
            weight_update_derivative=weight_update_derivative,
            backward_weight_init=backward_weight_init,
            backward_weight_std=backward_weight_std,
            backward_weight_decay=backward_weight_decay,
            nonfinite=nonfinite,
            fuse_activations=fuse_activations,
            cuda_graph=cuda_graph,
            evaluation=evaluation,
        )
        # The engine's settings, by the forward's nonfinite rule (raise or not),
        # and what they ask of every forward (the engine's rule, asked once):
        # may a layer's VJP run more than once (then checkpointed regions run
        # inline), do the forward values matter, is relaxation asked for.
        self._make_engine_configs()
        # Whether a backward should check that something relaxed (until it has).
        self._check_degenerate = self._engine_configs[True].asks_for_relaxation
        # Raw results of the last backward; last_stats builds the dataclass
        # only when asked (it is off the training loop's hot path).
        self._last_raw: tuple | None = None
        self._last_stats: RelaxationStats | None = None
        self._param_cache: tuple[int, list[tuple[str, nn.Parameter]]] | None = None
        # psi per linear/conv weight, registered so that state_dict(),
        # parameters() and optimizers see it; keys are the weight's name with
        # "." replaced by "__".
        self.backward_weight_store = nn.ParameterDict()
        # frSF's fixed random magnitudes |R|, by the same keys.
        self.backward_weight_magnitude = nn.ParameterDict()
        self._psi_layout: dict[str, str] = {}
        # Versions of learned psi and their weights at the last backward.
        self._psi_versions: dict[str, tuple[int, int]] = {}
        self._psi_warned = False
        self._extra_psi_params = tuple(backward_weight_params)
        if self._extra_psi_params and not self.relax_config.variant_spec.uses_backward_weights:
            raise ValueError(
                f"ARBackward: backward_weight_params given, but variant {variant!r} uses no "
                "backward weights"
            )
        direct = self.relax_config.variant_spec.direct_feedback
        if output_dim is not None and (
            not direct
            or isinstance(output_dim, bool)
            or not isinstance(output_dim, int)
            or output_dim < 1
        ):
            raise ValueError(
                "ARBackward: output_dim is the output size per sample that "
                "variant='direct_feedback_alignment' projects (a positive int); got "
                f"{output_dim!r} with variant {variant!r}"
            )
        self._direct_feedback_dim = output_dim
        if self.relax_config.variant_spec.uses_backward_weights:
            self._create_backward_weights()

    def _make_engine_configs(self) -> None:
        self._engine_configs = {
            raise_: EngineConfig(**engine_options(self.relax_config, raise_))
            for raise_ in (False, True)
        }
        engine = self._engine_configs[True]
        self._forward_rules = (engine.may_evaluate_layers_repeatedly, engine.needs_forward_values)

    # The engine's settings and the last backward's engine object live in C++
    # and are made again from the config: a copy, a pickle or a whole-model
    # torch.save carries the module, psi and the config, and nothing else.
    _NOT_CARRIED = ("_engine_configs", "_last_raw", "_param_cache")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._NOT_CARRIED:
            state.pop(name, None)
        state["_last_stats"] = self.last_stats
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_direct_feedback_dim", None)
        self._last_raw = None
        self._param_cache = None
        self._make_engine_configs()

    def _create_backward_weights(self) -> None:
        cfg = self.relax_config
        learned = cfg.variant_spec.backward_weights == "learned"
        sign_feedback = cfg.variant_spec.sign_feedback
        found = psi_lib.weights_read_by_linear_or_conv(self.module, self._extra_psi_params)
        if cfg.variant_spec.direct_feedback:
            # Which weights get one is known now; psi's size, only once the
            # output's is (output_dim, or the first backward).
            self._psi_layout = {name: "direct" for name, _ in found}
            if self._direct_feedback_dim is not None:
                self._create_direct_feedback_weights(self._direct_feedback_dim)
            return
        for name, w in found:
            with torch.no_grad():
                read = psi_lib.weight_as_read(self.module, name)
            init = psi_lib.initial_backward_weight(name, read, cfg)
            key = name.replace(".", "__")
            if sign_feedback == "fixed_random":
                # The magnitudes stay; the signs come from W at every backward.
                self.backward_weight_magnitude[key] = nn.Parameter(
                    psi_lib.xavier_uniform(w, init.shape, on_cpu_generator=True).abs(),
                    requires_grad=False,
                )
            self.backward_weight_store[key] = nn.Parameter(init, requires_grad=learned)
            self._psi_layout[name] = "transposed" if psi_lib.is_transposed(w) else "same"
        if sign_feedback is not None:
            self.refresh_sign_feedback()

    def _direct_feedback_shape(self, name: str, output_dim: int) -> torch.Size:
        weight = self.module.get_parameter(name)
        untransposed = weight.dim() == 2 and psi_lib.reads_weight_untransposed(self.module, name)
        groups = getattr(psi_lib.owner_of(self.module, name), "groups", 1)
        return psi_lib.direct_feedback_shape(weight, output_dim, untransposed, int(groups))

    def _create_direct_feedback_weights(self, output_dim: int) -> None:
        """Direct feedback's psi for every weight that gets one, projecting an
        output of `output_dim` per sample."""
        for name in self._psi_layout:
            with torch.no_grad():
                read = psi_lib.weight_as_read(self.module, name)
            shape = self._direct_feedback_shape(name, output_dim)
            init = psi_lib.initial_direct_feedback_weight(name, read, shape, self.relax_config)
            self.backward_weight_store[name.replace(".", "__")] = nn.Parameter(
                init, requires_grad=False
            )
        self._direct_feedback_dim = output_dim

    def _direct_feedback_weights_for(self, output_grads: list[torch.Tensor | None]) -> None:
        """Makes direct feedback's psi at the first backward, from the size of
        the one loss gradient per sample."""
        if self._direct_feedback_dim is not None or not self._psi_layout:
            return
        given = [g for g in output_grads if g is not None]
        if len(given) != 1 or given[0].dim() < 1 or given[0].shape[0] == 0:
            raise ValueError(
                "ARBackward: variant 'direct_feedback_alignment' projects the loss gradient of "
                "the module's one output, with a batch dimension first, onto every layer; this "
                f"backward has {len(given)} outputs with a loss gradient"
                + (f" (shape {tuple(given[0].shape)})" if len(given) == 1 else "")
            )
        self._create_direct_feedback_weights(given[0].numel() // given[0].shape[0])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        # Direct feedback's psi may not exist yet (made at the first backward):
        # a state dict that has it makes it, in its shape, before it loads.
        if self.relax_config.variant_spec.direct_feedback and self._direct_feedback_dim is None:
            store = prefix + "backward_weight_store."
            for name in self._psi_layout:
                saved = state_dict.get(store + name.replace(".", "__"))
                if saved is None:
                    continue
                dim = saved.shape[1] if saved.dim() == 2 else saved.shape[0]
                self._create_direct_feedback_weights(int(dim))
                break
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def refresh_sign_feedback(self) -> None:
        """Remakes psi from the forward weights' signs (the sign_symmetry
        variants); runs at every backward, before the relaxation."""
        rule = self.relax_config.variant_spec.sign_feedback
        if rule is None:
            return
        for name in self._psi_layout:
            key = name.replace(".", "__")
            magnitude = self.backward_weight_magnitude[key] if rule == "fixed_random" else None
            with torch.no_grad():
                weight = psi_lib.weight_as_read(self.module, name)
            psi_lib.remake_from_signs(self.backward_weight_store[key], weight, rule, magnitude)

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The module's named parameters, re-listed only after a module anywhere
        registered a parameter or submodule (walking the module tree on every
        forward is a visible share of a small model's step)."""
        generation = _registrations[0]
        if self._param_cache is None or self._param_cache[0] != generation:
            # object.__setattr__: nn.Module's own is slow and this is no submodule.
            object.__setattr__(
                self, "_param_cache", (generation, list(self.module.named_parameters()))
            )
        return self._param_cache[1]

    def _backward_weight_of(self, param_name: str) -> torch.Tensor | None:
        key = param_name.replace(".", "__")
        if key not in self.backward_weight_store:
            return None
        psi = self.backward_weight_store[key]
        w = self.module.get_parameter(param_name)
        layout = self._psi_layout[param_name]
        if layout == "direct":
            expected = self._direct_feedback_shape(param_name, self._direct_feedback_dim)
        else:
            expected = w.t().shape if layout == "transposed" else w.shape
        if psi.shape != expected or psi.device != w.device or psi.dtype != w.dtype:
            raise ValueError(
                f"ARBackward: backward weight for '{param_name}' has shape {tuple(psi.shape)}, "
                f"{psi.dtype} on {psi.device}; it must match its weight: shape "
                f"{tuple(expected)}, {w.dtype} on {w.device}"
            )
        return psi

    def backward_weights(self) -> dict[str, nn.Parameter]:
        """{forward weight name: psi}; empty for the exact variant, and for
        direct_feedback_alignment before its psi is made (see `output_dim`).

        A 2-D weight W gets psi of W^T's shape (psi = W^T is exact: for
        nn.Linear's [out, in] weight psi is [in, out]; an op that reads W
        untransposed, as Hugging Face's Conv1D does, is given psi^T); conv
        weights get psi of W's own shape, applied by the transposed convolution.
        """
        return {
            name: self.backward_weight_store[key]
            for name in self._psi_layout
            if (key := name.replace(".", "__")) in self.backward_weight_store
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules:
            # Never traced by dynamo: a compiled caller runs the wrapper as an
            # eager region, so the engine sees the module's own ops. (Only
            # once dynamo is loaded: importing it costs 0.75 s.)
            return _forward_outside_dynamo(self, *args, **kwargs)
        return self._relaxing_forward(*args, **kwargs)

    def _relaxing_forward(self, *args: Any, **kwargs: Any) -> Any:
        run = _ForwardRun(self, args, kwargs)
        wants_grad = torch.is_grad_enabled() and (
            len(run.params) > len(run.frozen)
            or any(p.requires_grad for p in run.psi_tensors)
            or any(t.requires_grad for t in run.inputs)
        )
        if not wants_grad:
            return self.module(*args, **kwargs)
        returned = _ARFunction.apply(run, *run.params, *run.psi_tensors, *run.inputs)
        return run.rebuild(returned)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Refused: see torch.compile in the limitations; the module that
        contains the wrapper can be compiled instead."""
        raise TypeError(_COMPILE_REFUSAL)

    def extra_repr(self) -> str:
        c = self.relax_config
        return (
            f"eta={c.eta}, steps={c.steps}, tol={c.tol}, init={c.init!r}, "
            f"schedule={c.schedule!r}, granularity={c.granularity!r}, variant={c.variant!r}"
        )

    def _record_stats(self, run: _ForwardRun) -> None:
        # The engine object keeps its stats; leaf names are built only if read.
        raw = ((run.param_names, len(run.input_leaves)), run.relaxation, run.inlined_checkpoints)
        # object.__setattr__: nn.Module's own costs more than the rest of this.
        object.__setattr__(self, "_last_raw", raw)
        object.__setattr__(self, "_last_stats", None)

    def _check_backward_weights_step(self, run: _ForwardRun) -> None:
        """Warn once when learned psi never moves: its gradient has been
        accumulating since the last backward while the forward weights were
        stepped (an optimizer made from the module's parameters, not the
        wrapper's)."""
        if self._psi_warned or self.relax_config.variant_spec.backward_weights != "learned":
            return
        versions = {}
        for name, w, psi in zip(run.param_names, run.params, run.psis):
            if psi is None:
                continue
            now = (psi._version, w._version)
            before = self._psi_versions.get(name)
            if before and psi.grad is not None and now[0] == before[0] and now[1] != before[1]:
                object.__setattr__(self, "_psi_warned", True)
                warn_at_call_site(
                    f"ARBackward: the backward weight of '{name}' has accumulated its gradient "
                    "over two backwards without changing, while its forward weight was "
                    "updated: the optimizer does not hold the backward weights. Build it from "
                    "the wrapper's parameters, e.g. torch.optim.SGD(ar.parameters(), ...)."
                )
                return
            versions[name] = now
        object.__setattr__(self, "_psi_versions", versions)

    def _warn_if_degenerate(self, relaxation: Relaxation) -> None:
        """Warn once when nothing relaxes although the settings ask for relaxation."""
        if not self._check_degenerate:
            return
        # Checked once: a module either has relaxing states or not.
        self._check_degenerate = False
        stats = relaxation.stats()
        if stats.relaxing_states > 0:
            return
        c = self.relax_config
        warn_at_call_site(
            f"ARBackward: the wrapped module has no relaxing state, so eta={c.eta}, "
            f"steps={c.steps} and variant={c.variant!r} change nothing: AR gradients are "
            f"backprop's here ({stats.params_outside_relaxation} parameters differentiated "
            "outside the relaxation). States live on layer outputs that depend on a floating "
            "input or on a lookup by the module's integer inputs; pass the data as an input of "
            "the module."
        )

    @property
    def last_stats(self) -> RelaxationStats | None:
        """What the last backward's relaxation did (None before the first backward)."""
        if self._last_stats is None and self._last_raw is not None:
            stats = stats_from_engine(self.relax_config, *self._last_raw)
            object.__setattr__(self, "_last_stats", stats)
        return self._last_stats


# ARBackward._relaxing_forward wrapped by torch.compiler.disable, made when
# first needed (it imports dynamo); a dict, whose item assignment dynamo
# traces without a warning when the first call is inside compiled code.
_never_traced: dict[str, Any] = {}


def _forward_outside_dynamo(ar: ARBackward, *args: Any, **kwargs: Any) -> Any:
    if "forward" not in _never_traced:
        _never_traced["forward"] = torch.compiler.disable(ARBackward._relaxing_forward)
    return _never_traced["forward"](ar, *args, **kwargs)

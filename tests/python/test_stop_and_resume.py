"""Runs that survive a wall-clock limit: a run stopped inside an epoch (by
--time-limit, SIGTERM or SIGUSR1) leaves a checkpoint from which it goes on
exactly. A run interrupted twice mid-epoch and resumed equals the
uninterrupted run bit for bit: every metric but the times, every cosine
measurement, and the final weights (and backward weights)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from torch_ar.experiments.training import ConfigError, TrainConfig, Trainer

METHODS = [
    pytest.param({"method": "backprop"}, id="backprop"),
    pytest.param({"method": "ar"}, id="exact"),
    pytest.param({"method": "ar", "eta": 0.5, "steps": 8}, id="closed_form"),
    pytest.param(
        {"method": "ar", "variant": "learned_backward_weights", "eta": 0.5, "steps": 8},
        id="learned_backward_weights",
    ),
    # psi made at the first backward, so the first checkpoint is the first
    # that holds it, and a resumed wrapper makes it from the checkpoint.
    pytest.param({"method": "ar", "variant": "direct_feedback_alignment"}, id="dfa"),
]


def _config(out: Path, method: dict, **extra) -> TrainConfig:
    return TrainConfig(
        dataset="fashion-mnist",
        model="mlp",
        loss="mse",
        batch_size=32,
        epochs=2,
        limit_train_batches=7,
        limit_test_batches=1,
        test_batch_size=100,
        cosine_every=3,
        device="cpu",
        seed=3,
        out=str(out),
        **method,
        **extra,
    )


def _stopping(trainer: Trainer, after: int, how: str) -> Trainer:
    """Asks ``trainer`` to stop after its ``after``-th training step."""
    step = trainer._train_step
    count = [0]

    def counted(*args, **kwargs):
        result = step(*args, **kwargs)
        count[0] += 1
        if count[0] == after:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                trainer.request_stop("test")
        return result

    trainer._train_step = counted
    return trainer


def _without_times(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        row.pop("time_s", None)
    return rows


@pytest.mark.parametrize("method", METHODS)
def test_stopped_twice_inside_epochs_equals_the_whole_run(tmp_path, method, capsys):
    whole = Trainer(_config(tmp_path / "whole", method))
    whole.fit()
    assert whole.stopped is None

    parts = tmp_path / "parts"
    first = _stopping(Trainer(_config(parts, method)), after=3, how="request")
    first.fit()
    assert (first.stopped.epoch, first.stopped.next_batch) == (1, 3)
    capsys.readouterr()
    second = _stopping(Trainer(_config(parts, method, resume=True)), after=6, how="signal")
    second.fit()
    # The log says where it went on.
    assert "resumed in epoch 1 at batch 3" in capsys.readouterr().out
    assert second.stopped.reason == "SIGUSR1"
    assert (second.stopped.epoch, second.stopped.next_batch) == (2, 2)
    third = Trainer(_config(parts, method, resume=True))
    third.fit()
    assert third.stopped is None

    assert _without_times(parts / "metrics.jsonl") == _without_times(
        tmp_path / "whole" / "metrics.jsonl"
    )
    if method["method"] == "ar":
        assert _without_times(parts / "cosine.jsonl") == _without_times(
            tmp_path / "whole" / "cosine.jsonl"
        )
    got, want = third.net.state_dict(), whole.net.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_time_limit_stops_at_the_next_batch(tmp_path):
    config = _config(tmp_path, {"method": "backprop"}, time_limit=1e-6)
    trainer = Trainer(config)
    trainer.fit()
    assert trainer.stopped is not None
    assert trainer.stopped.reason.startswith("time limit")
    assert (trainer.stopped.epoch, trainer.stopped.next_batch) == (1, 1)
    assert (tmp_path / "checkpoint.pt").is_file()
    assert not (tmp_path / "metrics.jsonl").read_text().strip()


def test_a_checkpoint_from_before_newer_settings_resumes(tmp_path):
    # A checkpoint written before label_smoothing, time_limit and the block
    # default existed: its absent settings ran at their defaults, and its
    # unnamed granularity was "layer".
    method = {"method": "ar", "eta": 0.5, "steps": 8}
    first = Trainer(_config(tmp_path, {**method, "granularity": "layer"}))
    first.config.epochs = 1
    first.fit()
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    for name in ("label_smoothing", "time_limit"):
        state["config"].pop(name)
    state["config"]["granularity"] = None
    state["config"]["epochs"] = 2
    state.pop("library_granularity")
    torch.save(state, path)
    resumed = Trainer(_config(tmp_path, {**method, "granularity": "layer"}, resume=True))
    assert len(resumed.fit()) == 2
    with pytest.raises(ConfigError, match="granularity"):
        Trainer(_config(tmp_path, method, resume=True)).fit()


def test_stop_after_epochs_keeps_the_whole_runs_schedule(tmp_path):
    """A run asked to stop after epoch 1 of 2 follows the 2-epoch run to the
    bit there (the learning-rate schedule is the whole run's), stops with a
    checkpoint, and --resume without the stop finishes it as the whole run."""
    method = {"method": "backprop", "lr_schedule": "cosine"}
    whole = Trainer(_config(tmp_path / "whole", method))
    whole.fit()
    parts = tmp_path / "parts"
    first = Trainer(_config(parts, method, stop_after_epochs=1))
    first.fit()
    assert (first.stopped.epoch, first.stopped.next_batch) == (2, 0)
    assert "asked to stop after epoch 1" in first.stopped.reason
    Trainer(_config(parts, method, resume=True)).fit()
    assert _without_times(parts / "metrics.jsonl") == _without_times(
        tmp_path / "whole" / "metrics.jsonl"
    )
    with pytest.raises(ConfigError, match="stop_after_epochs"):
        Trainer(_config(tmp_path / "bad", method, stop_after_epochs=3))

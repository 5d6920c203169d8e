"""TensorBoard logging of a training run (`torch-ar train --tensorboard DIR`).

Writes what the run already records in `metrics.jsonl` and `cosine.jsonl`,
through `torch.utils.tensorboard` (the `tensorboard` package, part of the
`experiments` extra):

- per epoch (step = epoch): `train/loss`, `train/accuracy`, `test/...`,
  `val/...` when there is a validation split, `lr`, `time_s`;
- per gradient measurement (step = training batch since the start):
  `cosine/mean`, `cosine/min`, `cosine/<parameter>` (AR gradient to
  autograd's), `psi_angle/<weight>` (degrees between psi and its exact value),
  `relaxation/max_residual` and `relaxation/steps`.
"""

from __future__ import annotations

import math
from typing import Any

EPOCH_SCALARS = {
    "train_loss": "train/loss",
    "train_acc": "train/accuracy",
    "test_loss": "test/loss",
    "test_acc": "test/accuracy",
    "val_loss": "val/loss",
    "val_acc": "val/accuracy",
    "lr_last": "lr",
    "time_s": "time_s",
}


class TensorBoardLog:
    """One run's TensorBoard event file in `log_dir` (created if missing)."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional dependency
            raise ImportError(
                "--tensorboard needs the tensorboard package: "
                "pip install tensorboard (or the experiments extra)"
            ) from e
        self.writer = SummaryWriter(log_dir=log_dir)

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def measurement(self, step: int, m: dict[str, Any]) -> None:
        """One comparison of the AR gradients with autograd's (Trainer._measure)."""
        self._scalar("cosine/mean", m.get("cosine_mean"), step)
        self._scalar("cosine/min", m.get("cosine_min"), step)
        for name, value in (m.get("param_cosines") or {}).items():
            self._scalar(f"cosine/{name}", value, step)
        for name, value in (m.get("psi_angles") or {}).items():
            self._scalar(f"psi_angle/{name}", value, step)
        self._scalar("relaxation/max_residual", m.get("max_residual"), step)
        self._scalar("relaxation/steps", m.get("steps"), step)

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's metrics record (a line of metrics.jsonl)."""
        for key, tag in EPOCH_SCALARS.items():
            self._scalar(tag, record.get(key), record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

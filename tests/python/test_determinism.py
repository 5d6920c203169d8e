"""The same seed gives bit-identical gradients in two fresh processes (CPU).

Each process builds the models from a seed, runs one batch through
``ARBackward`` with the exact default and with the paper's eta 0.1 / 100
literal steps, and saves every gradient; the two files must agree with
``torch.equal``. A fresh interpreter catches what a repeat inside one process
cannot: state that depends on allocation addresses, hash seeds, thread start-up
or lazily initialised kernels. The processes run concurrently (PYTHONHASHSEED
differs between them) with the default thread count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parent

SETTINGS = {
    "exact": {},
    "eta0.1_steps100": {"eta": 0.1, "steps": 100},
    "eta0.1_steps100_sweep": {"eta": 0.1, "steps": 100, "schedule": "sweep"},
}
CASES = ("paper_mlp_mse", "small_cnn", "cat_residual", "dropout_seeded")

WORKER = textwrap.dedent(
    """
    import json
    import sys

    import torch
    import zoo

    out_path = sys.argv[1]
    settings = json.loads(sys.argv[2])
    cases = sys.argv[3].split(",")
    torch_ar = zoo.load_torch_ar()
    result = {}
    for case_name in cases:
        case = zoo.CASES[case_name]
        for name, kwargs in settings.items():
            model = zoo.make_model(case, "cpu", torch.float32, seed=3)
            ar = torch_ar.ARBackward(model, **kwargs)
            args, kw, target = zoo.make_batch(case, "cpu", torch.float32, seed=3)
            case.loss(zoo.seeded_forward(ar, args, kw), target).backward()
            for pname, p in model.named_parameters():
                result[f"{case_name}/{name}/{pname}"] = p.grad.clone()
    torch.save(result, out_path)
    """
)


def _launch(out: Path, hash_seed: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = hash_seed
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(out), json.dumps(SETTINGS), ",".join(CASES)],
        env=env,
        cwd=str(REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("determinism")
    paths = [tmp / "run0.pt", tmp / "run1.pt"]
    procs = [_launch(p, seed) for p, seed in zip(paths, ("1", "2"))]
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("a determinism worker process did not finish in 240 s")
        assert proc.returncode == 0, f"worker failed:\n{err[-3000:]}"
    return torch.load(paths[0]), torch.load(paths[1])


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case_name", CASES)
def test_bit_identical_gradients_across_processes(two_runs, case_name, setting):
    first, second = two_runs
    prefix = f"{case_name}/{setting}/"
    keys = [k for k in first if k.startswith(prefix)]
    assert keys, f"no gradients saved for {prefix}"
    assert sorted(keys) == sorted(k for k in second if k.startswith(prefix))
    differ = {
        k: float((first[k] - second[k]).abs().max())
        for k in keys
        if not torch.equal(first[k], second[k])
    }
    assert not differ, f"gradients differ between two fresh processes: {differ}"
    assert all(torch.isfinite(first[k]).all() for k in keys)

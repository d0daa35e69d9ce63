"""Multi-host: two processes on 127.0.0.1 (4 CPU devices each) joined by jax.distributed.initialize (gloo CPU
collectives) train the same steps as one process with 8 devices, given the same data sharding (data_shards=2)."""

import json
import pathlib

import numpy as np
import pytest

from jaxopd import train
from jaxopd.training import config as config_lib

CONFIG = pathlib.Path(__file__).parents[1] / "tiny_train_config.py"
OVERRIDES = {"steps": 3, "checkpoint_every": 3, "data_shards": 2, "eval_every": 0, "unigram_entropy_batches": 0}


def _losses(workdir):
    lines = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return np.array([[line[name] for name in ("loss", "grad_norm", "mtp_loss")] for line in lines if "loss" in line])


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, run_processes):
    run_processes(CONFIG, tmp_path / "multi", OVERRIDES)
    train.train(config_lib.load_config_file(CONFIG, {"workdir": str(tmp_path / "single"), **OVERRIDES}))
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"), rtol=2e-5)
    # Each process saved its own data-iterator state in the shared checkpoint.
    data_dir = tmp_path / "multi" / "checkpoints" / "3" / "data"
    assert {p.name for p in data_dir.glob("process_*.json")} == {"process_0-of-2.json", "process_1-of-2.json"}


@pytest.mark.slow
def test_a_locked_workdir_stops_every_process(tmp_path, run_processes):
    """Process 0 is refused the lock: the other process learns it and stops too, instead of waiting in a collective."""
    from jaxopd.training import workdir_lock
    with workdir_lock.hold(tmp_path / "multi"):
        outputs = run_processes(CONFIG, tmp_path / "multi", OVERRIDES, timeout=240, succeed=False)
    assert "is in use by another run (host" in outputs[0]
    assert "is in use by another run (process 0 could not lock it)" in outputs[1]

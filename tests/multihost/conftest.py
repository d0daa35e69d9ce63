"""Multi-host runs for the tests: `python -m jaxopd.train` as several processes on 127.0.0.1 (4 CPU devices each),
joined by jax.distributed.initialize (gloo CPU collectives)."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from tests.xla_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: pathlib.Path, workdir: pathlib.Path, overrides: dict, num_processes: int = 2,
           devices_per_process: int = 4, timeout: float = 900, succeed: bool = True) -> list[str]:
    """Runs `config` with `--config.<key>=<value>` overrides as `num_processes` processes writing to `workdir`; returns
    their outputs and fails the test with the end of any that exits non-zero (with succeed=False: that exits 0)."""
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices_per_process),
           "JAX_PLATFORMS": "cpu"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxopd.train", f"--config={config}", f"--config.workdir={workdir}",
             *[f"--config.{key}={value}" for key, value in overrides.items()],
             f"--config.distributed.coordinator_address={address}",
             f"--config.distributed.num_processes={num_processes}", f"--config.distributed.process_id={process_id}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for process_id in range(num_processes)]
    outputs = []
    try:
        outputs = [worker.communicate(timeout=timeout)[0] for worker in workers]
    finally:
        for worker in workers:  # a process left waiting on a failed peer's collective would hang the suite
            if worker.poll() is None:
                worker.kill()
    for process_id, (worker, output) in enumerate(zip(workers, outputs)):
        assert (worker.returncode == 0) == succeed, f"process {process_id} exit {worker.returncode}:\n{output[-3000:]}"
    return outputs


@pytest.fixture
def run_processes():
    """`launch`: a multi-process run of `python -m jaxopd.train`."""
    return launch

"""Nothing lost, nothing hung: a full disk and a read-only checkpoints/ stop the run with an error within a step (no
thread blocks the loop or the exit), the guard stops diverging runs naming the checkpoint from before the trouble,
skipping non-finite steps has a cap, and SIGINT saves like SIGTERM."""

import contextlib
import errno
import json
import pathlib
import signal
import subprocess
import time

import pytest

from tests.test_train import _launch as launch_trainer
from jaxopd import train
from jaxopd.training import config as config_lib, loop
from jaxopd.training.config import ObjectiveConfig
from jaxopd.training.guard import Guard, last_good_checkpoint
from jaxopd.training.metrics import MetricsWriter

CONFIG = pathlib.Path(__file__).parents[1] / "tiny_train_config.py"
REPO = pathlib.Path(__file__).resolve().parents[2]


def _launch(workdir, *overrides):
    """The trainer's CLI on tests/tiny_train_config.py without evals: these tests watch the training steps."""
    return launch_trainer(workdir, "--config.eval_every=0", *overrides)


def _logged_steps(workdir) -> int:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@contextlib.contextmanager
def _mounted(target: pathlib.Path, *options: str):
    """A mount (root only; skips where the machine allows none)."""
    target.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", *options, str(target)], capture_output=True).returncode != 0:
        pytest.skip("mounting is not allowed here")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _ends_with_error(process, timeout=300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the run hung:\n{process.communicate()[0][-3000:]}")
    assert process.returncode != 0, output[-3000:]
    return output


# --- a full disk, a read-only checkpoints/ ---

def test_a_failed_events_write_raises_at_once(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.0})

    class FullDisk:
        def write(self, *data):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = write

    writer._events._py_recordio_writer._writer = FullDisk()
    started = time.time()
    for step in (2, 3):  # SummaryWriter's queue took the first ten quietly, then blocked forever
        with pytest.raises(OSError, match="No space left"):
            writer.write(step, {"loss": 1.0})
    writer.close()
    assert time.time() - started < 5


@pytest.mark.slow
def test_full_disk_stops_the_run_with_an_error(tmp_path):
    with _mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=2m", "tmpfs") as disk:
        (disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 64 * 2**10))  # 64 KiB left: a few dozen steps of metrics
        process = _launch(disk / "run", "--config.steps=1000", "--config.checkpoint_every=0")
        output = _ends_with_error(process)
    assert "error: writing metrics" in output and "No space left on device" in output, output[-3000:]
    assert "The last good checkpoint is none yet" in output


@pytest.mark.slow
def test_read_only_checkpoints_stop_the_run_with_an_error(tmp_path):
    source = tmp_path / "read_only"
    source.mkdir()
    with _mounted(tmp_path / "run" / "checkpoints", "--bind", "-o", "ro", str(source)):
        process = _launch(tmp_path / "run", "--config.steps=20", "--config.checkpoint_every=2")
        output = _ends_with_error(process)
    assert "error: writing the checkpoint of step 2" in output, output[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(line["step"] for line in lines) <= 4  # stopped within a step or two of the failed save


# --- the guard ---

def _check_all(guard, rows):
    for step, (loss, grad_norm) in enumerate(rows, start=1):
        trouble = guard.check(step, loss, grad_norm)
        if trouble is not None:
            return trouble
    return None


def test_guard_stops_on_a_loss_spike_and_on_a_dead_gradient():
    healthy = [(8.0 - 0.1 * i, 1.0) for i in range(6)]
    assert _check_all(Guard(ObjectiveConfig()), healthy) is None
    message, first_bad = _check_all(Guard(ObjectiveConfig()), healthy + [(2e7, 1.5), (3e7, 0.0)])
    assert first_bad == 7 and "loss 2e+07 at step 7 is over 50 times its running median" in message
    message, first_bad = _check_all(Guard(ObjectiveConfig()), healthy[:2] + [(8.0, 0.0)])
    assert first_bad == 3 and "grad norm is exactly 0 at step 3" in message
    # GRPO with every group's rewards alike (all samples wrong): advantages, loss and gradient exactly 0, a healthy step
    assert _check_all(Guard(ObjectiveConfig(loss="grpo")), healthy[:2] + [(0.0, 0.0), (-0.0, 0.0)] + healthy) is None
    assert _check_all(Guard(ObjectiveConfig(divergence_factor=0)), healthy + [(2e7, 0.0)]) is None


def test_guard_checks_only_the_grad_norm_of_distillation_losses():
    rows = [(0.01, 1.0)] * 6 + [(5.0, 1.0)]  # a policy-gradient surrogate near 0 may jump by any factor
    assert _check_all(Guard(ObjectiveConfig(loss="reverse_kl")), rows) is None
    assert _check_all(Guard(ObjectiveConfig(loss="reverse_kl")), rows + [(0.01, 100.0)])[1] == 8


def test_last_good_checkpoint_predates_the_first_bad_step():
    # Step 7's loss is computed on the params saved at step 6: that checkpoint is already diverged.
    assert last_good_checkpoint([2, 4, 6], first_bad_step=7) == 4
    assert last_good_checkpoint([2, 4, 6], first_bad_step=9) == 6
    assert last_good_checkpoint([1], first_bad_step=2) is None


def test_skipped_steps_have_a_cap(tmp_path):
    config = config_lib.load_config_file(CONFIG, {
        "workdir": str(tmp_path), "optimizer.schedule.kind": "constant", "optimizer.schedule.peak_lr": 1e30,
        "skip_nonfinite_steps": True, "max_skipped_steps": 3, "steps": 8, "checkpoint_every": 0, "eval_every": 0,
        "unigram_entropy_batches": 0})
    with pytest.raises(loop.NonFiniteLossError, match=r"3 steps in a row \(2 to 4\) .* were skipped"):
        train.train(config)


# --- SIGINT ---

@pytest.mark.slow
def test_sigint_saves_like_sigterm(tmp_path):
    process = _launch(tmp_path, "--config.checkpoint_every=0", "--config.steps=1000")
    deadline = time.time() + 240
    while _logged_steps(tmp_path) < 4 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "preempted: saved step" in output, output[-3000:]
    saved = int(output.split("preempted: saved step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / str(saved)).is_dir()

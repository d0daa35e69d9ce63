"""One run per workdir: a second run stops with an error naming the holder and leaves the first alone; a lock left
by a killed run is taken over."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from tests.test_train import _launch as launch_trainer
from jaxopd.training import workdir_lock

CONFIG = pathlib.Path(__file__).parents[1] / "tiny_train_config.py"
REPO = pathlib.Path(__file__).resolve().parents[2]


def _launch(workdir, *overrides):
    """The trainer's CLI on tests/tiny_train_config.py without evals: these tests watch the training steps."""
    return launch_trainer(workdir, "--config.eval_every=0", *overrides)


def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    with workdir_lock.hold(tmp_path):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"in use by another run .*pid {os.getpid()}, "
                                                                  "running"):
            with workdir_lock.hold(tmp_path):
                pass
    assert (tmp_path / ".lock").read_text() == ""  # released
    with workdir_lock.hold(tmp_path):  # and free again
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": killed.pid,
                                                "started": "2024-01-01T00:00:00"}))
    with workdir_lock.hold(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert f"taking over the stale lock {tmp_path / '.lock'}" in out and f"pid {killed.pid}, no longer running" in out


@pytest.mark.slow
def test_a_second_run_on_a_workdir_stops_and_the_first_finishes(tmp_path):
    first = _launch(tmp_path, "--config.steps=40", "--config.checkpoint_every=10")
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = _launch(tmp_path, "--config.steps=41")
    output, _ = second.communicate(timeout=240)
    assert second.returncode != 0 and "is in use by another run" in output and f"pid {first.pid}" in output, \
        output[-3000:]
    first_output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, first_output[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 41))  # one run's lines, in order, none twice
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 40  # not the second run's 41

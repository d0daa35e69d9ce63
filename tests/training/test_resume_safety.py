"""Nothing lost on resume: a workdir holding another run's checkpoints is refused with nothing changed (a changed
model, batch_size, microbatch_size or seq_len), a damaged newest checkpoint is moved aside and retrained without
blocking the workdir, and SIGKILL during saves never leaves a workdir that does not resume exactly."""

import pathlib
import random
import shutil
import signal
import time

import pytest

from jaxopd import train
from jaxopd.training import checkpoint
from tests.test_train import _assert_same_steps, _config, _launch, _metrics, _wait_for, uninterrupted  # noqa: F401

# The first run: 12 steps saved at 4, 8 and 12 (the repro), no eval so that each run is short.
FIRST = {"steps": 12, "checkpoint_every": 4, "eval_every": 0, "unigram_entropy_batches": 0}
FIRST_FLAGS = [f"--config.{key}={value}" for key, value in FIRST.items()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workdir trained to step 12, and its metrics."""
    workdir = tmp_path_factory.mktemp("finished")
    train.train(_config(workdir, **FIRST))
    return workdir, _metrics(workdir)


def _copy(finished, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    return workdir


def _snapshot(workdir):
    """Every path under the workdir with its size and modification time, but the lock file (which every run,
    refused or not, takes before reading the workdir)."""
    return {str(path.relative_to(workdir)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in workdir.rglob("*") if path.name != ".lock"}


def _steps(workdir):
    return sorted(path.name for path in (workdir / "checkpoints").iterdir() if not path.name.startswith("."))


@pytest.mark.slow
def test_cli_refuses_a_changed_model_and_keeps_the_old_checkpoints(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    before = _snapshot(workdir)
    process = _launch(workdir, *FIRST_FLAGS, "--config.model.d_model=64", "--config.checkpoint_every=3")
    output, _ = process.communicate(timeout=240)
    assert process.returncode != 0, output[-3000:]
    assert "error: the newest checkpoint in" in output and "(step 12)" in output, output[-3000:]
    assert "model.d_model: 32 in the checkpoint, 64 now" in output
    assert "checkpoint_every" not in output.split("these differ")[1]  # how often to save may change
    assert f"--config.init_from.path={workdir / 'checkpoints'}" in output
    assert _steps(workdir) == ["12", "4", "8"] and _snapshot(workdir) == before  # nothing written or deleted


@pytest.mark.parametrize("key, value", [("batch_size", 32), ("microbatch_size", 16), ("seq_len", 64)])
def test_a_changed_batch_or_sequence_size_is_refused(finished, tmp_path, key, value):
    workdir = _copy(finished, tmp_path)
    before = _snapshot(workdir)
    saved = _config(workdir, **FIRST)[key]
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=f"{key}: {saved} in the checkpoint, {value} now"):
        train.train(_config(workdir, **{**FIRST, key: value, "steps": 16}))
    assert _snapshot(workdir) == before


def test_resume_may_change_the_steps_and_how_often_to_log_and_save(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    train.train(_config(workdir, **{**FIRST, "steps": 14, "checkpoint_every": 7, "log_every": 2,
                                    "keep_checkpoints": 4}))
    assert _steps(workdir) == ["12", "14", "4", "8"]
    assert max(_metrics(workdir)) == 14


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_moved_aside_and_retrained(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    largest = max((path for path in (workdir / "checkpoints/12/params/ocdbt.process_0/d").iterdir()),
                  key=lambda path: path.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    outputs = []
    for _ in range(2):  # the second rerun failed with "Checkpoint for step 12 already exists." before
        process = _launch(workdir, *FIRST_FLAGS)
        outputs.append(process.communicate(timeout=240)[0])
        assert process.returncode == 0, outputs[-1][-3000:]
    (aside,) = [name for name in _steps(workdir) if name.startswith("12.damaged-")]
    assert _steps(workdir) == ["12", aside, "4", "8"]
    report = [line for line in outputs[0].splitlines() if "checkpoint step 12 does not restore" in line]
    assert len(report) == 1 and report[0].endswith(f"moved it to {workdir / 'checkpoints' / aside}"), outputs[0]
    assert "already holds a finished run: its newest checkpoint is step 12" in outputs[1]
    _assert_same_steps(finished[1], _metrics(workdir), range(9, 13))


def _saved_steps(workdir):
    directory = workdir / "checkpoints"
    return [int(path.name) for path in directory.iterdir() if path.name.isdigit()] if directory.is_dir() else []


def _saving(workdir, after):
    """Whether orbax is writing a step after `after` (its temporary directory exists)."""
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(".orbax-checkpoint-tmp" in path.name and int(path.name.split(".")[0]) > after
                                      for path in directory.iterdir())


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_workdir_that_does_not_resume_exactly(tmp_path, uninterrupted):
    """Every step saves (asynchronously); each launch is killed at a random moment of a save, four times, and the
    finished run's every step matches the uninterrupted run bitwise."""
    rng = random.Random(20)
    flags = ["--config.checkpoint_every=1", "--config.async_checkpoints=True"]
    kills = []
    for _ in range(4):
        start = max(_saved_steps(tmp_path), default=0)
        process = _launch(tmp_path, *flags)
        target = start + rng.randint(1, 3)  # kill during the save of a step a little after the resumed one
        _wait_for(lambda: _saving(tmp_path, target - 1), process)
        time.sleep(rng.uniform(0.0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills.append((start, max(_saved_steps(tmp_path), default=0)))
    assert kills[-1][1] < 20, f"killed too late: the run had already finished ({kills})"
    process = _launch(tmp_path, *flags)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]
    damaged = [path.name for path in (tmp_path / "checkpoints").iterdir() if ".damaged-" in path.name]
    print(f"kills (resumed from, newest saved when killed): {kills}; damaged steps set aside: {damaged}")
    _assert_same_steps(uninterrupted[0], _metrics(tmp_path), range(1, 21))

"""End-to-end trainer behaviour: exact resume after SIGKILL and after SIGTERM, NaN handling, eval and metrics,
params-only loading."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxopd import train
from jaxopd.training import config as config_lib, loop

CONFIG = pathlib.Path(__file__).parent / "tiny_train_config.py"
REPO = pathlib.Path(__file__).resolve().parents[1]
COMPARED = ("loss", "ce_loss", "mtp_loss", "grad_norm", "learning_rate", "moe_balance_loss", "moe/max_load_ratio")


def _config(workdir, **overrides):
    return config_lib.load_config_file(CONFIG, {"workdir": str(workdir), **overrides})


def _metrics(workdir) -> dict[int, dict]:
    """The last metrics line of every step (a resumed run rewrites the steps after its checkpoint)."""
    lines = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if "loss" in line}


def _launch(workdir, *overrides, config=CONFIG):
    args = [sys.executable, "-m", "jaxopd.train", f"--config={config}", f"--config.workdir={workdir}", *overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{process.stdout.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.005)


def _assert_same_steps(expected, actual, steps):
    for step in steps:
        for name in COMPARED:
            assert actual[step][name] == expected[step][name], (step, name, actual[step][name], expected[step][name])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train(_config(workdir))
    return _metrics(workdir), workdir


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, uninterrupted):
    process = _launch(tmp_path)
    _wait_for(lambda: (tmp_path / "checkpoints" / "12").is_dir(), process)  # orbax renames a finished save into place
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "checkpoints" / "20").exists(), "killed too late: the run had already finished"
    resumed = _launch(tmp_path)
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output[-3000:]
    _assert_same_steps(uninterrupted[0], _metrics(tmp_path), range(13, 21))


@pytest.mark.slow
def test_sigterm_saves_then_resume_matches(tmp_path, uninterrupted):
    process = _launch(tmp_path, "--config.checkpoint_every=0")
    _wait_for(lambda: len(_metrics(tmp_path)) >= 5 if (tmp_path / "metrics.jsonl").exists() else False, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "preempted: saved step" in output, output[-3000:]
    saved = int(output.split("preempted: saved step ")[1].split(";")[0])
    assert 5 <= saved < 20 and (tmp_path / "checkpoints" / str(saved)).is_dir()
    resumed = _launch(tmp_path, "--config.checkpoint_every=0")
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output[-3000:]
    _assert_same_steps(uninterrupted[0], _metrics(tmp_path), range(saved + 1, 21))


def test_uninterrupted_run_logs_what_the_issue_lists(uninterrupted):
    metrics, workdir = uninterrupted
    assert sorted(metrics) == list(range(1, 21))
    last = metrics[20]
    for name in ("loss", "learning_rate", "tokens_per_second", "grad_norm", "mtp_loss", "moe/max_load_ratio",
                 "moe/min_load_ratio"):
        assert name in last and np.isfinite(last[name]), name
    assert last["loss"] < metrics[1]["loss"]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval/loss" in line] == [0, 10, 20]  # before training, then every 10
    assert lines[0]["step"] == 0 and 0 < lines[0]["unigram_entropy"] < np.log(4096)
    assert json.loads((workdir / "config.json").read_text())["steps"] == 20


def test_objectives_table_names_every_loss_the_config_accepts():
    import typing
    assert tuple(train.OBJECTIVES) == typing.get_args(config_lib.Loss)


def test_rerun_of_a_finished_run_says_so_and_changes_nothing(uninterrupted, capsys):
    _, workdir = uninterrupted
    before = (workdir / "metrics.jsonl").read_text()
    assert train.train(_config(workdir)) == {}
    assert "already holds a finished run: its newest checkpoint is step 20 and steps=20" in capsys.readouterr().out
    assert (workdir / "metrics.jsonl").read_text() == before


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path):
    # A huge learning rate sends the params to inf after the first update: step 2's loss is not finite.
    config = _config(tmp_path, **{"optimizer.schedule.kind": "constant", "optimizer.schedule.peak_lr": 1e30,
                                  "checkpoint_every": 1, "steps": 3})
    # Step 2's loss is computed on the params saved at step 1, so that checkpoint is not a good one.
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 2; stopping. No checkpoint predates it .*"
                                                       r"checkpoints \[1\] were saved after the trouble began"):
        train.train(config)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_nonfinite_steps_can_be_skipped(tmp_path):
    config = _config(tmp_path, **{"optimizer.schedule.kind": "constant", "optimizer.schedule.peak_lr": 1e30,
                                  "skip_nonfinite_steps": True, "steps": 3, "checkpoint_every": 0})
    train.train(config)
    metrics = _metrics(tmp_path)
    assert not metrics[1]["skipped"] and metrics[2]["skipped"] and metrics[3]["skipped"]
    # Skipped steps leave the state as it was after step 1: the same (non-finite) loss every time.
    assert str(metrics[2]["loss"]) == str(metrics[3]["loss"])


@pytest.mark.slow
def test_init_from_a_jaxopd_checkpoint_loads_its_params(tmp_path, uninterrupted, capsys):
    _, first = uninterrupted
    # Learning rate 0 and no bias update: the one step leaves the loaded (step 20) params as they are.
    train.train(_config(tmp_path, steps=1, checkpoint_every=0, moe_bias_rate=0.0, eval_every=1,
                        **{"optimizer.schedule.kind": "constant", "optimizer.schedule.peak_lr": 0.0,
                           "init_from.kind": "checkpoint", "init_from.path": str(first / "checkpoints")}))
    evals = [[json.loads(line)["eval/loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if "eval/loss" in line] for workdir in (first, tmp_path)]
    assert evals[1] == evals[0][-1:] * 2  # at the start and after the step: the loaded params' eval both times
    # The last line a person reads: the headline eval before -> after, and where the outputs are.
    ce = [json.loads(line)["eval/ce_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
          if "eval/ce_loss" in line]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: steps 0 -> 1 in ") and f"eval/ce_loss {ce[0]:.4g} -> {ce[1]:.4g}" in summary
    assert f"outputs in {tmp_path}" in summary


@pytest.mark.slow
def test_cli_runs_from_a_saved_config_json(tmp_path, uninterrupted):
    """`--config=<workdir>/config.json` reruns a run's resolved config, overrides on top."""
    _, first = uninterrupted
    process = subprocess.run([sys.executable, "-m", "jaxopd.train", f"--config={first / 'config.json'}",
                              f"--config.workdir={tmp_path}", "--config.steps=2", "--config.eval_every=0"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["steps"] == 2 and saved["model"] == json.loads((first / "config.json").read_text())["model"]
    assert _metrics(tmp_path)[2]["loss"] == _metrics(first)[2]["loss"]  # the same run, cut short

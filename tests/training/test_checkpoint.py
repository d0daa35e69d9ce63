"""Checkpoints: latest restored exactly, keep-last-K, a damaged newest checkpoint falls back to the previous one,
resuming on another process count, params-only loading."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.training import checkpoint


def _state(value):
    return {"params": {"w": jnp.full((4, 2), value)}, "opt_state": {"mu": jnp.full((4, 2), -value)},
            "step": jnp.int32(value), "rng": jax.random.key_data(jax.random.key(value))}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _save_steps(directory, steps, keep=2):
    saver = checkpoint.Checkpointer(directory, every=2, keep=keep)
    for step in steps:
        saver.save(step, _state(step), [{"produced": step}], {"steps": 10})
    saver.wait()
    return saver


def test_restores_the_latest_and_keeps_the_last_k(tmp_path):
    saver = _save_steps(tmp_path, [2, 4, 6])
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 6]
    state, data_state = saver.restore_latest(_abstract(_state(0)))
    assert data_state == [{"produced": 6}]
    for name in ("params", "opt_state", "step", "rng"):
        jax.tree.map(np.testing.assert_array_equal, state[name], _state(6)[name])
    # Each process writes its own iterator state; the config is saved alongside.
    assert json.loads((tmp_path / "6" / "data" / "process_0-of-1.json").read_text()) == [{"produced": 6}]
    assert json.loads((tmp_path / "6" / "config" / "metadata").read_text()) == {"steps": 10}


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path):
    saver = _save_steps(tmp_path, [2, 4, 6], keep=3)
    for path in (tmp_path / "6" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    state, data_state = saver.restore_latest(_abstract(_state(0)))
    assert data_state == [{"produced": 4}]
    np.testing.assert_array_equal(state["params"]["w"], 4.0)
    # A step directory that lost an item (a partial copy) is skipped as well.
    (tmp_path / "4" / "data" / "process_0-of-1.json").unlink()
    state, data_state = checkpoint.Checkpointer(tmp_path, every=2, keep=3).restore_latest(_abstract(_state(0)))
    assert data_state == [{"produced": 2}]


def _as_if_written_by_two_processes(step_dir):
    """Renames a one-process checkpoint's data state to what two processes write (each its own, here alike)."""
    data = step_dir / "data"
    state = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for index in range(2):
        (data / f"process_{index}-of-2.json").write_text(state)


def test_another_process_count_resumes_only_a_data_state_every_process_shares(tmp_path):
    _save_steps(tmp_path, [2, 4])
    for step in (2, 4):
        _as_if_written_by_two_processes(tmp_path / str(step))
    # Per-process data positions (the trainer's sharded pipeline) cannot move to one process: a clear error, not a
    # silent restart from step 0.
    with pytest.raises(ValueError, match="written by 2 processes and this run has 1.*resume with 2 processes"):
        checkpoint.Checkpointer(tmp_path, every=2, keep=2).restore_latest(_abstract(_state(0)))
    state, data_state = checkpoint.Checkpointer(tmp_path, every=2, keep=2, same_data_state_on_every_process=True
                                                ).restore_latest(_abstract(_state(0)))
    assert data_state == [{"produced": 4}]
    np.testing.assert_array_equal(state["params"]["w"], 4.0)
    np.testing.assert_array_equal(state["opt_state"]["mu"], -4.0)


def test_no_checkpoint_gives_none(tmp_path):
    assert checkpoint.Checkpointer(tmp_path, every=2, keep=2).restore_latest(_abstract(_state(0))) is None


def test_load_params_only(tmp_path):
    _save_steps(tmp_path, [2, 4])
    params = checkpoint.load_params(tmp_path, _abstract(_state(0))["params"])
    np.testing.assert_array_equal(params["w"], 4.0)
    np.testing.assert_array_equal(checkpoint.load_params(tmp_path, _abstract(_state(0))["params"], step=2)["w"], 2.0)


def test_load_params_from_a_run_workdir(tmp_path):
    _save_steps(tmp_path / "checkpoints", [2, 4])
    np.testing.assert_array_equal(checkpoint.load_params(tmp_path, _abstract(_state(0))["params"])["w"], 4.0)

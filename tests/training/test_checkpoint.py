"""Checkpoints: latest restored exactly, keep-last-K, a damaged newest checkpoint is moved aside and the previous one
used, a checkpoint of another config or other shapes refused with nothing changed, resuming on another process count,
params-only loading."""

import json
import pathlib
import re

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


CONFIG = {"steps": 10, "batch_size": 8, "model": {"d_model": 4}}


def _save_steps(directory, steps, keep=2, config=CONFIG):
    saver = checkpoint.Checkpointer(directory, every=2, keep=keep)
    for step in steps:
        saver.save(step, _state(step), [{"produced": step}], config)
    saver.wait()
    return saver


def _step_names(directory):
    return sorted(path.name for path in pathlib.Path(directory).iterdir())


def test_restores_the_latest_and_keeps_the_last_k(tmp_path):
    saver = _save_steps(tmp_path, [2, 4, 6])
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 6]
    state, data_state = saver.restore_latest(_abstract(_state(0)), CONFIG)
    assert data_state == [{"produced": 6}]
    for name in ("params", "opt_state", "step", "rng"):
        jax.tree.map(np.testing.assert_array_equal, state[name], _state(6)[name])
    # Each process writes its own iterator state; the config is saved alongside.
    assert json.loads((tmp_path / "6" / "data" / "process_0-of-1.json").read_text()) == [{"produced": 6}]
    assert json.loads((tmp_path / "6" / "config" / "metadata").read_text()) == CONFIG


def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, caplog):
    saver = _save_steps(tmp_path, [2, 4, 6], keep=3)
    for path in (tmp_path / "6" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    state, data_state = saver.restore_latest(_abstract(_state(0)), CONFIG)
    assert data_state == [{"produced": 4}]
    np.testing.assert_array_equal(state["params"]["w"], 4.0)
    (aside,) = [name for name in _step_names(tmp_path) if name.startswith("6.")]
    assert re.fullmatch(r"6\.damaged-\d{8}T\d{6}Z", aside) and _step_names(tmp_path) == ["2", "4", aside]
    assert "checkpoint step 6 does not restore (" in caplog.text and f"moved it to {tmp_path / aside}" in caplog.text
    # The moved directory is no step to orbax, and step 6 saves again (it failed with "already exists" before).
    saver.save(6, _state(6), [{"produced": 6}], CONFIG)
    saver.wait()
    assert checkpoint.Checkpointer(tmp_path, every=2, keep=3).manager.all_steps() == [2, 4, 6]
    # A step directory that lost an item (a partial copy) is moved aside as well.
    (tmp_path / "6" / "data" / "process_0-of-1.json").unlink()
    (tmp_path / "4" / "config" / "metadata").unlink()
    state, data_state = checkpoint.Checkpointer(tmp_path, every=2, keep=3).restore_latest(_abstract(_state(0)), CONFIG)
    assert data_state == [{"produced": 2}]
    assert [name.split(".")[0] for name in _step_names(tmp_path)] == ["2", "4", "6", "6"]


def test_a_checkpoint_of_another_config_is_refused_and_nothing_changes(tmp_path):
    _save_steps(tmp_path, [2, 4], config={**CONFIG, "seq_len": 32, "microbatch_size": 4})
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    changed = {**CONFIG, "seq_len": 64, "microbatch_size": 2, "batch_size": 16, "model": {"d_model": 8},
               "steps": 99, "checkpoint_every": 3}
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as error:
        checkpoint.Checkpointer(tmp_path, every=3, keep=2).restore_latest(_abstract(_state(0)), changed)
    message = str(error.value)
    for line in ("batch_size: 8 in the checkpoint, 16 now", "microbatch_size: 4 in the checkpoint, 2 now",
                 "seq_len: 32 in the checkpoint, 64 now", "model.d_model: 4 in the checkpoint, 8 now"):
        assert line in message
    assert "steps" not in message.split("these differ")[1].replace("_steps", "")  # steps may change
    assert "rerun with the config the checkpoint was saved with" in message
    assert f"--config.init_from.path={tmp_path}" in message and "new --config.workdir" in message
    assert isinstance(error.value, ValueError)  # the CLI prints it as `error: ...`
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


def test_arrays_of_other_shapes_are_incompatible_not_damage(tmp_path):
    _save_steps(tmp_path, [2])
    bigger = {**_state(0), "params": {"w": jnp.zeros((8, 2), jnp.int32)}}
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match=r"params array w: \(\(4, 2\), 'int32'\) in the checkpoint, \(\(8, 2\), 'int32'\) now"):
        checkpoint.Checkpointer(tmp_path, every=2, keep=2).restore_latest(_abstract(bigger), CONFIG)
    assert _step_names(tmp_path) == ["2"]


def test_what_may_change_on_resume():
    saved = {"steps": 10, "log_every": 1, "checkpoint_every": 4, "keep_checkpoints": 3, "workdir": "a",
             "optimizer": {"b1": 0.9, "schedule": {"decay_end": 10}}, "model": {"remat": "none", "d_model": 4},
             "batch_size": 8, "microbatch_size": 8, "seq_len": 32, "seed": 0, "loss": "ce", "data": {"paths": "x"}}
    resumable = {**saved, "steps": 20, "log_every": 5, "checkpoint_every": 3, "keep_checkpoints": 1, "workdir": "b",
                 "optimizer": {"b1": 0.9, "schedule": {"decay_end": 20}}, "model": {"remat": "offload", "d_model": 4}}
    assert checkpoint.resume_differences(saved, resumable) == {}
    not_resumable = {**saved, "optimizer": {"b1": 0.8, "schedule": {"decay_end": 10}}, "seed": 1, "loss": "jsd",
                     "data": {"paths": "y"}, "seq_len": 16}
    assert checkpoint.resume_differences(saved, not_resumable) == {
        "data.paths": ("x", "y"), "loss": ("ce", "jsd"), "optimizer.b1": (0.9, 0.8), "seed": (0, 1),
        "seq_len": (32, 16)}


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
        checkpoint.Checkpointer(tmp_path, every=2, keep=2).restore_latest(_abstract(_state(0)), CONFIG)
    state, data_state = checkpoint.Checkpointer(tmp_path, every=2, keep=2, same_data_state_on_every_process=True
                                                ).restore_latest(_abstract(_state(0)), CONFIG)
    assert data_state == [{"produced": 4}]
    np.testing.assert_array_equal(state["params"]["w"], 4.0)
    np.testing.assert_array_equal(state["opt_state"]["mu"], -4.0)


def test_no_checkpoint_gives_none(tmp_path):
    assert checkpoint.Checkpointer(tmp_path, every=2, keep=2).restore_latest(_abstract(_state(0)), CONFIG) is None


def test_load_params_only(tmp_path):
    _save_steps(tmp_path, [2, 4])
    params = checkpoint.load_params(tmp_path, _abstract(_state(0))["params"])
    np.testing.assert_array_equal(params["w"], 4.0)
    np.testing.assert_array_equal(checkpoint.load_params(tmp_path, _abstract(_state(0))["params"], step=2)["w"], 2.0)


def test_load_params_from_a_run_workdir(tmp_path):
    _save_steps(tmp_path / "checkpoints", [2, 4])
    np.testing.assert_array_equal(checkpoint.load_params(tmp_path, _abstract(_state(0))["params"])["w"], 4.0)

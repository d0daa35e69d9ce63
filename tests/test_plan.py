"""`python -m jaxopd.plan`: the arithmetic of the report against hand-computed figures, the errors of the command line
(unknown topology, no libtpu), and the real TPU compiler (libtpu, part of the `test` extra) on a v5p:2x2x1 slice for
the tiny pretraining and distillation configs and for one that cannot fit."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxopd import plan as plan_lib
from jaxopd.model import load_preset
from jaxopd.training.config import load_config_file
from jaxopd.training.flops import count_params, flops_per_token

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30
V5P_PEAK, V5P_BANDWIDTH = 459e12, 2765e9  # cloud.google.com/tpu/docs/v5p


def _plan(*args: str, without_libtpu: bool = False) -> subprocess.CompletedProcess:
    """The command, in a subprocess (as a user runs it); `without_libtpu` makes it see no libtpu."""
    patch = "p.libtpu_available = lambda: False; " if without_libtpu else ""
    code = f"import sys, jaxopd.plan as p; {patch}sys.argv[0] = 'jaxopd.plan'; p.run()"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def _summary(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["v5p", "v9:2x2", "v5p:2x2x", "tpu-v5p:2x2x1", "v5p:0x2x1", "v5p:2x2x1x1"])
def test_a_name_that_is_no_slice_names_the_valid_forms(name):
    with pytest.raises(plan_lib.PlanError, match=r"chip one of v4, v5e, v5p, v6e.*v5p:2x2x1"):
        plan_lib.parse_topology(name)


def test_the_chip_table():
    assert plan_lib.parse_topology("v5p:8x16x16") == plan_lib.Chip(95, 459e12, 2765e9)
    assert plan_lib.parse_topology("v5e:16x16").hbm_gib == 16
    assert plan_lib.parse_topology("v6e:2x2").peak_flops == 918e12
    assert plan_lib.parse_topology("v4:2x2x1").hbm_bytes_per_second == 1200e9


def test_without_libtpu_it_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(plan_lib, "libtpu_available", lambda: False)
    with pytest.raises(plan_lib.PlanError, match=r"pip install 'jaxopd\[tpu\]'"):
        plan_lib.topology_devices("v5p:2x2x1")
    result = _plan("--config=tiny_pretrain", "--topology=v5p:2x2x1", without_libtpu=True)
    assert result.returncode == 2, result.stderr
    assert "libtpu" in result.stderr and "pip install 'jaxopd[tpu]'" in result.stderr
    assert result.stdout == ""


def test_command_line_errors_exit_2_naming_the_fix():
    missing = _plan("--config=tiny_pretrain")
    assert missing.returncode == 2 and "--topology is required" in missing.stderr
    unknown = _plan("--config=tiny_pretrain", "--topology=v7x:2x2x1")
    assert unknown.returncode == 2 and "chip one of v4, v5e, v5p, v6e" in unknown.stderr


def _program(name, args_gib, temps_gib, flops, bytes_accessed, calls=1, resident_gib=0.0):
    return plan_lib.Program(name, calls, int(args_gib * GIB), int(temps_gib * GIB), 0, int(resident_gib * GIB),
                            flops, bytes_accessed, compile_seconds=2.0)


def test_report_figures_by_hand():
    """Two programs on a 4-chip v5p: one compute-bound, one bandwidth-bound called 8 times a step."""
    programs = [_program("train step", 30.0, 20.0, flops=9.18e14, bytes_accessed=2.765e11, resident_gib=5.0),
                _program("decode", 1.0, 2.0, flops=4.59e11, bytes_accessed=5.53e11, calls=8)]
    plan = plan_lib.Plan("v5p:2x2x1", plan_lib.CHIPS["v5p"], 4, {"data": 4}, programs)
    # train step: max(9.18e14 / 459e12, 2.765e11 / 2765e9) = max(2 s, 0.1 s); decode: max(1 ms, 0.2 s) x 8.
    assert plan.step_seconds == pytest.approx(2.0 + 8 * 0.2)
    assert plan.mfu_ceiling() == pytest.approx((2.0 + 8 * 1e-3) / 3.6)
    summary = plan.summary()
    assert summary["fits"] is True and summary["chip_hbm_gib"] == 95
    assert summary["hbm_per_chip_gib"] == pytest.approx(55.0, abs=1e-3)
    assert summary["flops_per_step"] == pytest.approx((9.18e14 + 8 * 4.59e11) * 4)
    assert summary["compile_seconds"] == 4.0
    assert summary["programs"]["decode"]["roofline_seconds"] == pytest.approx(0.2)
    assert plan.problems() == []

    over = plan_lib.Plan("v5p:2x2x1", plan_lib.CHIPS["v5p"], 4, {"data": 4},
                         [_program("train step", 40.0, 60.0, 1.0, 1.0)])
    assert not over.fits
    (problem,) = over.problems()
    assert "100.00 GiB per chip" in problem and "biggest part is temporaries (60.00 GiB)" in problem


def test_matmul_flops_count_loop_trips_remat_shard_map_and_ragged_dots():
    """A scan of 5 rematerialized matmuls, a grouped matmul and a shard_map over 4 devices, forward and backward,
    against the FLOPs of each matmul by hand."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()[:4]
    assert len(devices) == 4, "tests/conftest.py gives 8 host devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def f(a, w, experts):
        c, _ = jax.lax.scan(jax.checkpoint(lambda c, _: (jnp.tanh(c @ w), None)), a, None, length=5)
        grouped = jax.lax.ragged_dot(c, experts, jnp.array([3, 5], jnp.int32))
        gram = jax.shard_map(lambda u: u @ u.T, mesh=mesh, in_specs=P("x"), out_specs=P("x"))(c)
        return gram.sum() + grouped.sum()

    args = (jnp.ones((8, 16)), jnp.ones((16, 16)), jnp.ones((2, 16, 4)))
    with jax.set_mesh(mesh):
        forward = jax.jit(f).trace(*args).jaxpr.jaxpr
        backward = jax.jit(jax.grad(f, argnums=(0, 1, 2))).trace(*args).jaxpr.jaxpr
    scan, grouped, gram = 2 * 8 * 16 * 16, 2 * 8 * 16 * 4, 4 * (2 * 2 * 2 * 16)  # gram: [2, 16] per device, 4 of them
    assert plan_lib._matmul_flops(forward) == 5 * scan + grouped + gram
    assert plan_lib._matmul_flops(forward, loops=False) == scan + grouped + gram
    # Backward: the forward, its scan recomputed (remat), two matmuls per forward one (the grouped matmul's weight
    # gradient is one row per group's block, not every row times every group).
    assert plan_lib._matmul_flops(backward) == (5 * scan + grouped + gram) + 5 * scan + 2 * (5 * scan + grouped + gram)


def test_matmul_flops_of_a_shard_map_manual_over_one_axis_of_two():
    """Context parallelism's shard_map is manual over one mesh axis only: its body runs once per device of that axis,
    the other axis's sharding staying automatic (its body sees that axis whole)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    gram = lambda x: jax.shard_map(lambda u: jnp.einsum("btd,bsd->bts", u, u), mesh=mesh, in_specs=P(None, "context"),
                                   out_specs=P(None, "context"), axis_names={"context"})(x)
    with jax.set_mesh(mesh):
        traced = jax.jit(gram).trace(jnp.ones((6, 8, 16))).jaxpr.jaxpr
    assert plan_lib._matmul_flops(traced) == 4 * (2 * 6 * 2 * 2 * 16)  # [6, 2, 2] outputs of 16 products, 4 blocks


@pytest.fixture
def libtpu():
    if not plan_lib.libtpu_available():  # a failure, not a skip: the `test` extra brings libtpu
        pytest.fail("libtpu is not installed: pip install -e '.[test]' (its jax[tpu] brings the TPU compiler)")


@pytest.mark.slow
def test_tiny_pretraining_fits_v5p_2x2x1(libtpu):
    # Scanned layers inside 2 accumulated microbatches: loops whose bodies XLA's cost analysis counts once.
    result = _plan("--config=tiny_pretrain", "--topology=v5p:2x2x1", "--config.model.scan_layers=True",
                   "--config.microbatch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train step" in result.stdout and "of HBM" in result.stdout
    summary = _summary(result)
    assert summary["fits"] is True and summary["chips"] == 4 and summary["mesh"]["data"] == 4
    step = summary["programs"]["train step"]
    # Arguments: the replicated state (fp32 params + Adam's two fp32 moments, 12 bytes a param) and this chip's
    # quarter of the batch (5 arrays of 4 bytes, 16 x 128 tokens); TPU memory tiles pad small arrays (norm scales,
    # biases) by a few percent here.
    config = load_preset("tiny")
    expected = 12 * count_params(config)["total"] + 5 * 4 * 16 * 128 / 4
    assert expected <= step["arguments_gib"] * GIB <= 1.1 * expected
    # The model's own work (6 FLOPs per parameter and token, plus attention) is a floor for the compiler's count and
    # for the traced matmuls', which hold it all, every layer and microbatch, with the attention logits of full
    # rows (the analytic count takes half for causal masking) on top.
    analytic = flops_per_token(config, 128, training=True) * 16 * 128
    assert summary["flops_per_step"] >= analytic
    assert analytic <= summary["matmul_flops_per_step"] <= 1.5 * analytic
    assert summary["step_seconds_lower_bound"] >= summary["flops_per_step"] / 4 / V5P_PEAK
    assert summary["compile_seconds"] > 0 and 0 < summary["mfu_ceiling"] <= 1


@pytest.mark.slow
def test_tiny_distillation_fits_v5p_2x2x1(libtpu):
    # The run samples 128 rows and scores 256 at a time (map_row_chunks): each program is planned on one chunk and
    # called once per chunk of the 512 rollouts.
    result = _plan("--config=tiny_distill", "--topology=v5p:2x2x1", "--config.distill.sampling_microbatch=128",
                   "--config.distill.scoring_microbatch=256")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(result)
    programs = summary["programs"]
    assert list(programs) == ["student sampler prefill", "student sampler decode step", "teacher scoring",
                              "train step"]
    assert programs["student sampler prefill"]["calls"] == 512 // 128
    assert programs["student sampler decode step"]["calls"] == 5 * 512 // 128  # distill.max_new_tokens per chunk
    assert programs["teacher scoring"]["calls"] == 512 // 256
    assert summary["fits"] is True
    assert summary["hbm_per_chip_gib"] == max(p["total_gib"] for p in programs.values())
    per_call = sum(p["flops_per_chip"] * p["calls"] for p in programs.values()) * 4
    assert summary["flops_per_step"] == pytest.approx(per_call)
    # The decode step's arguments hold this chip's quarter of one chunk's KV cache: keys and values of 128 rows x
    # 13 positions x 2 layers x 2 heads x 12 in float32, beside the student's replicated params.
    student = load_config_file("tiny_distill").model
    cache = 2 * 128 * (8 + 5) * student.num_layers * student.num_kv_heads * student.head_dim * 4 / 4
    decode_args = programs["student sampler decode step"]["arguments_gib"] * GIB
    assert cache <= decode_args < cache + programs["train step"]["arguments_gib"] * GIB


def test_the_student_architecture_comes_from_init_from_path():
    # tiny_distill's student checkpoint has 2 layers: a config saying 7 contradicts it, and the plan says so before
    # it compiles anything, as the trainer does (init_from.resolve).
    result = _plan("--config=tiny_distill", "--topology=v5p:2x2x1", "--config.model.num_layers=7")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.num_layers=7 contradicts the checkpoint" in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_an_oversized_config_does_not_fit_and_names_its_biggest_part(libtpu):
    # A 2^26-token vocabulary: embeddings of 2^26 x 128, over 8B parameters of 12 bytes each, replicated; one layer
    # and no MTP module keep the compile short.
    sizes = dict(vocab_size=2**26, num_layers=1, mtp_depth=0)
    result = _plan("--config=tiny_pretrain", "--topology=v5p:2x2x1", "--config.batch_size=4",
                   "--config.microbatch_size=4", "--config.seq_len=32",
                   *(f"--config.model.{key}={value}" for key, value in sizes.items()))
    assert result.returncode == 1, result.stderr[-3000:]
    summary = _summary(result)
    assert summary["fits"] is False and summary["hbm_per_chip_gib"] > summary["chip_hbm_gib"] == 95
    assert "train step needs" in result.stdout and "biggest part is arguments" in result.stdout
    arguments = summary["programs"]["train step"]["arguments_gib"]
    assert arguments * GIB >= 12 * count_params(load_preset("tiny").replace(**sizes))["total"]
    assert math.isfinite(summary["flops_per_step"]) and summary["flops_per_step"] > 0

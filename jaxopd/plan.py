"""`python -m jaxopd.plan --config=<run config> --topology=<chip>:<shape> [--config.a.b=v ...]`: will a run fit a TPU
slice, before you have one?

The run's own programs are compiled by the TPU compiler (libtpu, which runs on any machine: `pip install
'jaxopd[tpu]'`) for the chips of the named slice, on the config's mesh over that slice's devices, from shape structs
alone: no array is allocated, no checkpoint's params are read. A pretraining config compiles its train step; a
distillation config also the sampler's prefill and one decode step (for the student, or the teacher with
"teacher_sft"), the teacher's scoring of the rollouts (its architecture read from its checkpoint's config), and the
train step on the batch they make. Eval programs are not planned (they run between steps, on the same params).

Per program and chip it prints HBM: arguments, temporaries, outputs (less what aliases donated arguments) and what
stays resident from the other programs (the train state and the teacher's params live across the whole step), their
total against the chip's HBM; the FLOPs per chip and call (the compiler's, its loops' bodies counted once per trip,
or the traced matmuls' even share where that is more: see compile_program); compile seconds; and the roofline lower
bound on the program's time, max(FLOPs / peak, bytes accessed / HBM bandwidth), with the MFU ceiling that bound
implies (compute time over the bound; rematerialized work is counted). A step is one call of each program per
sampling (scoring) chunk, `max_new_tokens` calls of the decode step per chunk: completions that stop early make it
shorter. The step line also gives the matmul FLOPs counted from the traced programs.

The last line is one JSON object (`fits`, `hbm_per_chip_gib`, `chip_hbm_gib`, `flops_per_step`,
`matmul_flops_per_step`, `compile_seconds`, `step_seconds_lower_bound`, `mfu_ceiling`, `programs`). Exit status 0
when every program fits, 1 when one does not (the message names its biggest part), 2 for a bad command line,
config or missing libtpu.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional

import jax
import jax.extend
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxopd.bundled import resolve_path
from jaxopd.data.pipeline import BATCH_KEYS
from jaxopd.distill import objectives as distill_objectives, teacher as teacher_lib
from jaxopd.distill.sampling import SampleOutput, Sampler, sequence_layout
from jaxopd.model import Transformer, unembedding
from jaxopd.train import OBJECTIVES
from jaxopd.training import config as config_lib, init_from, sharding
from jaxopd.training.config import RunConfig
from jaxopd.training.optimizer import make_optimizer
from jaxopd.training.state import jit_train_step, state_layout

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_second: float


# Per chip, from the Google Cloud TPU system architecture pages (HBM capacity, bf16 peak compute, HBM bandwidth):
#   v4:  https://cloud.google.com/tpu/docs/v4  "32 GiB, 1200 GBps", "275 teraflops (bf16 or int8)"
#   v5e: https://cloud.google.com/tpu/docs/v5e "16 GB, 819 GBps", "197 TFLOPs"
#   v5p: https://cloud.google.com/tpu/docs/v5p "95GB, 2765 GBps", "459 TFLOPs"
#   v6e: https://cloud.google.com/tpu/docs/v6e "32 GB", "1638 GBps", "918 TFLOPs"
# The pages' HBM "GB" are read as GiB (v4's page says GiB; HBM stacks come in binary sizes).
CHIPS: dict[str, Chip] = {
    "v4": Chip(32, 275e12, 1200e9),
    "v5e": Chip(16, 197e12, 819e9),
    "v5p": Chip(95, 459e12, 2765e9),
    "v6e": Chip(32, 918e12, 1638e9),
}
TOPOLOGY_FORMS = ("<chip>:<shape>, chip one of " + ", ".join(CHIPS) + ", shape in chips per dimension: "
                  "v4:2x2x1 .. v4:8x8x8, v5p:2x2x1 .. v5p:8x16x16 (3-D), v5e:2x2 .. v5e:16x16, v6e:2x2 .. v6e:16x16 "
                  "(2-D)")
INSTALL_TPU = "pip install 'jaxopd[tpu]' (or pip install 'jax[tpu]' matching your jax version)"


class PlanError(ValueError):
    """A command line, config or environment the plan cannot run with; the message says the fix."""


def parse_topology(name: str) -> Chip:
    """The chip of a topology name such as "v5p:8x16x16"; PlanError naming the valid forms otherwise."""
    chip, _, shape = name.partition(":")
    if chip not in CHIPS or not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){1,2}", shape):
        raise PlanError(f"--topology={name!r} is not a TPU slice name: expected {TOPOLOGY_FORMS}")
    return CHIPS[chip]


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list[jax.Device]:
    """The devices of the named slice, compile-only (libtpu's compiler, no TPU needed)."""
    parse_topology(name)
    if not libtpu_available():
        raise PlanError(f"--topology={name!r} needs the TPU compiler (libtpu), which is not installed: {INSTALL_TPU}")
    from jax.experimental import topologies

    # libtpu locks /tmp/libtpu_lockfile for the process that owns the chips; compiling for compile-only devices owns
    # none, so plans may run side by side (and beside a training process on a TPU VM).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as error:  # libtpu's own message says what it refused (an unknown shape, ...)
        raise PlanError(f"--topology={name!r}: libtpu could not make this slice: {str(error).strip()[:300]} "
                        f"(topologies: {TOPOLOGY_FORMS})") from error


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's per-chip figures (bytes, FLOPs per call) and how often a step calls it."""

    name: str
    calls: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int  # outputs not aliasing a donated argument
    resident_bytes: int  # arrays other programs keep on the chip meanwhile (train state, teacher params)
    flops: float
    bytes_accessed: float
    compile_seconds: float
    matmul_flops: float = 0.0  # all devices' matmul FLOPs per call, counted from the traced program (_matmul_flops)

    def parts(self) -> dict[str, int]:
        return {"arguments": self.argument_bytes, "temporaries": self.temp_bytes, "outputs": self.output_bytes,
                "resident": self.resident_bytes}

    @property
    def total_bytes(self) -> int:
        return sum(self.parts().values())

    def roofline_seconds(self, chip: Chip) -> float:
        return max(self.flops / chip.peak_flops, self.bytes_accessed / chip.hbm_bytes_per_second)


def _sub_jaxprs(value: Any) -> list[Any]:
    """The jaxprs an equation parameter holds (a Jaxpr, a ClosedJaxpr, or a tuple of them: cond's branches)."""
    if isinstance(value, (tuple, list)):
        return [j for item in value for j in _sub_jaxprs(item)]
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    return [value] if isinstance(value, jax.extend.core.Jaxpr) else []


def _matmul_flops(jaxpr: Any, *, loops: bool = True) -> float:
    """The FLOPs (2 per multiply-add) of the matmuls a traced program runs, all devices together: dot_general and
    ragged_dot_general (every row of its left side, filled or not), a scan's body `length` times (once with
    loops=False, as XLA's cost analysis counts a loop's body), a shard_map's body once per device of its manual
    axes, a cond's costliest branch, a while loop's body once (its trip count is not static). Rematerialized work
    is counted: the backward pass holds the recomputed forward."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "ragged_dot_general"):
            lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            if name == "dot_general":
                numbers = eqn.params["dimension_numbers"]
            else:
                ragged = eqn.params["ragged_dot_dimension_numbers"]
                numbers = ragged.dot_dimension_numbers
            (contracting, _), _ = numbers
            flops = 2.0 * math.prod(out) * math.prod(lhs[i] for i in contracting)
            if name == "ragged_dot_general" and not ragged.rhs_group_dimensions:
                # Ragged contracting dimension (the weights' gradient): the output holds one block per group and
                # each row feeds only its group's.
                flops /= out[0]
            total += flops
            continue
        inner = [_matmul_flops(j, loops=loops) for value in eqn.params.values() for j in _sub_jaxprs(value)]
        if name == "scan":
            total += (eqn.params["length"] if loops else 1) * sum(inner)
        elif name == "shard_map":
            # Only the axes this shard_map makes manual split its body (context parallelism's is one axis of
            # several); jax names them "newly_manual_axes" (0.10), "manual_axes" before.
            mesh = eqn.params["mesh"]
            axes = eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes", mesh.axis_names))
            total += math.prod(mesh.shape[axis] for axis in axes) * sum(inner)
        elif name == "cond":
            total += max(inner, default=0.0)
        else:
            total += sum(inner)
    return total


def compile_program(name: str, jitted: Any, args: tuple, mesh: jax.sharding.Mesh, *, calls: int = 1,
                    resident_bytes: int = 0) -> tuple[Program, Any]:
    """(its Program, the compiled executable) for `jitted` lowered on shape structs `args` inside the mesh.

    XLA's cost analysis counts a loop's body once (the train step's microbatch scan, the scanned layers inside it):
    its FLOPs and bytes accessed are scaled by how many times more matmul work the traced program does with every
    loop trip counted than with each body once (the bytes on the assumption that they repeat as the FLOPs do). The
    Program's FLOPs are that count or the traced matmuls' even share per chip, whichever is more."""
    start = time.perf_counter()
    with sharding.mesh_context(mesh):
        traced = jitted.trace(*args)
        lowered = traced.lower()
    matmul_flops = _matmul_flops(traced.jaxpr.jaxpr)
    once = _matmul_flops(traced.jaxpr.jaxpr, loops=False)
    loop_scale = matmul_flops / once if once else 1.0
    # libtpu's count misses matmul work the program does (Llama 3.1 8B's step: 8.9e16 FLOPs where its traced
    # matmuls hold 1.54e17, what 6 x params x tokens plus attention and the remat recompute make): the work per chip
    # is at least the matmuls' even share.
    matmul_share = matmul_flops / mesh.size
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # Over the chip's HBM: compiled again past the compiler's own out-of-memory stop, for the figures.
        compiled = lowered.compile(compiler_options={"xla_tpu_no_crash_on_oom": True})
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax returns one dict per device program
    program = Program(name, calls, int(memory.argument_size_in_bytes), int(memory.temp_size_in_bytes),
                      int(memory.output_size_in_bytes - memory.alias_size_in_bytes), int(resident_bytes),
                      max(loop_scale * float(cost.get("flops", 0.0)), matmul_share),
                      loop_scale * float(cost.get("bytes accessed", 0.0)), seconds, matmul_flops)
    return program, compiled


def _device_bytes(structs: Any) -> int:
    return sharding.bytes_per_device(structs, jax.tree.map(lambda x: x.sharding, structs))


def _structs(shapes: Any, shardings: Any) -> Any:
    """Shape structs `shapes` carrying `shardings` (one sharding for every leaf, or a matching tree)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, shapes)
    return sharding.abstract_arrays(shapes, shardings)


def _pretraining_batch(config: RunConfig, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch at its full size (the batch ramp's largest), as the pipeline makes it (BATCH_KEYS)."""
    shape = (config.accumulation_steps, config.microbatch_size, config.seq_len)
    return {key: jax.ShapeDtypeStruct(shape, np.float32 if key == "loss_mask" else np.int32,
                                      sharding=sharding.batch_sharding(mesh, leading_axes=1)) for key in BATCH_KEYS}


def _calls_of(rows: int, chunk: int) -> tuple[int, int]:
    """(rows per call, calls per step) of a program the run maps over `rows` in chunks of `chunk` (0: one call)."""
    per_call = chunk if 0 < chunk < rows else rows
    return per_call, rows // per_call


def _distillation_programs(config: RunConfig, mesh: jax.sharding.Mesh, student: Transformer, state: Any,
                           state_bytes: int) -> tuple[list[Program], dict[str, Any], int]:
    """The sampler's prefill and decode step, the teacher's scoring (unless the objective has none), the train
    step's batch they make (source.step_batch's layout) and the bytes of teacher arrays resident meanwhile.

    The run maps the sampler over distill.sampling_microbatch rows at a time and the scorer over
    distill.scoring_microbatch (map_row_chunks: one chunk's intermediates live at once), so each is compiled on one
    chunk and called once per chunk."""
    distill, loss = config.distill, config.objective.loss
    teacher = teacher_lib.read_model(resolve_path(distill.teacher))
    teacher_params = teacher_lib.abstract_params(teacher, mesh)
    teacher_bytes = _device_bytes(teacher_params)
    rows, prompt_len, new = config.batch_size, distill.max_prompt_len, distill.max_new_tokens
    sharding.check_batch_divisible(rows, mesh, "batch_size")
    by_row = sharding.batch_sharding(mesh)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32, sharding=by_row)
    sample_rows, sample_calls = _calls_of(rows, distill.sampling_microbatch)
    sharding.check_batch_divisible(sample_rows, mesh, "distill.sampling_microbatch")
    prompts, lengths = i32(sample_rows, prompt_len), i32(sample_rows)
    from_teacher = loss in distill_objectives.TEACHER_SAMPLES
    model, params = (teacher, teacher_params) if from_teacher else (student, state["params"])
    # The resident rest of the step: the train state and the teacher params that are not this program's arguments.
    others = state_bytes + teacher_bytes - _device_bytes(params)
    # Token ids do not change any shape: stop on 0, pad with 0.
    sampler = Sampler(model, prompt_len, new, stop_tokens=(0,), pad_id=0, cache_dtype=distill.kv_cache_dtype)
    who = "teacher" if from_teacher else "student"
    prefill, compiled = compile_program(f"{who} sampler prefill", jax.jit(sampler.prefill), (params, prompts, lengths),
                                        mesh, calls=sample_calls, resident_bytes=others)
    with sharding.mesh_context(mesh):
        logits, cache = jax.eval_shape(sampler.prefill, params, prompts, lengths)
    cache = _structs(cache, compiled.output_shardings[1])
    step_args = (params, i32(sample_rows), i32(sample_rows, 1), i32(sample_rows, 1), cache,
                 jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, PartitionSpec())))
    decode, _ = compile_program(f"{who} sampler decode step", jax.jit(sampler.decode_step, donate_argnums=4),
                                step_args, mesh, calls=new * sample_calls, resident_bytes=others)
    programs = [prefill, decode]

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)

    def layout_of(n: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The rows (prompt + completion, source.step_batch's layout) of `n` rollouts."""
        completions = SampleOutput(tokens=i32(n, new), logprobs=f32(n, new), mask=f32(n, new), lengths=i32(n))
        return _structs(jax.eval_shape(sequence_layout, i32(n, prompt_len), i32(n), completions), by_row)

    layout = layout_of(rows)
    divergence = loss in distill_objectives.DIVERGENCES
    rows_of_step = {**layout, "task_advantages": layout["loss_mask"]}
    if loss in distill_objectives.WITHOUT_TEACHER_SCORES:
        rows_of_step["teacher_logprobs"] = layout["target_sampler_logprobs"]
    else:
        top_k = distill.top_k if loss in distill_objectives.TOPK_DIVERGENCES else 0
        scorer = teacher_lib.make_scorer(teacher, config.objective.loss_chunk_size, return_hidden=divergence,
                                         top_k=top_k, temperature=distill.temperature)
        score_rows, score_calls = _calls_of(rows, distill.scoring_microbatch)
        sharding.check_batch_divisible(score_rows, mesh, "distill.scoring_microbatch")
        scoring, _ = compile_program("teacher scoring", scorer, (teacher_params, layout_of(score_rows)), mesh,
                                     calls=score_calls,
                                     resident_bytes=state_bytes)
        programs.append(scoring)
        with sharding.mesh_context(mesh):
            scores = jax.eval_shape(scorer, teacher_params, layout)
        # step_batch's names for the scorer's outputs
        names = {"logprobs": "teacher_logprobs", "hidden": "teacher_hidden", "topk_ids": "teacher_topk_ids",
                 "topk_logprobs": "teacher_topk_logprobs", "tail_logprob": "teacher_tail_logprob"}
        rows_of_step.update({names[key]: value for key, value in scores.items()})
    micro = config.accumulation_steps
    batch = {key: jax.ShapeDtypeStruct((micro, config.microbatch_size, *value.shape[1:]), value.dtype,
                                       sharding=sharding.batch_sharding(mesh, leading_axes=1))
             for key, value in rows_of_step.items()}
    if divergence:  # the teacher's head, replicated, one copy per microbatch (source.build's teacher_unembed)
        unembed = jax.eval_shape(lambda p: unembedding(p, teacher.config), teacher_params)
        batch["teacher_unembed"] = jax.ShapeDtypeStruct((micro, *unembed.shape), unembed.dtype,
                                                        sharding=NamedSharding(mesh, PartitionSpec()))
    return programs, batch, teacher_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    topology: str
    chip: Chip
    chips: int
    mesh_shape: dict[str, int]
    programs: list[Program]

    @property
    def fits(self) -> bool:
        return all(p.total_bytes <= self.chip.hbm_gib * GIB for p in self.programs)

    @property
    def step_seconds(self) -> float:
        return sum(p.roofline_seconds(self.chip) * p.calls for p in self.programs)

    @property
    def flops_per_step(self) -> float:
        """All chips' FLOPs in one step."""
        return sum(p.flops * p.calls for p in self.programs) * self.chips

    @property
    def matmul_flops_per_step(self) -> float:
        """All chips' matmul FLOPs in one step, counted from the traced programs (a check on the compiler's)."""
        return sum(p.matmul_flops * p.calls for p in self.programs)

    def mfu_ceiling(self, programs: Optional[list[Program]] = None) -> float:
        programs = self.programs if programs is None else programs
        seconds = sum(p.roofline_seconds(self.chip) * p.calls for p in programs)
        compute = sum(p.flops * p.calls for p in programs) / self.chip.peak_flops
        return compute / seconds if seconds else 0.0

    def problems(self) -> list[str]:
        """For each program that does not fit: its total against the chip's HBM and its biggest part."""
        lines = []
        for p in self.programs:
            if p.total_bytes > self.chip.hbm_gib * GIB:
                part, size = max(p.parts().items(), key=lambda item: item[1])
                lines.append(f"{p.name} needs {p.total_bytes / GIB:.2f} GiB per chip, the chip has "
                             f"{self.chip.hbm_gib:g} GiB: its biggest part is {part} ({size / GIB:.2f} GiB); shard "
                             "more (config.mesh), use more chips, lower microbatch_size or seq_len, or remat more")
        return lines

    def summary(self) -> dict[str, Any]:
        return {
            "fits": self.fits, "topology": self.topology, "chips": self.chips, "mesh": self.mesh_shape,
            "hbm_per_chip_gib": round(max(p.total_bytes for p in self.programs) / GIB, 6),
            "chip_hbm_gib": self.chip.hbm_gib, "flops_per_step": self.flops_per_step,
            "matmul_flops_per_step": self.matmul_flops_per_step,
            "compile_seconds": round(sum(p.compile_seconds for p in self.programs), 2),
            "step_seconds_lower_bound": self.step_seconds, "mfu_ceiling": round(self.mfu_ceiling(), 4),
            "programs": {p.name: {"calls": p.calls, **{f"{k}_gib": round(v / GIB, 6) for k, v in p.parts().items()},
                                  "total_gib": round(p.total_bytes / GIB, 6), "flops_per_chip": p.flops,
                                  "matmul_flops": p.matmul_flops,
                                  "bytes_accessed_per_chip": p.bytes_accessed,
                                  "roofline_seconds": p.roofline_seconds(self.chip),
                                  "compile_seconds": round(p.compile_seconds, 2)} for p in self.programs},
        }

    def report(self) -> list[str]:
        """The human-readable table, one row per program."""
        mesh = " x ".join(f"{axis}={size}" for axis, size in self.mesh_shape.items())
        lines = [f"{self.topology}: {self.chips} chips of {self.chip.hbm_gib:g} GiB HBM, "
                 f"{self.chip.peak_flops / 1e12:g} TFLOP/s bf16, {self.chip.hbm_bytes_per_second / 1e9:g} GB/s; "
                 f"mesh {mesh}",
                 f"{'program (per chip)':28s} {'calls':>5s} {'args':>9s} {'temps':>9s} {'outputs':>9s} "
                 f"{'resident':>9s} {'total GiB':>10s} {'of HBM':>7s} {'TFLOP':>9s} {'compile s':>9s} "
                 f"{'roofline':>10s} {'MFU max':>7s}"]
        for p in self.programs:
            gib = [f"{v / GIB:9.3f}" for v in p.parts().values()]
            lines.append(f"{p.name:28s} {p.calls:5d} {' '.join(gib)} {p.total_bytes / GIB:10.3f} "
                         f"{p.total_bytes / (self.chip.hbm_gib * GIB):7.1%} {p.flops / 1e12:9.4f} "
                         f"{p.compile_seconds:9.1f} {_seconds(p.roofline_seconds(self.chip)):>10s} "
                         f"{self.mfu_ceiling([p]):7.1%}")
        lines.append(f"step: {self.flops_per_step:.4g} FLOPs on all chips ({self.matmul_flops_per_step:.4g} in "
                     f"matmuls, traced), roofline lower bound "
                     f"{_seconds(self.step_seconds)}, MFU ceiling {self.mfu_ceiling():.1%}; "
                     + ("fits" if self.fits else "does NOT fit"))
        return lines + self.problems()


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3f} ms" if value < 1 else f"{value:.2f} s"


def plan(config: RunConfig, topology: str) -> Plan:
    """Compiles the run's programs for `topology` (see the module docstring); PlanError/ValueError on a config the
    slice cannot take (mesh sizes, batch divisibility), naming the key."""
    chip = parse_topology(topology)
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_divisible(config.microbatch_size, mesh)
    sharding.check_context_divisible(config.seq_len, mesh)
    model, optimizer = Transformer(config.model), make_optimizer(config.optimizer)
    shapes, shardings = state_layout(model, optimizer, mesh, np.zeros((1, config.seq_len), np.int32))
    state = sharding.abstract_arrays(shapes, shardings)
    state_bytes = _device_bytes(state)
    programs, resident = [], 0
    if config.objective.is_distillation:
        programs, batch, resident = _distillation_programs(config, mesh, model, state, state_bytes)
    else:
        batch = _pretraining_batch(config, mesh)
    step = jit_train_step(model, optimizer, OBJECTIVES[config.objective.loss].objective, config, shardings)
    programs.append(compile_program("train step", step, (state, batch), mesh, resident_bytes=resident)[0])
    return Plan(topology, chip, len(devices), dict(mesh.shape), programs)


def main(argv: list[str]) -> None:
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs reading the teacher's config at INFO
    try:
        if not flags.FLAGS.topology:
            raise PlanError(f"--topology is required: {TOPOLOGY_FORMS}")
        parse_topology(flags.FLAGS.topology)
        # The architectures init_from.path and the teachers hold, as `python -m jaxopd.train` reads them.
        config = config_lib.to_run_config(init_from.resolve(flags.FLAGS.config))
        result = plan(config, flags.FLAGS.topology)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(result.report()))
    print(json.dumps(result.summary()), flush=True)
    sys.exit(0 if result.fits else 1)


def run() -> None:
    """CLI entry: `--help`, the run config flag as `python -m jaxopd.train` has it, and `--topology`."""
    from absl import app, flags

    from jaxopd.train import define_config_flag, wants_help

    if wants_help():
        print(__doc__.split("\n\n")[0] + "\n\n--topology: " + TOPOLOGY_FORMS)
        sys.exit(0)
    # The host side needs no accelerator (the slice's devices are compile-only), and a TPU or GPU backend probed on a
    # machine without one only warns and waits.
    jax.config.update("jax_platforms", "cpu")
    flags.DEFINE_string("topology", "", f"the TPU slice to plan for: {TOPOLOGY_FORMS}")
    define_config_flag()
    app.run(main)


if __name__ == "__main__":
    run()

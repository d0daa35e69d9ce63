"""The teacher: loading any jaxopd or Hugging Face checkpoint onto the mesh, the tokenizer check, and jitted scoring.

A teacher is just another (model, params) pair placed on the student's mesh with the trainer's logical-axis rules
(FSDP/tensor shards), called through a jitted function that returns the log-prob of every given token. Scoring goes
through `losses.token_logprobs` on the model's final hidden states, chunked over the sequence, so the float32
`[batch, seq, vocab]` logits never exist at once.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxopd.distill.sampling import map_row_chunks
from jaxopd.training import checkpoint, init_from, sharding
from jaxopd.training.checkpoint import read_model_fields
from jaxopd.training.config import MeshConfig
from jaxopd.training.state import abstract_params, model_from_dict
from jaxopd.kernels import losses
from jaxopd.model import ModelConfig, Transformer, unembedding

PROBE_TEXT = "The teacher and the student must share a tokenizer: 0123456789 +-*/= (){}[] def f(x): return x\n"
# Chat markup of the common families (ChatML, Llama 3, Llama 2, <think>) and text outside ASCII: tokenizers that
# agree on plain English can still split these differently.
CHAT_PROBE_TEXT = ("<|im_start|>system\nGrüße, 世界! ☃ 𝄞 é<|im_end|>\n<|start_header_id|>user<|end_header_id|>\n\n"
                   "<s>[INST] {{ x }} {% y %} [/INST]</s><think>\n\n</think>\n\n<|eot_id|>\t\r\n")
PROBE_TEXTS = (PROBE_TEXT, CHAT_PROBE_TEXT)


def load_model(path: str | pathlib.Path, mesh: Optional[jax.sharding.Mesh] = None, hf_dtype: str = "float32"
               ) -> tuple[Transformer, Any]:
    """(model, params) from a jaxopd checkpoint directory (a run workdir, its checkpoints/, or one written by
    `save_model`; the newest step, params in their saved dtype) or a Hugging Face checkpoint (params in `hf_dtype`;
    "bfloat16" halves a large teacher's memory on accelerators), params read straight into their shards on `mesh`
    (default: a mesh of all devices, params FSDP-sharded over them)."""
    path = pathlib.Path(path)
    kind = init_from.source_kind(path)
    mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
    if kind == "hf":
        from jaxopd.hf import load_hf

        return load_hf(path, dtype=hf_dtype, mesh=mesh, rules=sharding.LOGICAL_AXIS_RULES)
    step, model_fields = read_model_fields(path)
    model = model_from_dict(model_fields)
    return model, checkpoint.load_params(path, abstract_params(model, mesh), step)


def read_model(path: str | pathlib.Path, hf_dtype: str = "float32") -> Transformer:
    """The model `load_model(path, hf_dtype=hf_dtype)` returns, from the checkpoint's config alone (no params read):
    for planning memory before anything is loaded."""
    if init_from.source_kind(path) == "hf":
        from jaxopd.hf import hf_model_config

        return Transformer(hf_model_config(path, dtype=hf_dtype))
    return model_from_dict(read_model_fields(path)[1])


def save_model(path: str | pathlib.Path, model_fields: dict[str, Any], params: Any, step: int = 0, *,
               overwrite: bool = False) -> pathlib.Path:
    """Writes params (no optimizer state) and `{"model": model_fields}` as a jaxopd checkpoint that `load_model`,
    `checkpoint.load_params` and `config.init_from` (kind "checkpoint") read. An existing directory is replaced
    only with overwrite=True."""
    path = pathlib.Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise ValueError(f"{path} exists; pass overwrite=True to replace it")
        shutil.rmtree(path)
    manager = ocp.CheckpointManager(path, item_handlers={"params": ocp.StandardCheckpointHandler(),
                                                         "config": ocp.JsonCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               config=ocp.args.JsonSave({"model": dict(model_fields)})), force=True)
    manager.wait_until_finished()
    manager.close()
    return path


def check_tokenizers(student_config: ModelConfig, teacher_config: ModelConfig, student_tokenizer: Any,
                     teacher_tokenizer: Any, probes: Sequence[str] = PROBE_TEXTS) -> None:
    """Raises ValueError, before anything is compiled, unless student and teacher score the same token ids and
    prompts: equal model vocabularies, then equal tokenizer vocabularies, special tokens (bos/eos/pad ids and
    spellings), ids of each probe text and chat templates. The message names both tokenizers and the first
    difference."""
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ValueError(f"student vocab_size={student_config.vocab_size} != teacher vocab_size="
                         f"{teacher_config.vocab_size}: on-policy distillation scores the student's token ids with the "
                         "teacher, so both models need the same tokenizer; pick a teacher of the student's family")

    def differ(difference: str) -> ValueError:
        return ValueError(f"student tokenizer {student_tokenizer.path} and teacher tokenizer {teacher_tokenizer.path} "
                          f"differ: {difference}; the teacher scores the student's token ids, so distill only between "
                          "models that share a tokenizer (set distill.teacher_tokenizer to the student's if the "
                          "teacher's is the same one saved elsewhere)")

    if student_tokenizer.vocab_size != teacher_tokenizer.vocab_size:
        raise differ(f"the student tokenizer has {student_tokenizer.vocab_size} tokens, the teacher's "
                     f"{teacher_tokenizer.vocab_size}")
    for role in ("bos", "eos", "pad"):
        student_token, teacher_token = (_special_token(tokenizer, role)
                                        for tokenizer in (student_tokenizer, teacher_tokenizer))
        if student_token != teacher_token:
            raise differ(f"{role} token (id, spelling) {student_token} vs {teacher_token}")
    for probe in probes:
        student_ids, teacher_ids = student_tokenizer.encode(probe), teacher_tokenizer.encode(probe)
        if student_ids != teacher_ids:
            first = _first_difference(student_ids, teacher_ids)
            raise differ(f"they encode the probe text {probe!r} differently, first at token {first}: "
                         f"{student_ids[first:first + 4]} vs {teacher_ids[first:first + 4]}")
    student_template, teacher_template = student_tokenizer.chat_template, teacher_tokenizer.chat_template
    if student_template != teacher_template:
        if student_template is None or teacher_template is None:
            raise differ("only the " + ("teacher" if student_template is None else "student") + " has a chat template")
        first = _first_difference(student_template, teacher_template)
        raise differ(f"their chat templates differ first at character {first}: "
                     f"{student_template[first:first + 40]!r} vs {teacher_template[first:first + 40]!r}")
    if student_tokenizer.vocab_size > student_config.vocab_size:
        raise ValueError(f"the tokenizer has {student_tokenizer.vocab_size} tokens but the model only "
                         f"{student_config.vocab_size}; raise model.vocab_size")


def _special_token(tokenizer: Any, role: str) -> tuple[int | None, str | None]:
    token_id = getattr(tokenizer, f"{role}_id")
    return token_id, None if token_id is None else tokenizer.id_to_token(token_id)


def _first_difference(a: Sequence, b: Sequence) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def make_scorer(model: Transformer, chunk_size: int, *, return_hidden: bool = False, top_k: int = 0,
                temperature: float = 1.0, microbatch: int = 0
                ) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
    """score(params, batch) -> {"logprobs": [rows, seq] log-prob of batch["targets"] at each position (float32),
    with return_hidden "hidden": [rows, seq, d] final hidden states, and with top_k > 0 the teacher's top_k most
    likely next tokens under softmax(logits / temperature) (`losses.topk_logprobs`): "topk_ids" [rows, seq, top_k]
    int32, "topk_logprobs" [rows, seq, top_k] and "tail_logprob" [rows, seq]}, jitted. batch: tokens, targets,
    positions, segment_ids `[rows, seq]` (the Batch contract; other keys are ignored); microbatch: rows per forward
    pass (0: all at once; it must divide the rows), so long rows fit. Run it inside `sharding.mesh_context(mesh)`."""
    def score_rows(params, rows):
        features = model.apply({"params": params}, rows["tokens"], segment_ids=rows["segment_ids"],
                               positions=rows["positions"], method="features")
        unembed = unembedding(params, model.config)
        result = {"logprobs": losses.token_logprobs(features.hidden, unembed, rows["targets"], chunk_size=chunk_size)}
        if return_hidden:
            result["hidden"] = features.hidden
        if top_k:
            result["topk_ids"], result["topk_logprobs"], result["tail_logprob"] = losses.topk_logprobs(
                features.hidden, unembed, top_k=top_k, chunk_size=chunk_size, temperature=temperature)
        return result

    def score(params, batch):
        rows = {key: batch[key] for key in ("tokens", "targets", "positions", "segment_ids")}
        return map_row_chunks(lambda chunk: score_rows(params, chunk), rows, microbatch)
    return jax.jit(score)


def score_texts(model: Transformer, params: Any, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                chunk_size: int = 512) -> np.ndarray:
    """Log-probs `[len(completion_ids)]` of each completion token after the prompt, from one forward pass."""
    tokens = np.asarray([list(prompt_ids) + list(completion_ids)], np.int32)
    length = tokens.shape[1]
    batch = {"tokens": tokens, "targets": np.append(tokens[:, 1:], [[0]], axis=1).astype(np.int32),
             "positions": np.arange(length, dtype=np.int32)[None], "segment_ids": np.ones_like(tokens)}
    logprobs = make_scorer(model, chunk_size)(params, batch)["logprobs"]
    return np.asarray(logprobs[0, len(prompt_ids) - 1:length - 1])

"""The top-k divergence losses through the real objective, the trainer and the config checks. References: full
float64 logits of both models, the teacher's top-k found by sorting them."""

import json

import jax
import numpy as np
import pytest

from jaxopd import train
from jaxopd.distill.teacher import make_scorer
from jaxopd.training.config import ConfigError
from tests.distill.test_distill import STUDENT, TEACHER, config_for, init, rollout_batch


def _np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("loss", ["topk_forward_kl", "topk_reverse_kl"])
def test_topk_objectives_match_float64_numpy_on_real_rollouts(loss):
    top_k, temperature = 4, 1.3
    config = config_for(loss, **{"distill.top_k": top_k, "distill.temperature": temperature})
    model, params = init(STUDENT, 3)
    teacher_model, teacher_params = init(TEACHER, 4)
    layout = rollout_batch(model, params, teacher_model, teacher_params)
    scores = make_scorer(teacher_model, 8, top_k=top_k, temperature=temperature)(teacher_params, layout)
    layout.update(teacher_topk_ids=scores["topk_ids"], teacher_topk_logprobs=scores["topk_logprobs"],
                  teacher_tail_logprob=scores["tail_logprob"])
    objective = train.OBJECTIVES[loss].objective
    value, metrics = objective.loss(model, params, layout,
                                    objective.totals(jax.tree.map(lambda x: x[None], layout), config), config)

    def log_probs(m, p):
        logits = m.apply({"params": p}, layout["tokens"], segment_ids=layout["segment_ids"],
                         positions=layout["positions"])
        return _np_log_softmax(np.asarray(logits, np.float64) / temperature)

    log_s, log_t = log_probs(model, params), log_probs(teacher_model, teacher_params)
    ids = np.argsort(-log_t, -1)[..., :top_k]  # the teacher's top-k at each position of the student's sample
    outside = np.ones(log_t.shape, bool)
    np.put_along_axis(outside, ids, False, -1)
    buckets = lambda log_p: np.concatenate([np.take_along_axis(log_p, ids, -1),
                                            np.log((np.exp(log_p) * outside).sum(-1, keepdims=True))], -1)
    p, q = buckets(log_t), buckets(log_s)
    if loss == "topk_reverse_kl":
        p, q = q, p
    per_token = (np.exp(p) * (p - q)).sum(-1)
    mask = np.asarray(layout["loss_mask"])
    np.testing.assert_allclose(float(value), (per_token * mask).sum() / mask.sum(), rtol=1e-4)
    assert float(metrics[loss]) == float(value)


def test_top_k_outside_the_vocabulary_is_a_config_error_naming_the_key():
    config_for("topk_forward_kl", **{"distill.top_k": 17})  # k = vocab: every token its own bucket, no tail
    for top_k in (0, 18):
        with pytest.raises(ConfigError, match=rf"distill.top_k={top_k} must lie in \[1, model.vocab_size=17\]"):
            config_for("topk_reverse_kl", **{"distill.top_k": top_k})
    config_for("reverse_kl", **{"distill.top_k": 0})  # only the top-k losses read it


def test_microbatch_sizes_must_divide_the_rows_of_each_call():
    config_for("reverse_kl", **{"distill.sampling_microbatch": 4, "distill.scoring_microbatch": 8})
    with pytest.raises(ConfigError, match="distill.sampling_microbatch=3 must be 0 .* batch_size=16 and "
                                          "distill.eval_prompts_count=8"):
        config_for("reverse_kl", **{"distill.sampling_microbatch": 3})
    with pytest.raises(ConfigError, match="distill.scoring_microbatch=-1 must be 0"):
        config_for("reverse_kl", **{"distill.scoring_microbatch": -1})


@pytest.mark.slow
def test_training_on_the_topk_loss_lowers_the_exact_eval_reverse_kl(tmp_path):
    loss = "topk_forward_kl"
    # A random student toward the bundled teacher; sampling and scoring in microbatches, a bfloat16 KV cache.
    config = config_for(loss, tmp_path, steps=10, eval_every=10, log_every=5, checkpoint_every=0,
                        **{"distill.top_k": 4, "distill.sampling_microbatch": 4, "distill.scoring_microbatch": 8,
                           "distill.kv_cache_dtype": "bfloat16", "optimizer.schedule.warmup_steps": 1,
                           "optimizer.schedule.decay_start": 1, "optimizer.schedule.decay_end": 10,
                           "optimizer.schedule.peak_lr": 1e-2})
    train.train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval/reverse_kl"] for row in rows if "eval/reverse_kl" in row]
    losses = [row[loss] for row in rows if loss in row]
    assert len(evals) == 2 and evals[1] < 0.95 * evals[0], evals
    assert losses[-1] < losses[0], losses

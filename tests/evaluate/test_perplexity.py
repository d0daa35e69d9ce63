"""Loss by position bucket: the bucketing against a loop, and the CLI's losses against float64 log-softmax."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.evaluate import __main__ as cli
from jaxopd.evaluate.inputs import checkpoint_tokenizer, token_stream
from jaxopd.evaluate.perplexity import bucket_losses, sample_windows


def brute_force_buckets(losses, lengths):
    out, start = [], 1
    for end in lengths:
        total, count = 0.0, 0
        for row in losses:
            for position in range(start, end):
                total += float(row[position])
                count += 1
        out.append((start, end, total / count, count))
        start = end
    return out


def test_bucket_losses_match_a_loop():
    losses = np.random.default_rng(0).exponential(size=(3, 20))
    buckets = bucket_losses(losses, [4, 10, 20])
    for bucket, (start, end, loss, count) in zip(buckets, brute_force_buckets(losses, [4, 10, 20])):
        assert (bucket["start"], bucket["end"], bucket["tokens"]) == (start, end, count)
        assert bucket["loss"] == pytest.approx(loss, rel=1e-12)
        assert bucket["perplexity"] == pytest.approx(np.exp(loss), rel=1e-12)
    for bad in ([], [1, 4], [4, 4], [8, 4]):
        with pytest.raises(ValueError, match="increasing bucket ends"):
            bucket_losses(losses, bad)


def test_windows_follow_the_seed_and_need_enough_text():
    stream = list(range(1000))
    first = sample_windows(stream, 100, 4, seed=0)
    assert first.shape == (4, 100) and (np.diff(first, axis=1) == 1).all()  # contiguous pieces of the stream
    np.testing.assert_array_equal(first, sample_windows(stream, 100, 4, seed=0))
    assert not np.array_equal(first, sample_windows(stream, 100, 4, seed=1))
    with pytest.raises(ValueError, match="fewer than the longest of --lengths"):
        sample_windows(stream, 1001, 1, seed=0)


def test_cli_losses_by_position_past_the_window(tiny_run, tmp_path):
    workdir, model, params = tiny_run
    lengths = [16, 64, 256, 512]  # past max_position_embeddings=256: no flag needed, that is the point
    cli.main(["perplexity", f"--checkpoint={workdir}", "--lengths=16,64,256,512", "--num_sequences=2",
              "--batch_size=2", "--chunk_size=128", f"--output_dir={tmp_path}"])
    result = json.loads((tmp_path / "perplexity.json").read_text())
    assert (tmp_path / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result["max_position_embeddings"], result["trained_seq_len"]) == (256, 128)
    tokenizer = checkpoint_tokenizer(workdir)
    windows = sample_windows(token_stream(tokenizer, "data/corpus/python_stdlib.jsonl.gz", 512), 512, 2, seed=0)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(windows)), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    losses = np.zeros(windows.shape)
    losses[:, 1:] = -np.take_along_axis(log_probs[:, :-1], windows[:, 1:, None], axis=-1)[..., 0]
    for bucket, (start, end, loss, count) in zip(result["buckets"], brute_force_buckets(losses, lengths)):
        assert (bucket["start"], bucket["end"], bucket["tokens"]) == (start, end, count)
        assert bucket["loss"] == pytest.approx(loss, rel=1e-5)


def test_cli_on_a_hugging_face_checkpoint_with_its_own_tokenizer(hf_checkpoint, tmp_path):
    for command in (["perplexity", "--lengths=16,128,256", "--num_sequences=2"],
                    ["niah", "--lengths=96,128", "--depths=0,1"]):
        cli.main(command + [f"--checkpoint={hf_checkpoint}", f"--output_dir={tmp_path}"])
    assert json.loads((tmp_path / "perplexity.json").read_text())["max_position_embeddings"] == 128
    assert len(json.loads((tmp_path / "niah.json").read_text())["cases"]) == 4

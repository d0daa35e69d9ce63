"""MTP speculative sampling with its decode cache grown in buckets (the default) against one cache of
max_prompt_len + max_new_tokens + 1 slots from the first step, in one process, on the same random-weight model.

A Qwen3-shaped dense model with one MTP block (6 layers, d 256, GQA 8/2 heads of 32, vocab 4096, float32), 16 random
32-token prompts, greedy, no stop tokens (every row runs `new` tokens). Each sampler is called once to compile,
then twice alternating with the other; tokens/s from the faster call. Tokens are checked identical.

    JAX_PLATFORMS=cpu python -m benchmarks.speculative_cache_growth [--new 1024]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.distill import sampling
from jaxopd.distill.speculative import SpeculativeSampler
from jaxopd.model import Transformer
from jaxopd.model.config import ModelConfig

WHOLE_CACHE = 10**9  # a first bucket past max_new_tokens: one cache for the whole run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    config = ModelConfig(vocab_size=4096, d_model=256, num_layers=6, num_heads=8, num_kv_heads=2, head_dim=32,
                         attention="gqa", mlp_dim=768, mtp_depth=1, max_position_embeddings=4096, dtype="float32",
                         param_dtype="float32")
    model = Transformer(config)
    prompts = np.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, 32)), np.int32)
    lengths = np.full(args.batch, 32, np.int32)
    params = model.init(jax.random.key(0), jnp.asarray(prompts))["params"]

    def call(sampler, first_bucket):
        sampling.FIRST_CACHE_BUCKET = first_bucket  # read when the sampler traces (first call) only
        start = time.perf_counter()
        out = sampler(params, prompts, lengths, jax.random.key(1), greedy=True)
        tokens = np.asarray(out.tokens)
        return time.perf_counter() - start, tokens

    samplers = {"grown": (SpeculativeSampler(model, 32, args.new, (), 0), 64),
                "whole": (SpeculativeSampler(model, 32, args.new, (), 0), WHOLE_CACHE)}
    tokens = {name: call(sampler, first)[1] for name, (sampler, first) in samplers.items()}
    assert (tokens["grown"] == tokens["whole"]).all(), "grown and whole caches sampled different tokens"
    seconds = {name: [] for name in samplers}
    for _ in range(2):
        for name, (sampler, first) in samplers.items():
            seconds[name].append(call(sampler, first)[0])
    for name, times in seconds.items():
        print(f"{name}: {[round(t, 2) for t in times]} s, {args.batch * args.new / min(times):.0f} tok/s")
    print(f"grown / whole: {min(seconds['whole']) / min(seconds['grown']):.2f}x, tokens identical")


if __name__ == "__main__":
    main()

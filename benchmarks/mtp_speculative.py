"""MTP self-speculative sampling against the plain sampler: tokens/s, acceptance rate and the cost of one
speculative step, on a model trained with its MTP loss (tiny_pretrain's workdir), in one process.

Prompts are the first `--prompt` tokens of `--batch` documents of the training corpus; completions stop on EOS or
after `--new` tokens. Greedy and temperature 1, each sampler called `--repeats` times alternating with the other,
after one compiling call each; tokens/s = completion tokens (mask sum) / median seconds. Greedy speculative tokens
are checked equal to the plain ones. The step costs: the plain decode step (1 token through the main model) against
the speculative step's model work (2 tokens through the main model, then 2 through the MTP block), each jitted alone
and timed over `--step-calls` calls: with acceptance rate a, a speculative step emits 1 + a tokens, so the speedup
bound is (1 + a) * plain_step / speculative_step.

    python -m jaxopd.train --config=tiny_pretrain --config.workdir=/tmp/mtpspec2/pretrain
    python -m benchmarks.mtp_speculative --workdir /tmp/mtpspec2/pretrain [--batch 16 --prompt 32 --new 64]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.distill.sampling import Sampler, left_pad
from jaxopd.distill.speculative import SpeculativeSampler, acceptance_rate
from jaxopd.distill.teacher import load_model
from jaxopd.model.cache import init_cache


def corpus_prompts(path: str, tokenizer, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens (BOS first) of the last `count` documents of at least that many tokens."""
    prompts = []
    with gzip.open(path, "rt") as rows:
        texts = [json.loads(line)["text"] for line in rows]
    for text in reversed(texts):
        ids = [tokenizer.bos_id] + tokenizer.encode(text)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"{path} has fewer than {count} documents of {length} tokens")


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def step_costs(model, params, batch: int, prompt: int, calls: int) -> tuple[float, float]:
    """Median seconds of the plain decode step and of the speculative step's model work, at a cache of
    `prompt` tokens per row (the rest of each step, the token choice, is the same size in both)."""
    config = model.config
    cache = init_cache(config, batch, prompt + 8, "auto", mtp=True)
    tokens = jnp.ones((batch, prompt), jnp.int32)
    _, cache = model.apply({"params": params}, tokens, cache=cache, method="decode")
    slot = jnp.full(batch, prompt, jnp.int32)

    @jax.jit
    def plain(params, cache):
        return model.apply({"params": params}, jnp.ones((batch, 1), jnp.int32), cache=cache, cache_index=slot,
                           method="decode")[0]

    @jax.jit
    def speculative(params, cache):
        pair = jnp.ones((batch, 2), jnp.int32)
        segments = jnp.ones((batch, 2), jnp.int32)
        positions = slot[:, None] + jnp.arange(2)
        hidden, cache = model.apply({"params": params}, pair, segments, positions, cache, slot, method="decode_hidden")
        logits = model.apply({"params": params}, hidden, method="logits")
        mtp_logits, _ = model.apply({"params": params}, hidden, pair, segments, positions, cache, slot,
                                    method="decode_mtp")
        return logits, mtp_logits

    steps = {"plain": plain, "speculative": speculative}
    for fn in steps.values():
        jax.block_until_ready(fn(params, cache))  # compile
    times = {name: [] for name in steps}
    for _ in range(calls):
        for name, fn in steps.items():
            times[name].append(timed(lambda: fn(params, cache))[0])
    return statistics.median(times["plain"]), statistics.median(times["speculative"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/mtpspec2/pretrain")
    parser.add_argument("--corpus", default="data/corpus/python_stdlib.jsonl.gz")
    parser.add_argument("--tokenizer", default="data/tokenizer.model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-calls", type=int, default=30)
    args = parser.parse_args()

    model, params = load_model(args.workdir)
    tokenizer = load_tokenizer(args.tokenizer)
    prompts, lengths = left_pad(corpus_prompts(args.corpus, tokenizer, args.batch, args.prompt), args.prompt,
                                tokenizer.pad_id)
    samplers = {name: cls(model, args.prompt, args.new, (tokenizer.eos_id,), tokenizer.pad_id)
                for name, cls in (("plain", Sampler), ("speculative", SpeculativeSampler))}
    print(f"model: {args.workdir} (mtp_depth={model.config.mtp_depth}), batch {args.batch}, prompt {args.prompt}, "
          f"new {args.new}, devices {jax.devices()}")
    for mode, options in (("greedy", dict(greedy=True)), ("temperature 1", dict(temperature=1.0))):
        call = lambda name, key: samplers[name](params, prompts, lengths, jax.random.key(key), **options)
        outs = {name: call(name, 0) for name in samplers}  # compile
        if mode == "greedy":
            assert np.array_equal(np.asarray(outs["plain"].tokens), np.asarray(outs["speculative"].tokens)), \
                "speculative greedy tokens differ from the plain sampler's"
        seconds, tokens, rates = {name: [] for name in samplers}, {name: [] for name in samplers}, []
        for repeat in range(args.repeats):
            for name in samplers:
                elapsed, out = timed(lambda: call(name, repeat + 1))
                seconds[name].append(elapsed)
                tokens[name].append(int(out.lengths.sum()))
                if name == "speculative":
                    rates.append(acceptance_rate(out))
        speed = {name: statistics.median(t / s for t, s in zip(tokens[name], seconds[name])) for name in samplers}
        print(f"{mode}: plain {speed['plain']:.0f} tokens/s, speculative {speed['speculative']:.0f} tokens/s, "
              f"speedup {speed['speculative'] / speed['plain']:.2f}x, acceptance {statistics.median(rates):.3f} "
              f"(per repeat {', '.join(f'{r:.3f}' for r in rates)}), median seconds plain "
              f"{statistics.median(seconds['plain']):.3f} speculative {statistics.median(seconds['speculative']):.3f}")
    plain_step, speculative_step = step_costs(model, params, args.batch, args.prompt, args.step_calls)
    print(f"step cost: plain decode step {plain_step * 1e3:.2f} ms, speculative step's model work "
          f"{speculative_step * 1e3:.2f} ms, ratio {speculative_step / plain_step:.2f}")


if __name__ == "__main__":
    main()

"""Greedy generation tokens/s: jaxopd's Sampler against transformers' `generate`, on the same random-weight
checkpoints (written by `save_pretrained`, read by `jaxopd.load_hf`), in one process, alternating the two; and the
KV-cache bytes per token each keeps, and for MLA what full heads of the same shape would keep (both MLA
implementations cache the compressed latent and the shared rope key).

Two models: a DeepSeek-V3 shape (MLA, one dense layer then DeepSeekMoE with 16 routed experts top-2 and a shared
one) and a Qwen3 shape (GQA, qk-norm, dense). Prompts are random tokens of one length (no padding, so both sides
decode the same rows); no stop tokens, so both generate exactly `new` tokens a row. Greedy tokens are compared row by
row: random weights leave near-ties that float32 rounding can flip after hundreds of tokens, so the table gives the
share of tokens before each row's first difference.

    python -m benchmarks.generation [--batches 16,64 --new 128,1024 --prompt 32 --repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import jax
import numpy as np
import torch
import transformers

import jaxopd
from jaxopd.distill.sampling import Sampler
from jaxopd.model.cache import init_cache

VOCAB, MAX_POSITIONS = 2048, 2048


def deepseek_v3() -> transformers.PreTrainedModel:
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, moe_intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False))


def qwen3() -> transformers.PreTrainedModel:
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False))


def cache_bytes_per_token(cache) -> float:
    """Bytes of keys/values per cached token of one row, summed over layers (jaxopd's dict, transformers' Cache)."""
    if isinstance(cache, dict):
        arrays = [a for layer in cache["layers"] for a in layer.values()]
        batch, length = cache["segment_ids"].shape
        return sum(a.size * a.dtype.itemsize for a in arrays) / (batch * length)
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    batch, length = tensors[0].shape[0], tensors[0].shape[-2]
    return sum(t.numel() * t.element_size() for t in tensors) / (batch * length)


def full_heads_bytes_per_token(config) -> float:
    """Float32 bytes per token of one row that caching every head's keys and values would take (MLA: its heads'
    up-projected nope+rope keys and values; GQA: its kv heads, which is what it caches)."""
    if config.attention == "mla":
        width = config.num_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    else:
        width = 2 * config.kv_heads * config.gqa_head_dim
    return 4.0 * width * config.num_layers


def agreeing_share(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The share of tokens `[batch, new]` before each row's first difference."""
    differs = ours != theirs
    first = np.where(differs.any(axis=1), differs.argmax(axis=1), ours.shape[1])
    return float(first.sum() / ours.size)


def run(name: str, make, batches: list[int], news: list[int], prompt_len: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    reference = make().eval()
    with torch.no_grad():  # sharpen the random head so greedy choices are rarely near-ties
        reference.lm_head.weight.mul_(4.0)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        with warnings.catch_warnings():  # transformers' DeepSeek-V3 config names an MTP layer it never stores
            warnings.simplefilter("ignore", UserWarning)
            model, params = jaxopd.load_hf(directory, dtype="float32")
    millions = sum(p.numel() for p in reference.parameters()) / 1e6
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        prompts = rng.integers(3, VOCAB, size=(batch, prompt_len)).astype(np.int32)
        lengths = np.full(batch, prompt_len, np.int32)
        for new in news:
            sampler = Sampler(model, prompt_len, new, (), 0)
            ours_call = lambda: jax.block_until_ready(
                sampler(params, prompts, lengths, jax.random.key(0), greedy=True).tokens)
            theirs_call = lambda: reference.generate(torch.from_numpy(prompts).long(), max_new_tokens=new,
                                                     min_new_tokens=new, do_sample=False, eos_token_id=None,
                                                     pad_token_id=0, return_dict_in_generate=True)
            start = time.perf_counter()
            ours_tokens = np.asarray(ours_call())
            compile_s = time.perf_counter() - start
            with torch.inference_mode():
                theirs_out = theirs_call()  # warm-up, and the tokens and cache to compare
            ours_s, theirs_s = [], []
            for _ in range(repeats):  # alternate, so a load change on the machine hits both
                start = time.perf_counter()
                ours_call()
                ours_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                with torch.inference_mode():
                    theirs_call()
                theirs_s.append(time.perf_counter() - start)
            tokens = batch * new
            ours_rate, theirs_rate = tokens / np.median(ours_s), tokens / np.median(theirs_s)
            row = dict(model=name, params_m=millions, batch=batch, new=new, ours=ours_rate, theirs=theirs_rate,
                       ratio=ours_rate / theirs_rate, compile_s=compile_s,
                       agree=agreeing_share(ours_tokens, theirs_out.sequences[:, prompt_len:].numpy()),
                       ours_kv=cache_bytes_per_token(init_cache(model.config, 1, 1, "float32")),
                       theirs_kv=cache_bytes_per_token(theirs_out.cache),
                       full_kv=full_heads_bytes_per_token(model.config))
            print(f"{name} ({millions:.1f}M) batch {batch} x {new} new: jaxopd {ours_rate:,.0f} tok/s, transformers "
                  f"{theirs_rate:,.0f} tok/s, {row['ratio']:.2f}x; greedy tokens agreeing {row['agree']:.3f}; "
                  f"compile {compile_s:.1f} s", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--new", default="128,1024")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="deepseek_v3,qwen3")
    args = parser.parse_args()
    batches, news = [int(b) for b in args.batches.split(",")], [int(n) for n in args.new.split(",")]
    makers = dict(deepseek_v3=deepseek_v3, qwen3=qwen3)
    rows = [row for name in args.models.split(",")
            for row in run(name, makers[name], batches, news, args.prompt, args.repeats)]
    print("\n| model | batch | new tokens | jaxopd tok/s | transformers tok/s | ratio | greedy agreeing | "
          "KV bytes/token jaxopd | transformers | full heads |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({r['params_m']:.1f}M) | {r['batch']} | {r['new']} | {r['ours']:,.0f} | "
              f"{r['theirs']:,.0f} | {r['ratio']:.2f}x | {r['agree']:.3f} | {r['ours_kv']:,.0f} | "
              f"{r['theirs_kv']:,.0f} | {r['full_kv']:,.0f} |")


if __name__ == "__main__":
    main()

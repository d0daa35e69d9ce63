"""Architecture presets: parameter totals of the real param trees (jax.eval_shape allocates nothing) against the
totals the model authors publish."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.model import ModelConfig, Transformer, load_preset


@functools.lru_cache(maxsize=None)
def _param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per top-level entry of the param tree."""
    shapes = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    return {key: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(subtree))
            for key, subtree in shapes["params"].items()}


def _main_and_mtp(config: ModelConfig) -> tuple[int, int]:
    counts = _param_counts(config)
    mtp = sum(n for key, n in counts.items() if key.startswith("mtp_"))
    return sum(counts.values()) - mtp, mtp


# (preset, published figure, what it counts). Sources: DeepSeek-V3 report (671B main model; the HF checkpoint's
# 685B adds the MTP module with its own copies of embedding and head), DeepSeek-V2-Lite model card (15.7B), Qwen3
# model cards (non-embedding 0.44B, 6.95B and 31.2B), Meta's Llama 3.1 8B (8.03B) and Llama 3.2 1B (1.23B).
PUBLISHED = [
    ("deepseek_v3", 671e9, "main"),
    ("deepseek_v3", 685e9, "hf_checkpoint"),
    ("deepseek_v2_lite", 15.7e9, "main"),
    ("qwen3_0_6b", 0.44e9, "non_embedding"),
    ("qwen3_8b", 6.95e9, "non_embedding"),
    ("qwen3_32b", 31.2e9, "non_embedding"),
    ("llama3_8b", 8.03e9, "main"),
    ("llama3_1b", 1.23e9, "main"),
]


@pytest.mark.parametrize("name, published, what", PUBLISHED, ids=[f"{n}-{w}" for n, _, w in PUBLISHED])
def test_preset_param_count_matches_published(name, published, what):
    config = load_preset(name)
    main, mtp = _main_and_mtp(config)
    embedding = config.vocab_size * config.d_model
    got = {
        "main": main,
        "hf_checkpoint": main + mtp + 2 * embedding,
        "non_embedding": main - embedding * (1 if config.tie_embeddings else 2),
    }[what]
    assert abs(got - published) / published < 0.01, f"{name}: {got / 1e9:.3f}B vs published {published / 1e9}B"


def test_tiny_preset_is_a_small_deepseek_model():
    config = load_preset("tiny")
    main, mtp = _main_and_mtp(config)
    assert 1e6 <= main + mtp <= 3e6
    assert config.attention == "mla" and config.num_experts and config.num_expert_groups == 2 and config.mtp_depth == 1


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="deepseek_v3"):
        load_preset("gpt5")

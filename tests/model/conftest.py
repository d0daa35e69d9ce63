"""Tiny configs shared by the model tests (dims small enough that every test runs in seconds on CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.model import ModelConfig, RopeScaling, Transformer

# init_std 0.2 (not 0.02) so that every layer visibly changes the logits: a wiring bug cannot hide under tolerance.
MLA_MOE = ModelConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, attention="mla", q_lora_rank=24,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, rope_layout="interleaved",
    rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=8, mscale=0.8, mscale_all_dim=0.8),
    num_experts=8, num_experts_per_token=2, num_shared_experts=1, moe_mlp_dim=16, first_k_dense=1,
    num_expert_groups=2, topk_groups=1, routed_scaling_factor=2.5, mtp_depth=2, init_std=0.2,
)
# DeepSeek-V2-Lite shape: direct q projection, softmax router without renormalization.
MLA_DIRECT_Q = MLA_MOE.replace(q_lora_rank=None, router_score="softmax", norm_topk_prob=False, num_expert_groups=1,
                               routed_scaling_factor=1.0, num_shared_experts=2, mtp_depth=0)
GQA = ModelConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, qk_norm=True,
    attention_bias=True, rope_theta=500.0, init_std=0.2,
    rope_scaling=RopeScaling("llama3", factor=4.0, original_max_position_embeddings=8),
)
GQA_TIED = GQA.replace(qk_norm=False, attention_bias=False, tie_embeddings=True, num_kv_heads=1)
CONFIGS = {"mla_moe": MLA_MOE, "mla_direct_q": MLA_DIRECT_Q, "gqa": GQA, "gqa_tied": GQA_TIED}


@functools.lru_cache(maxsize=None)
def init_params(config: ModelConfig, seed: int = 0):
    """The model's boxed param tree (structure, dtypes, logical axes from `Transformer.init` via eval_shape), filled
    from numpy: compiling the real init costs seconds per config on CPU and would dominate these tests. Norm scales
    are 1 + noise and balance biases nonzero, so that a misplaced scale or bias changes the outputs."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
        elif "expert_bias" in name:
            value = 0.05 * rng.standard_normal(leaf.shape)
        else:
            value = config.init_std * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes["params"])


def random_tokens(config: ModelConfig, shape, seed: int = 1):
    return jax.random.randint(jax.random.key(seed), shape, 1, config.vocab_size)


@pytest.fixture(params=sorted(CONFIGS))
def config(request):
    return CONFIGS[request.param]

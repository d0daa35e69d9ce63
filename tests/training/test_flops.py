"""Analytic parameter / FLOP counts against hand-listed parameter shapes and DeepSeek's published model sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopd.model
from jaxopd.training import flops
from jaxopd.model.config import ModelConfig

TINY_GQA = ModelConfig(
    vocab_size=50, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=24, qk_norm=True,
    attention_bias=True,
)
TINY_GQA_TIED = TINY_GQA.replace(tie_embeddings=True, qk_norm=False, attention_bias=False, head_dim=None)
TINY_MLA_MOE = ModelConfig(
    vocab_size=50, d_model=16, num_layers=3, num_heads=4, mlp_dim=24, attention="mla", q_lora_rank=12,
    kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=6, num_experts=4, num_experts_per_token=2,
    num_shared_experts=1, moe_mlp_dim=10, first_k_dense=1,
)
TINY_MTP = TINY_MLA_MOE.replace(q_lora_rank=None, mtp_depth=2, num_shared_experts=2)
CONFIGS = {"gqa": TINY_GQA, "gqa_tied": TINY_GQA_TIED, "mla_moe": TINY_MLA_MOE, "mla_moe_mtp": TINY_MTP}

# DeepSeek-V3 (report table / config.json): 61 layers, first 3 dense, 256 routed + 1 shared experts, top-8.
DEEPSEEK_V3 = ModelConfig(
    vocab_size=129280, d_model=7168, num_layers=61, num_heads=128, mlp_dim=18432, attention="mla", q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts=256,
    num_experts_per_token=8, num_shared_experts=1, moe_mlp_dim=2048, first_k_dense=3, num_expert_groups=8,
    topk_groups=4, mtp_depth=1,
)
DEEPSEEK_V2 = DEEPSEEK_V3.replace(
    vocab_size=102400, d_model=5120, num_layers=60, mlp_dim=12288, num_experts=160, num_experts_per_token=6,
    num_shared_experts=2, moe_mlp_dim=1536, first_k_dense=1, mtp_depth=0,
)


def _block_shapes(c, layer):
    """(name, shape, kind) of one decoder block in Hugging Face naming; kind: "dense" (every token), "routed"."""
    d, h = c.d_model, c.num_heads
    shapes = [("input_layernorm", (d,), "dense"), ("post_attention_layernorm", (d,), "dense")]
    if c.attention == "gqa":
        hd, kvh = c.head_dim or d // h, c.num_kv_heads or h
        shapes += [("q_proj", (d, h * hd), "dense"), ("k_proj", (d, kvh * hd), "dense"),
                   ("v_proj", (d, kvh * hd), "dense"), ("o_proj", (h * hd, d), "dense")]
        if c.attention_bias:
            shapes += [("q_bias", (h * hd,), "dense"), ("k_bias", (kvh * hd,), "dense"),
                       ("v_bias", (kvh * hd,), "dense")]
        if c.qk_norm:
            shapes += [("q_norm", (hd,), "dense"), ("k_norm", (hd,), "dense")]
    else:
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            shapes += [("q_a_proj", (d, c.q_lora_rank), "dense"), ("q_a_layernorm", (c.q_lora_rank,), "dense"),
                       ("q_b_proj", (c.q_lora_rank, h, qk), "dense")]
        else:
            shapes += [("q_proj", (d, h, qk), "dense")]
        shapes += [("kv_a_proj_with_mqa", (d, c.kv_lora_rank + c.qk_rope_head_dim), "dense"),
                   ("kv_a_layernorm", (c.kv_lora_rank,), "dense"),
                   ("kv_b_proj", (c.kv_lora_rank, h, c.qk_nope_head_dim + c.v_head_dim), "dense"),
                   ("o_proj", (h, c.v_head_dim, d), "dense")]
    if c.num_experts and layer >= c.first_k_dense:
        shared = c.moe_mlp_dim * c.num_shared_experts
        shapes += [("gate", (d, c.num_experts), "dense"), ("e_score_correction_bias", (c.num_experts,), "dense")]
        shapes += [(f"shared_experts.{n}", s, "dense") for n, s in
                   (("gate_proj", (d, shared)), ("up_proj", (d, shared)), ("down_proj", (shared, d)))]
        shapes += [(f"experts.{n}", s, "routed") for n, s in
                   (("gate_proj", (c.num_experts, d, c.moe_mlp_dim)), ("up_proj", (c.num_experts, d, c.moe_mlp_dim)),
                    ("down_proj", (c.num_experts, c.moe_mlp_dim, d)))]
    else:
        shapes += [("gate_proj", (d, c.mlp_dim), "dense"), ("up_proj", (d, c.mlp_dim), "dense"),
                   ("down_proj", (c.mlp_dim, d), "dense")]
    return shapes


def _hand_count(c):
    """Sums np.prod of every listed shape in float64; routed experts count top_k / num_experts of their size."""
    size = lambda shapes, kinds: sum(np.prod(np.array(s, np.float64)) for _, s, k in shapes if k in kinds)
    d = c.d_model
    top = [("embed_tokens", (c.vocab_size, d), "embedding"), ("norm", (d,), "dense")]
    if not c.tie_embeddings:
        top += [("lm_head", (d, c.vocab_size), "dense")]
    main = top + [s for layer in range(c.num_layers) for s in _block_shapes(c, layer)]
    mtp = []
    for depth in range(c.mtp_depth):
        mtp += [("enorm", (d,), "dense"), ("hnorm", (d,), "dense"), ("eh_proj", (2 * d, d), "dense"),
                ("shared_head.norm", (d,), "dense")] + _block_shapes(c, c.num_layers + depth)
    routed_share = c.num_experts_per_token / c.num_experts if c.num_experts else 0.0
    head = c.vocab_size * d if c.tie_embeddings else 0.0  # a tied head's matmul is still paid per token
    return {
        "total": size(main + mtp, ("dense", "routed", "embedding")),
        "active": size(main, ("dense",)) + routed_share * size(main, ("routed",)) + head,
        "embedding": size(top, ("embedding",)),
        "mtp": size(mtp, ("dense", "routed")),
        "mtp_active": size(mtp, ("dense",)) + routed_share * size(mtp, ("routed",)),
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_count_params_matches_hand_listed_shapes(name):
    got, want = flops.count_params(CONFIGS[name]), _hand_count(CONFIGS[name])
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], (key, got[key], want[key])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_count_params_total_equals_model_param_tree(name):
    config = CONFIGS[name]
    model = jaxopd.model.Transformer(config)
    init = lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    leaves = jax.tree.leaves(jax.eval_shape(init, jax.random.key(0)))
    assert flops.count_params(config)["total"] == sum(int(np.prod(leaf.shape)) for leaf in leaves)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_forward_flops_match_xla_cost_analysis_of_the_model(attention):
    # Dense models only: on CPU the dropless MoE's ragged_dot lowers to a dense product over all experts.
    if attention == "gqa":
        config = ModelConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                             mlp_dim=256)
        qk_dim = v_dim = 32
    else:
        config = ModelConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, mlp_dim=256, attention="mla",
                             q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        qk_dim, v_dim = 24, 16
    seq_len = 64
    # Unrolled: XLA's cost analysis counts a while loop's body once, not once per iteration, so it undercounts a scan.
    config = config.replace(scan_layers=False)
    model = jaxopd.model.Transformer(config)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    compiled = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    # XLA also multiplies the masked (future) half of the score matrix, which flops_per_token rightly leaves out.
    masked_half = config.num_layers * 2 * config.num_heads * (qk_dim + v_dim) * seq_len * seq_len / 2
    analytic = flops.flops_per_token(config, seq_len, training=False) * seq_len + masked_half
    # The remainder is XLA's count of elementwise work (softmax, norms, rope, SwiGLU gating): a few percent.
    assert 1.0 <= xla_flops / analytic < 1.03, (xla_flops, analytic)


def test_deepseek_v3_matches_published_671b_total_37b_activated():
    counts = flops.count_params(DEEPSEEK_V3)
    # Published figures are rounded to the billion: 671B main model, 37B activated (DeepSeek-V3 report, abstract).
    assert 670.5e9 <= counts["total"] - counts["mtp"] < 671.5e9, counts
    assert 36.5e9 <= counts["active"] < 37.5e9, counts
    # The HF checkpoint's MTP layer (~14B, "685B" in all) stores its own embedding and head copies; ours shares them.
    assert 13e9 <= counts["mtp"] + 2 * counts["embedding"] < 14.5e9, counts


def test_deepseek_v2_matches_published_236b_total_21b_activated():
    counts = flops.count_params(DEEPSEEK_V2)
    assert 235.5e9 <= counts["total"] < 236.5e9, counts
    assert 20.5e9 <= counts["active"] < 21.5e9, counts


@pytest.mark.parametrize("name", ["gqa", "mla_moe"])
def test_forward_flops_are_two_per_active_param_plus_causal_attention(name):
    c = CONFIGS[name]
    seq_len = 64
    if c.attention == "gqa":
        qk_dim = v_dim = c.head_dim or c.d_model // c.num_heads
    else:
        qk_dim, v_dim = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    # Sum the score + value multiply-adds over every causal (query, key) pair, then average per token.
    pairs = seq_len * (seq_len + 1) / 2
    attention = c.num_layers * 2 * c.num_heads * (qk_dim + v_dim) * pairs / seq_len
    want = 2 * _hand_count(c)["active"] + attention
    got = flops.flops_per_token(c, seq_len, training=False)
    # The module counts seq_len / 2 keys per query rather than (seq_len + 1) / 2: 1 / seq_len of the attention term.
    np.testing.assert_allclose(got, want, rtol=attention / want / seq_len * 1.01)
    assert flops.flops_per_token(c, seq_len, training=True) == pytest.approx(3 * got)


def test_training_flops_include_mtp_block_and_head():
    seq_len = 32
    without = flops.flops_per_token(TINY_MTP.replace(mtp_depth=0), seq_len, training=True)
    with_mtp = flops.flops_per_token(TINY_MTP, seq_len, training=True)
    hand = _hand_count(TINY_MTP)
    c = TINY_MTP
    attention = 2 * c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len / 2
    per_depth_head = c.vocab_size * c.d_model
    want_extra = 3 * (2 * (hand["mtp_active"] + c.mtp_depth * per_depth_head) + c.mtp_depth * attention)
    assert with_mtp - without == pytest.approx(want_extra)
    assert flops.flops_per_token(TINY_MTP, seq_len, training=False) == flops.flops_per_token(
        TINY_MTP.replace(mtp_depth=0), seq_len, training=False)


def test_decode_flops_use_absorbed_mla_dims_and_sliding_window():
    c = TINY_MLA_MOE
    active = _hand_count(c)["active"]
    # Absorbed MLA attends over the cached latent (kv_lora_rank) plus the shared rope key, values are the latent.
    per_key = 2 * c.num_heads * ((c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank)
    assert flops.decode_flops_per_token(c, 100) == pytest.approx(2 * active + c.num_layers * per_key * 100)
    g = TINY_GQA.replace(sliding_window=16)
    per_key_gqa = 2 * g.num_heads * 2 * g.head_dim
    want = 2 * _hand_count(g)["active"] + g.num_layers * per_key_gqa * 16
    assert flops.decode_flops_per_token(g, 100) == pytest.approx(want)


def test_sliding_window_caps_average_context():
    g = TINY_GQA.replace(sliding_window=8)
    seq_len = 64
    # Query at position x attends to min(x, window) keys; averaged over x in [0, seq_len].
    context = np.mean(np.minimum(np.linspace(0, seq_len, 100001), 8))
    want = 2 * _hand_count(g)["active"] + g.num_layers * 2 * g.num_heads * 2 * g.head_dim * context
    assert flops.flops_per_token(g, seq_len, training=False) == pytest.approx(want, rel=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="attention"):
        flops.count_params(TINY_GQA.replace(attention="mqa"))
    with pytest.raises(ValueError, match="seq_len"):
        flops.flops_per_token(TINY_GQA, 0, training=True)

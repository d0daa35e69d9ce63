"""Transformer forward: shapes/dtypes, param annotations, packed documents, MTP semantics, MoE statistics."""

import contextlib
import functools
import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import get_args

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, GQA, MLA_MOE, init_params, random_tokens

from jaxopd.model import Transformer, moe_layer_paths, unembedding, update_expert_biases
from jaxopd.model.config import RematPolicy
from jaxopd.model.validation import default_positions

# "layers": the stacked axis of scanned layers (the default).
ALLOWED_PARAM_AXES = {"layers", "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "experts", "expert_mlp",
                      "q_lora", "kv_lora", "norm", None}


@functools.partial(jax.jit, static_argnames=("config", "method"))
def _apply(config, params, tokens, segment_ids=None, positions=None, method="__call__"):
    return Transformer(config).apply({"params": params}, tokens, segment_ids, positions, method=method)


def test_shapes_dtypes_and_logits_from_hidden(config):
    config = config.replace(dtype="bfloat16")
    params = init_params(config)
    tokens = random_tokens(config, (2, 7))
    logits = _apply(config, params, tokens)
    assert logits.shape == (2, 7, config.vocab_size) and logits.dtype == jnp.float32
    features = _apply(config, params, tokens, method="features")
    assert features.hidden.shape == (2, 7, config.d_model) and features.hidden.dtype == jnp.bfloat16
    assert len(features.mtp_hidden) == config.mtp_depth
    assert all(h.shape == (2, 7, config.d_model) for h in features.mtp_hidden)
    num_moe = len(moe_layer_paths(config))
    assert features.moe_load.shape == (num_moe, config.num_experts)
    assert features.moe_balance_loss.shape == () and features.moe_balance_loss.dtype == jnp.float32
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
        name = jax.tree_util.keystr(path)
        want = jnp.float32 if ("router" in name or "expert_bias" in name) else jnp.dtype(config.param_dtype)
        assert leaf.dtype == want, name
    # Losses chunk hidden @ unembedding instead of materializing logits: both must agree.
    head = np.asarray(unembedding(params, config).astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(logits, np.asarray(features.hidden, np.float64) @ head, rtol=1e-4, atol=1e-4)


def test_params_carry_only_contract_logical_axes(config):
    params = init_params(config)
    boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in boxed)
    for leaf in boxed:
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= ALLOWED_PARAM_AXES, leaf.names


def test_default_positions_restart_per_segment():
    segment_ids = jnp.array([[0, 0, 1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 2, 2, 0, 0]])
    expected = [[0, 1, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1, 0, 1]]
    np.testing.assert_array_equal(default_positions(segment_ids), expected)


@pytest.mark.parametrize("name", ["mla_moe", "mla_direct_q", "gqa"])
def test_packed_documents_equal_separate_runs(name):
    config = CONFIGS[name]
    params = init_params(config)
    lengths, row = (5, 3, 4), 14  # packed into one row: 12 tokens + 2 padding
    docs = [random_tokens(config, (n,), seed=10 + i) for i, n in enumerate(lengths)]
    tokens = jnp.concatenate(docs + [jnp.zeros(2, jnp.int32)])[None]
    segment_ids = jnp.array([[1] * 5 + [2] * 3 + [3] * 4 + [0] * 2])
    positions = jnp.array([list(range(5)) + list(range(3)) + list(range(4)) + [0, 0]])
    packed = _apply(config, params, tokens, segment_ids, positions, method="features")
    # Each document alone at the start of its own row (the tail of the row is padding, invisible to it).
    alone = _apply(config, params, jnp.stack([jnp.pad(doc, (0, row - len(doc))) for doc in docs]),
                   jnp.array([[1] * n + [0] * (row - n) for n in lengths]), method="features")
    start = 0
    for i, n in enumerate(lengths):
        for packed_h, alone_h in zip((packed.hidden,) + packed.mtp_hidden, (alone.hidden,) + alone.mtp_hidden):
            np.testing.assert_allclose(packed_h[0, start : start + n], alone_h[i, :n], atol=2e-5)
        start += n


def test_mtp_depth_k_at_position_i_reads_token_i_plus_k():
    """mtp_hidden[k-1][:, i] (predicting token i+k+1) depends on tokens <= i+k and on nothing later."""
    config, seq, changed_at = MLA_MOE, 8, 5
    params = init_params(config)
    tokens = random_tokens(config, (1, seq))
    tokens = jnp.concatenate([tokens, tokens.at[0, changed_at].set((tokens[0, changed_at] + 1) % config.vocab_size)])
    features = _apply(config, params, tokens, jnp.ones_like(tokens), method="features")
    moved = lambda h: np.abs(np.asarray(h[0]) - np.asarray(h[1])).max(-1) > 1e-6
    np.testing.assert_array_equal(moved(features.hidden), np.arange(seq) >= changed_at)
    for depth, hidden in enumerate(features.mtp_hidden, start=1):
        np.testing.assert_array_equal(moved(hidden), np.arange(seq) >= changed_at - depth)


def test_mtp_ignores_the_next_document():
    """At the last position of a document there is no token i+k: the MTP input there is the same as at a row end."""
    config = MLA_MOE
    params = init_params(config)
    tokens = random_tokens(config, (1, 8))
    tokens = jnp.concatenate([tokens, tokens.at[0, 4:].set(3)])
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]] * 2)
    features = _apply(config, params, tokens, segment_ids, method="features")
    for hidden in features.mtp_hidden:
        np.testing.assert_array_equal(hidden[0, :4], hidden[1, :4])


def test_moe_load_counts_real_tokens_and_bias_takes_no_gradient():
    config = MLA_MOE
    params = init_params(config)
    tokens = random_tokens(config, (2, 6))
    segment_ids = jnp.array([[1] * 6, [1, 1, 1, 0, 0, 0]])
    features = _apply(config, params, tokens, segment_ids=segment_ids, method="features")
    np.testing.assert_allclose(features.moe_load.sum(-1), 1.0, rtol=1e-6)
    # 9 real tokens x top-2 slots: every load is a multiple of 1/18.
    np.testing.assert_allclose(features.moe_load * 18, np.round(features.moe_load * 18), atol=1e-5)
    assert float(features.moe_balance_loss) > 0

    def loss(p):
        f = _apply(config, p, tokens, segment_ids=segment_ids, method="features")
        return jnp.mean(f.hidden.astype(jnp.float32) ** 2) + jnp.mean(f.mtp_hidden[0] ** 2) + f.moe_balance_loss

    grads = nn.unbox(jax.grad(loss)(params))
    for path, _ in moe_layer_paths(config):
        layer = grads
        for key in path:
            layer = layer[key]
        assert np.all(np.asarray(layer["expert_bias"]) == 0)
        assert np.abs(np.asarray(layer["router"])).max() > 0


@pytest.mark.parametrize("scan_layers", [True, False])
def test_update_expert_biases_follows_load_sign_and_keeps_boxes(scan_layers):
    config = MLA_MOE.replace(scan_layers=scan_layers)
    params = init_params(config)
    layers = moe_layer_paths(config)
    # Scanned, the one MoE decoder layer is row 0 of the `moe_layers` stack; unrolled, it is layers_1.
    main = (("moe_layers", "mlp"), 0) if scan_layers else (("layers_1", "mlp"), None)
    assert layers == [main, (("mtp_0", "block", "mlp"), None), (("mtp_1", "block", "mlp"), None)]
    load = jnp.tile(jnp.array([0.3, 0.125, 0.125, 0.1, 0.1, 0.1, 0.1, 0.05]), (len(layers), 1)).at[1, 0].set(0.0)
    updated = update_expert_biases(params, config, load, rate=0.01)
    for row, (path, stack_row) in enumerate(layers):
        layer, original = updated, params
        for key in path:
            layer, original = layer[key], original[key]
        assert isinstance(layer["expert_bias"], nn.LogicallyPartitioned)
        of_layer = lambda bias: np.asarray(bias.value) if stack_row is None else np.asarray(bias.value)[stack_row]
        expected = of_layer(original["expert_bias"]) + 0.01 * np.sign(np.mean(load[row]) - np.asarray(load[row]))
        np.testing.assert_allclose(of_layer(layer["expert_bias"]), expected, atol=1e-7)
        assert layer["expert_bias"] is not original["expert_bias"]  # the input tree is not mutated


def _squared_logits_loss(params, config, tokens):
    return jnp.mean(Transformer(config).apply({"params": params}, tokens) ** 2)


# "offload" runs on CPU too: jax's CPU devices have a "pinned_host" memory (jaxopd/model/remat.py). "mla_moe": MoE
# layers and MTP blocks rematerialized too.
@pytest.mark.parametrize("name, policy", [("gqa", "full"), ("gqa", "dots_saveable"),
                                          ("gqa", "dots_with_no_batch_dims_saveable"), ("gqa", "offload"),
                                          ("mla_moe", "dots_with_no_batch_dims_saveable")])
def test_remat_policies_change_nothing_numerically(name, policy):
    config = CONFIGS[name]
    params = init_params(config)
    tokens = random_tokens(config, (1, 6))
    grad = jax.jit(jax.grad(_squared_logits_loss), static_argnums=1)
    plain = grad(params, config, tokens)
    remat = grad(params, config.replace(remat=policy), tokens)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _saved_residuals(config, params, tokens) -> list[str]:
    """jax's line for each array the backward pass keeps ('f32[1,6,48] output of dot_general from .../swiglu')."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(lambda p: _squared_logits_loss(p, config, tokens), params)
    return printed.getvalue().splitlines()


def test_remat_policies_keep_what_they_name():
    # jax names the op that made a residual only outside a scan: the unrolled model first, the scanned one after.
    unrolled = GQA.replace(scan_layers=False)
    params = init_params(unrolled)
    tokens = random_tokens(GQA, (1, 6))
    saved = {policy: _saved_residuals(unrolled.replace(remat=policy), params, tokens)
             for policy in get_args(RematPolicy)}

    def matmul_outputs(policy, source=""):
        return [line.split()[0] for line in saved[policy] if "output of dot_general" in line and source in line]

    attention_kernel = os.path.join("kernels", "attention.py")  # the attention logits and values einsums
    projections = matmul_outputs("dots_with_no_batch_dims_saveable")
    assert matmul_outputs("full") == []
    assert projections and matmul_outputs("dots_with_no_batch_dims_saveable", attention_kernel) == []
    assert matmul_outputs("dots_saveable", attention_kernel)
    assert len(saved["full"]) < len(saved["dots_with_no_batch_dims_saveable"]) < len(saved["dots_saveable"])
    # "offload" keeps the same matmul outputs, in host memory instead of device memory.
    assert matmul_outputs("offload") == []
    assert [line.split()[0] for line in saved["offload"] if "<host>" in line] == [
        shape.replace("f32[", "f32<host>[") for shape in projections]

    # Scanned, every residual is an output of the scan (stacked [layers, ...] but for the carry). Beyond what "full"
    # keeps (the carry, each layer's input), a policy keeps the matmul outputs it keeps unrolled, once per stack.
    scanned = GQA.replace(scan_layers=True)
    scanned_params = init_params(scanned)

    def scan_outputs(policy):
        return Counter(line.split()[0] for line in _saved_residuals(scanned.replace(remat=policy), scanned_params,
                                                                    tokens) if "output of scan" in line)

    def stacked(shapes, memory="f32"):
        return Counter({shape.replace("f32[", f"{memory}[{GQA.num_layers},"): count // GQA.num_layers
                        for shape, count in Counter(shapes).items()})

    for policy in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        assert scan_outputs(policy) - scan_outputs("full") == stacked(matmul_outputs(policy)), policy
    assert scan_outputs("offload") - scan_outputs("full") == stacked(projections, "f32<host>")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attention="mha"), "attention"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(head_dim=None, d_model=30), "head_dim"),
        (dict(first_k_dense=9), "first_k_dense"),
        (dict(dtype="bf16"), "dtype"),
        (dict(remat=True), "remat"),
    ],
)
def test_bad_configs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        init_params(GQA.replace(**change))


def test_bad_inputs_raise_clear_errors():
    config = CONFIGS["gqa"]
    params = init_params(config)
    with pytest.raises(ValueError, match="segment_ids.shape"):
        _apply(config, params, jnp.ones((2, 4), jnp.int32), segment_ids=jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="tokens must be"):
        _apply(config, params, jnp.ones((4,), jnp.int32))


def test_kernels_import_on_their_own():
    """The kernels import first, on their own, and the modules (which import kernels and RopeScaling) after them."""
    code = "import jaxopd.kernels.rope, jaxopd.kernels.attention; from jaxopd.model import Transformer"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2],
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


@pytest.mark.parametrize("name", ["mla_moe", "gqa"])
def test_blockwise_attention_implementation_gives_the_same_model(name):
    config = CONFIGS[name]
    params = init_params(config)
    tokens = random_tokens(config, (2, 12))
    segment_ids = jnp.array([[1] * 5 + [2] * 7, [1] * 10 + [0] * 2])
    blockwise = config.replace(attention_implementation="blockwise", attention_block_q=4, attention_block_kv=4)
    np.testing.assert_allclose(_apply(blockwise, params, tokens, segment_ids),
                               _apply(config, params, tokens, segment_ids), atol=2e-5)

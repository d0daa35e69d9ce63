"""A tiny model with each row's sequence split over the mesh's "context" axis (x fsdp, x expert): loss and gradients
equal the single-device ones in float32; decode under such a mesh is refused with a clear error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.model import Transformer, init_cache
from jaxopd.model import attention as attention_module, mla as mla_module
from jaxopd.training import sharding
from jaxopd.training.config import MeshConfig
from conftest import GQA, MLA_MOE, init_params, random_tokens

SEQ = 64
# Three documents in row 0 (the first boundaries inside the 16-token blocks of context=4), two in row 1, padding.
SEGMENT_IDS = np.array([[1] * 10 + [2] * 30 + [3] * 20 + [0] * 4, [1] * 40 + [2] * 24], np.int32)


def _loss(model, params, tokens, segment_ids):
    """Next-token cross-entropy over the real tokens of each document, plus the MTP hidden states and the MoE balance
    loss, so that every path of the forward pass reaches the gradient."""
    features = model.apply({"params": params}, tokens, segment_ids, method="features")
    logits = model.apply({"params": params}, features.hidden, method="logits")
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    targets = jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    same_document = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    loss = -jnp.sum(targets * same_document) / same_document.sum()
    return loss + sum(jnp.mean(h ** 2) for h in features.mtp_hidden) + features.moe_balance_loss


@pytest.mark.parametrize("config, mesh_sizes", [
    (GQA, dict(fsdp=2, context=4)),
    (GQA.replace(scan_layers=False), dict(fsdp=2, context=4)),
    (MLA_MOE, dict(fsdp=2, context=4)),
    (MLA_MOE.replace(expert_parallel=True, attention_implementation="blockwise", attention_block_q=8,
                     attention_block_kv=8), dict(expert=2, context=4)),
    (MLA_MOE.replace(expert_parallel=True, expert_dispatch="all_to_all"), dict(expert=2, context=4)),
], ids=["gqa-fsdp2-context4", "gqa_unrolled-fsdp2-context4", "mla_moe-fsdp2-context4",
        "mla_moe_ep_blockwise-expert2-context4", "mla_moe_ep_all_to_all-expert2-context4"])
def test_loss_and_gradients_equal_single_device(config, mesh_sizes, monkeypatch):
    split_calls = []
    for module, name in ((attention_module, "context_parallel_attention"), (mla_module, "context_parallel_mla")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, kernel=kernel, **k: split_calls.append(1) or kernel(*a, **k))
    model = Transformer(config)
    params = nn.meta.unbox(init_params(config))
    tokens = random_tokens(config, (2, SEQ))
    segment_ids = jnp.asarray(SEGMENT_IDS)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, t, s: _loss(model, p, t, s)))
    expected_loss, expected_grads = grad_fn(params, tokens, segment_ids)
    assert not split_calls  # no mesh: plain attention

    mesh = sharding.make_mesh(MeshConfig(**{"data": 1, **mesh_sizes}))
    shardings = sharding.logical_shardings(init_params(config), mesh)
    with sharding.mesh_context(mesh):
        loss, grads = grad_fn(jax.device_put(params, shardings), tokens, segment_ids)
    assert split_calls  # the attention layers ran split (unrolled: each once; a scan traces its body twice)
    assert config.scan_layers or len(split_calls) == config.num_layers + config.mtp_depth
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                                                              atol=1e-5 * float(np.abs(want).max())),
                 grads, expected_grads)


def test_decode_with_a_context_parallel_mesh_is_refused():
    model = Transformer(GQA)
    params = nn.meta.unbox(init_params(GQA))
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, context=2))
    with sharding.mesh_context(mesh), pytest.raises(ValueError, match=r"does not run context-parallel.*context=1"):
        model.apply({"params": params}, jnp.ones((4, 1), jnp.int32), cache=init_cache(GQA, 4, 8, "float32"),
                    cache_index=0, method="decode")

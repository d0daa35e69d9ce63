"""DeepSeekMoE layer (DeepSeek-V3 sec. 2.1.2): shared experts plus routed experts chosen by a biased router."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopd.kernels.moe import (expert_load, moe_experts, moe_experts_all_to_all, moe_experts_expert_parallel, route,
                                sequence_balance_loss)
from jaxopd.model.config import ModelConfig
from jaxopd.model import lora
from jaxopd.model.layers import MLP, compute, param, projection


class MoE(nn.Module):
    """Parameters (E experts, f = moe_mlp_dim):
      `router [d, E]` ("embed", None) and `expert_bias [E]` (None,), both float32: the balance bias changes which
        experts are chosen, never the gate weights, and takes no gradient (stop_gradient; the trainer updates it with
        `jaxopd.kernels.moe.update_balance_bias` from `moe_load`, see `jaxopd.model.update_expert_biases`);
      `w_gate`, `w_up [E, d, f]` ("experts", "embed", "expert_mlp"), `w_down [E, f, d]`;
      `shared/{w_gate, w_up, w_down}`: the shared experts as one SwiGLU of width num_shared_experts * f;
      with "experts" in config.lora_targets, per-expert LoRA adapters of the routed weights and adapters of the
      shared ones (`jaxopd.model.lora`).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
        """x `[batch, t, d]`, segment_ids `[batch, t]` (0 = padding) ->
        (`[batch, t, d]`, (load `[E]` fraction of routed slots per expert over real tokens, balance loss scalar:
        the sequence-wise loss of V3 eqs. 17-20 over each packed document, before multiplying by alpha))."""
        c = self.config
        batch, seq, d = x.shape
        experts, f = c.num_experts, c.moe_mlp_dim
        router = param(self, "router", (d, experts), ("embed", None), dtype="float32")
        expert_bias = param(self, "expert_bias", (experts,), (None,), nn.initializers.zeros, dtype="float32")
        up_axes, down_axes = ("experts", "embed", "expert_mlp"), ("experts", "expert_mlp", "embed")
        w_gate, gate_update = projection(self, "w_gate", (experts, d, f), up_axes, 1, "experts", num_stacked=1)
        w_up, up_update = projection(self, "w_up", (experts, d, f), up_axes, 1, "experts", num_stacked=1)
        w_down, down_update = projection(self, "w_down", (experts, f, d), down_axes, 1, "experts", num_stacked=1)

        x_NxD = x.reshape(batch * seq, d)
        # Router in float32, as DeepSeek-V3's gate: near-tied sigmoid scores decide discrete choices.
        logits_NxE = jnp.einsum("nd,de->ne", x_NxD.astype(jnp.float32), router)
        expert_ids_NxK, weights_NxK, scores_NxE = route(
            logits_NxE,
            jax.lax.stop_gradient(expert_bias),
            top_k=c.num_experts_per_token,
            score=c.router_score,
            num_groups=c.num_expert_groups,
            topk_groups=c.topk_groups,
            normalize=c.norm_topk_prob,
            scale=c.routed_scaling_factor,
        )
        # Dropout masks per (token, slot) pair, so they shard with the tokens under expert parallelism.
        slots = (batch * seq, c.num_experts_per_token)
        updates = (lora.with_dropout(self, gate_update, (*slots, d)), lora.with_dropout(self, up_update, (*slots, d)),
                   lora.with_dropout(self, down_update, (*slots, f)))
        expert_weights = (compute(self, w_gate), compute(self, w_up), compute(self, w_down), updates)
        mesh = jax.sharding.get_abstract_mesh()
        # Init only needs shapes (and may see one dummy token); without a mesh there is nothing to be parallel over.
        if c.expert_parallel and not mesh.empty and not self.is_initializing():
            if "expert" not in mesh.shape:
                raise ValueError(
                    "config.expert_parallel=True needs a mesh with an 'expert' axis set with jax.set_mesh(mesh); "
                    f"the current mesh axes are {tuple(mesh.shape)}"
                )
            # Tokens split over the sequence (context parallelism) stay split: rows are batch-major, so the flat
            # token axis is sharded over the batch axes, then "context".
            token_axes = ("data", "fsdp", "expert", "context")
            if c.expert_dispatch == "all_gather":
                routed_NxD = moe_experts_expert_parallel(x_NxD, expert_ids_NxK, weights_NxK, *expert_weights,
                                                         mesh=mesh, token_axes=token_axes)
            else:  # the count of pairs dropped past moe_capacity_factor's blocks is not reported (yet)
                routed_NxD, _ = moe_experts_all_to_all(x_NxD, expert_ids_NxK, weights_NxK, *expert_weights, mesh=mesh,
                                                       token_axes=token_axes, capacity_factor=c.moe_capacity_factor,
                                                       exchange=c.expert_dispatch)
        else:
            routed_NxD = moe_experts(x_NxD, expert_ids_NxK, weights_NxK, *expert_weights,
                                     grouped_matmul=c.grouped_matmul_kernel)
        out_BxTxD = routed_NxD.reshape(batch, seq, d)
        if c.num_shared_experts:
            out_BxTxD = out_BxTxD + MLP(c, c.num_shared_experts * f, "experts", name="shared")(x)

        load_E = expert_load(expert_ids_NxK, experts, (segment_ids > 0).reshape(-1))
        balance = sequence_balance_loss(
            scores_NxE.reshape(batch, seq, experts), expert_ids_NxK.reshape(batch, seq, -1), segment_ids
        )
        return out_BxTxD, (load_E, balance)

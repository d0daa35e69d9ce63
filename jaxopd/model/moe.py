"""DeepSeekMoE layer (DeepSeek-V3 sec. 2.1.2): shared experts plus routed experts chosen by a biased router."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopd.kernels.moe import expert_load, moe_experts, moe_experts_expert_parallel, route, sequence_balance_loss
from jaxopd.model.config import ModelConfig
from jaxopd.model.layers import MLP, compute, param


class MoE(nn.Module):
    """Parameters (E experts, f = moe_mlp_dim):
      `router [d, E]` ("embed", None) and `expert_bias [E]` (None,), both float32: the balance bias changes which
        experts are chosen, never the gate weights, and takes no gradient (stop_gradient; the trainer updates it with
        `jaxopd.kernels.moe.update_balance_bias` from `moe_load`, see `jaxopd.model.update_expert_biases`);
      `w_gate`, `w_up [E, d, f]` ("experts", "embed", "expert_mlp"), `w_down [E, f, d]`;
      `shared/{w_gate, w_up, w_down}`: the shared experts as one SwiGLU of width num_shared_experts * f.
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
        w_gate = param(self, "w_gate", (experts, d, f), ("experts", "embed", "expert_mlp"))
        w_up = param(self, "w_up", (experts, d, f), ("experts", "embed", "expert_mlp"))
        w_down = param(self, "w_down", (experts, f, d), ("experts", "expert_mlp", "embed"))

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
        expert_weights = (compute(self, w_gate), compute(self, w_up), compute(self, w_down))
        mesh = jax.sharding.get_abstract_mesh()
        # Init only needs shapes (and may see one dummy token); without a mesh there is nothing to be parallel over.
        if c.expert_parallel and not mesh.empty and not self.is_initializing():
            if "expert" not in mesh.shape:
                raise ValueError(
                    "config.expert_parallel=True needs a mesh with an 'expert' axis set with jax.set_mesh(mesh); "
                    f"the current mesh axes are {tuple(mesh.shape)}"
                )
            routed_NxD = moe_experts_expert_parallel(x_NxD, expert_ids_NxK, weights_NxK, *expert_weights, mesh=mesh)
        else:
            routed_NxD = moe_experts(x_NxD, expert_ids_NxK, weights_NxK, *expert_weights)
        out_BxTxD = routed_NxD.reshape(batch, seq, d)
        if c.num_shared_experts:
            out_BxTxD = out_BxTxD + MLP(c, c.num_shared_experts * f, name="shared")(x)

        load_E = expert_load(expert_ids_NxK, experts, (segment_ids > 0).reshape(-1))
        balance = sequence_balance_loss(
            scores_NxE.reshape(batch, seq, experts), expert_ids_NxK.reshape(batch, seq, -1), segment_ids
        )
        return out_BxTxD, (load_E, balance)

"""The decoder-only Transformer: embedding, decoder blocks (dense, then DeepSeekMoE), final norm, output head, MTP.

Usage:
  model = Transformer(config)
  params = model.init(rng, tokens)["params"]       # leaves are nn.LogicallyPartitioned boxes; nn.unbox(...) strips
  logits = model.apply({"params": params}, tokens, segment_ids=None, positions=None)   # [b, t, vocab] float32
  features = model.apply({"params": params}, tokens, segment_ids, positions, method="features")   # `Features`
  logits, cache = model.apply({"params": params}, tokens, positions=..., segment_ids=..., cache=cache,
                              cache_index=i, method="decode")         # cache from `init_cache`
  hidden, cache = model.apply(..., method="decode_hidden")            # decode before the output head
  mtp_logits, cache = model.apply({"params": params}, hidden, next_tokens, segment_ids, positions, cache, i,
                                  method="decode_mtp")                # MTP depth 1 drafts (init_cache(mtp=True))
segment_ids default to ones (one document per row; 0 marks padding) and positions to per-document aranges
(restarting at 0 wherever the segment id changes).

Parameter tree (d = d_model, V = vocab_size, h = num_heads, g = num_kv_heads, k = head_dim, E = num_experts,
f = mlp_dim, fe = moe_mlp_dim, fs = num_shared_experts * fe; MLA: r = q_lora_rank, c = kv_lora_rank,
dn/dr/dv = qk_nope/qk_rope/v head dims). Path -> shape -> logical axes:
  embed/embedding                      [V, d]          ("vocab", "embed")
  layers_{i}/attention_norm/scale      [d]             ("norm",)
  layers_{i}/attention/...  GQA:
      q                                [d, h, k]       ("embed", "q_heads", "head_dim")
      k, v                             [d, g, k]       ("embed", "kv_heads", "head_dim")
      o                                [h, k, d]       ("q_heads", "head_dim", "embed")
      q_bias                           [h, k]          ("q_heads", "head_dim")      (attention_bias, Qwen2)
      k_bias, v_bias                   [g, k]          ("kv_heads", "head_dim")     (attention_bias)
      q_norm/scale, k_norm/scale       [k]             ("norm",)                    (qk_norm, Qwen3)
  layers_{i}/attention/...  MLA:
      q                                [d, h, dn+dr]   ("embed", "q_heads", "head_dim")   (q_lora_rank None)
      q_a                              [d, r]          ("embed", "q_lora")                (q_lora_rank set)
      q_a_norm/scale                   [r]             ("norm",)
      q_b                              [r, h, dn+dr]   ("q_lora", "q_heads", "head_dim")
      kv_a                             [d, c+dr]       ("embed", "kv_lora")   latent first, then the rope key
      kv_a_norm/scale                  [c]             ("norm",)
      kv_b                             [c, h, dn+dv]   ("kv_lora", "q_heads", "head_dim")   W_uk first, then W_uv
      o                                [h, dv, d]      ("q_heads", "head_dim", "embed")
  layers_{i}/mlp_norm/scale            [d]             ("norm",)
  layers_{i}/mlp/...  dense (i < first_k_dense or E == 0):
      w_gate, w_up                     [d, f]          ("embed", "mlp")
      w_down                           [f, d]          ("mlp", "embed")
  layers_{i}/mlp/...  MoE:
      router                           [d, E] float32  ("embed", None)
      expert_bias                      [E]    float32  (None,)   no gradient; see update_expert_biases
      w_gate, w_up                     [E, d, fe]      ("experts", "embed", "expert_mlp")
      w_down                           [E, fe, d]      ("experts", "expert_mlp", "embed")
      shared/w_gate, shared/w_up       [d, fs]         ("embed", "mlp")        (num_shared_experts > 0)
      shared/w_down                    [fs, d]         ("mlp", "embed")
  final_norm/scale                     [d]             ("norm",)
  unembed                              [d, V]          ("embed", "vocab")      (absent when tie_embeddings)
  mtp_{j}/embed_norm/scale             [d]             ("norm",)    DeepSeek enorm      (j < mtp_depth)
  mtp_{j}/hidden_norm/scale            [d]             ("norm",)    hnorm
  mtp_{j}/projection                   [2d, d]         (None, "embed")   eh_proj; rows [:d] take the embedding
  mtp_{j}/block/...                    a decoder block as layers_{i}, layer index num_layers + j
  mtp_{j}/norm/scale                   [d]             ("norm",)    shared_head.norm
With config.lora_rank > 0, each weight of the targeted kinds gets `{name}_lora_a`, `{name}_lora_b` beside it
(`jaxopd.model.lora`).
HF equivalence: our kernels are HF weights transposed, `[in..., out...]`, with heads split out.
With config.scan_layers (the default; `jaxopd.model.stacking`), the layers_{i} subtrees are stacked: every leaf gains a
leading `[layers]` axis (logical "layers", replicated) under one key per stack of like layers: `layers/...` when all
layers are alike, `dense_layers/...` (layers < first_k_dense) and `moe_layers/...` (the rest) for DeepSeekMoE with
dense first layers; moe_layers/mlp/expert_bias is `[layers, E]`, one balance bias per layer as before. mtp_{j} is the
same in both layouts.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxopd.kernels.moe import update_balance_bias
from jaxopd.model.block import Block, MTPModule, MoEStats
from jaxopd.model.cache import row_slots, write
from jaxopd.model.config import ModelConfig
from jaxopd.model.layers import Embed, RMSNorm, compute, param
from jaxopd.model.remat import remat_block
from jaxopd.model.stacking import layer_key, layer_stacks
from jaxopd.model.validation import check_inputs


# MoE statistics of a stack of n layers: (load [n, E], balance loss [n]), or None for dense layers.
StackedStats = Optional[tuple[jnp.ndarray, jnp.ndarray]]


def _one_layer(stats: MoEStats) -> StackedStats:
    return None if stats is None else (stats[0][None], stats[1][None])


@flax.struct.dataclass
class Features:
    """hidden `[b, t, d]` after the final norm (logits = hidden @ unembedding); mtp_hidden: one `[b, t, d]` per MTP
    depth k = 1.. (after its norm), position i predicting token i + k + 1; moe_load `[num_moe_layers, E]` (main MoE
    layers in order, then each MTP block's), fraction of routed slots per expert over real tokens; moe_balance_loss:
    mean over those layers of the sequence-wise balance loss (DeepSeek-V3 eq. 17; multiply by alpha)."""

    hidden: jnp.ndarray
    mtp_hidden: tuple
    moe_load: jnp.ndarray
    moe_balance_loss: jnp.ndarray


class Transformer(nn.Module):
    """Decoder-only LM for any `ModelConfig` (methods: __call__ -> logits, features, logits, decode; see above)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        block_cls = remat_block(Block, c.remat)
        self.embed = Embed(c)
        if c.scan_layers:
            for group in layer_stacks(c):
                scanned = nn.scan(remat_block(Block, c.remat, in_scan=True), variable_axes={"params": 0},
                                  split_rngs={"params": True, "dropout": True}, length=group.count,
                                  # carry x (in decode, with the stack's cache: `Block`); positions, segment_ids,
                                  # cache_index, cache_segment_ids are the same for every layer; scanned over, in
                                  # decode, is each layer's index in the stack.
                                  in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                                  metadata_params={nn.PARTITION_NAME: "layers"})
                setattr(self, group.name, scanned(c, group.first, scan_body=True))
        else:
            self.layers = [block_cls(c, i) for i in range(c.num_layers)]
        self.final_norm = RMSNorm(c)
        if not c.tie_embeddings:
            self.unembed = param(self, "unembed", (c.d_model, c.vocab_size), ("embed", "vocab"))
        self.mtp = [MTPModule(c, c.num_layers + j, block_cls) for j in range(c.mtp_depth)]

    def __call__(
        self, tokens: jnp.ndarray, segment_ids: Optional[jnp.ndarray] = None, positions: Optional[jnp.ndarray] = None
    ) -> jnp.ndarray:
        """tokens `[b, t]` int -> logits `[b, t, vocab]` float32 (runs the MTP modules too only when initializing)."""
        if self.is_initializing():
            return self.logits(self.features(tokens, segment_ids, positions).hidden)
        segment_ids, positions = check_inputs(self.config, tokens, segment_ids, positions)
        hidden, _ = self._trunk(self._embed(tokens), positions, segment_ids)
        return self.logits(hidden)

    def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """hidden `[b, t, d]` (after a final norm) -> float32 logits `[b, t, vocab]`."""
        if self.config.tie_embeddings:
            logits = self.embed.attend(hidden)
        else:
            logits = jnp.einsum("btd,dv->btv", hidden, compute(self, self.unembed), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))

    def _blocks(self, x, positions, segment_ids, caches=None, cache_index=None, cache_segment_ids=None
                ) -> tuple[jnp.ndarray, list[StackedStats], tuple]:
        """The decoder layers: x `[b, t, d]` -> (x, MoE stats of each stack or layer in order, the updated caches:
        one per stack (`[layers, ...]` arrays) when scanned, else one per layer; None entries without a cache)."""
        c = self.config
        groups = layer_stacks(c) if c.scan_layers else [None] * c.num_layers
        modules = [getattr(self, group.name) for group in groups] if c.scan_layers else self.layers
        caches = (None,) * len(modules) if caches is None else caches
        stats, new_caches = [], []
        for module, group, cache in zip(modules, groups, caches):
            if c.scan_layers and cache is not None:
                layer_in_stack = jnp.arange(group.count, dtype=jnp.int32)
                (x, cache), (module_stats, _) = module((x, cache), positions, segment_ids, layer_in_stack, cache_index,
                                                       cache_segment_ids)
            elif c.scan_layers:
                x, (module_stats, _) = module(x, positions, segment_ids, None, cache_index, cache_segment_ids)
            else:
                x, module_stats, cache = module(x, positions, segment_ids, cache, cache_index, cache_segment_ids)
                module_stats = _one_layer(module_stats)
            stats.append(module_stats)
            new_caches.append(cache)
        return x, stats, tuple(new_caches)

    def _embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        return nn.with_logical_constraint(self.embed(tokens), ("batch", "seq", "embed"))

    def _trunk(self, x, positions, segment_ids) -> tuple[jnp.ndarray, list[StackedStats]]:
        """The embedded tokens x `[b, t, d]` through the decoder layers and the final norm."""
        x, stats, _ = self._blocks(x, positions, segment_ids)
        return self.final_norm(x), stats

    def features(
        self, tokens: jnp.ndarray, segment_ids: Optional[jnp.ndarray] = None, positions: Optional[jnp.ndarray] = None
    ) -> Features:
        """tokens `[b, t]` -> `Features` (hidden states for chunked losses, MTP outputs, MoE statistics)."""
        c = self.config
        segment_ids, positions = check_inputs(c, tokens, segment_ids, positions)
        embedded = self._embed(tokens)
        hidden, stats = self._trunk(embedded, positions, segment_ids)
        # Depth 1 starts from the main model's output after its final norm, as inference engines feed DeepSeek's
        # MTP weights; each depth then passes on its block output before its own norm.
        previous, mtp_hidden = hidden, []
        for depth, module in enumerate(self.mtp, start=1):
            previous, output, depth_stats, _ = module(previous, self._shifted_embeddings(embedded, segment_ids, depth),
                                                      positions, segment_ids)
            mtp_hidden.append(output)
            stats.append(_one_layer(depth_stats))
        stats = [s for s in stats if s is not None]
        if stats:
            moe_load = jnp.concatenate([load for load, _ in stats])
            balance = jnp.mean(jnp.concatenate([loss for _, loss in stats]))
        else:
            moe_load, balance = jnp.zeros((0, c.num_experts), jnp.float32), jnp.zeros((), jnp.float32)
        return Features(hidden, tuple(mtp_hidden), moe_load, balance)

    @staticmethod
    def _shifted_embeddings(embedded: jnp.ndarray, segment_ids: jnp.ndarray, depth: int) -> jnp.ndarray:
        """Emb(t_{i+depth}) `[b, t, d]` from the main path's embeddings `embedded` = Emb(t_i), zero where token
        i + depth is past the row or in another document.

        The embeddings are shifted, not the tokens: looking up shifted tokens gives the lookup's gradient another
        sharding than the main path's when the sequence is split over devices (context parallelism), and the TPU
        partitioner then gathered every token's f32 embedding gradient on every chip (120 GB at DeepSeek-V3's 32K
        stage); shifted activations only pass `depth` positions to the neighbouring block."""
        seq = embedded.shape[1]
        shift = lambda a: jnp.pad(a, ((0, 0), (0, depth)) + ((0, 0),) * (a.ndim - 2))[:, depth : depth + seq]
        valid = (shift(segment_ids) == segment_ids) & (segment_ids > 0)
        shifted = nn.with_logical_constraint(shift(embedded), ("batch", "seq", "embed"))
        return shifted * valid[..., None].astype(shifted.dtype)

    def decode(
        self,
        tokens: jnp.ndarray,
        segment_ids: Optional[jnp.ndarray] = None,
        positions: Optional[jnp.ndarray] = None,
        cache: Optional[dict] = None,
        cache_index: jnp.ndarray | int = 0,
        last_only: bool = False,
    ) -> tuple[jnp.ndarray, dict]:
        """Run `tokens [b, t]` (a prompt chunk, or t = 1 new token) written at cache slots
        [cache_index, cache_index + t) against everything cached so far; `cache_index` is one slot for all rows or
        `[b]`, each row's own (rows at different lengths, as continuous batching decodes them).

        segment_ids `[b, t]`: 1 for real tokens, 0 for padding (padding is never attended to); default ones.
        positions `[b, t]`: RoPE positions; default the slot indices cache_index + arange(t), right for rows that
        start at slot 0. For left-padded prompts pass them, restarting at 0 on each row's first real token.
        Returns (logits `[b, t, vocab]` float32, the updated cache). The MTP modules are not run (`decode_mtp`).
        last_only: logits of the last column only, `[b, 1, vocab]`: all a sampler needs after a prefill, and the
        prompt's float32 `[b, t, vocab]` (tens of GB for a 150K vocabulary and long prompts) never exists.
        """
        hidden, cache = self.decode_hidden(tokens, segment_ids, positions, cache, cache_index)
        return self.logits(hidden[:, -1:] if last_only else hidden), cache

    def decode_hidden(
        self,
        tokens: jnp.ndarray,
        segment_ids: Optional[jnp.ndarray] = None,
        positions: Optional[jnp.ndarray] = None,
        cache: Optional[dict] = None,
        cache_index: jnp.ndarray | int = 0,
    ) -> tuple[jnp.ndarray, dict]:
        """`decode` stopping before the output head: (hidden `[b, t, d]` after the final norm, the updated cache);
        `logits(hidden)` are decode's logits and `hidden` is what `decode_mtp` drafts from (as `Features.hidden`)."""
        c = self.config
        if cache is None:
            raise ValueError("decode needs cache=init_cache(config, batch, max_len, dtype)")
        if positions is None:
            positions = row_slots(cache_index, *tokens.shape)
        segment_ids, positions = check_inputs(c, tokens, segment_ids, positions, cache=cache, cache_index=cache_index)
        cache_segment_ids = write(cache["segment_ids"], segment_ids, cache_index)
        x, _, layer_caches = self._blocks(self.embed(tokens), positions, segment_ids, cache["layers"], cache_index,
                                          cache_segment_ids)
        return self.final_norm(x), {**cache, "segment_ids": cache_segment_ids, "layers": layer_caches}

    def decode_mtp(
        self,
        hidden: jnp.ndarray,
        next_tokens: jnp.ndarray,
        segment_ids: jnp.ndarray,
        positions: jnp.ndarray,
        cache: dict,
        cache_index: jnp.ndarray | int,
        last_only: bool = False,
    ) -> tuple[jnp.ndarray, dict]:
        """MTP depth 1 against its own KV cache (`init_cache(..., mtp=True)`): main positions at slots
        [cache_index, cache_index + t) with their `decode_hidden` output `hidden [b, t, d]` and the token after each,
        `next_tokens [b, t]` -> (logits `[b, t, vocab]` float32 predicting the token after `next_tokens`, the cache).
        The main model's `decode_hidden` must have written these slots first: their segment ids are its.
        last_only: logits of the last column only, `[b, 1, vocab]` (as `decode`'s)."""
        c = self.config
        if c.mtp_depth < 1 or "mtp" not in cache:
            raise ValueError(f"decode_mtp needs a model with mtp_depth >= 1 (it has {c.mtp_depth}) and a cache from "
                             "init_cache(config, batch, max_len, dtype, mtp=True)")
        next_embeddings = self.embed(next_tokens) * (segment_ids > 0)[..., None].astype(c.dtype)
        _, output, _, mtp_cache = self.mtp[0](hidden, next_embeddings, positions, segment_ids, cache["mtp"],
                                              cache_index, cache["segment_ids"])
        return self.logits(output[:, -1:] if last_only else output), {**cache, "mtp": mtp_cache}


def unembedding(params: dict, config: ModelConfig) -> jnp.ndarray:
    """The output head `[d, vocab]` (the embedding transposed when tied), for chunked losses over `Features.hidden`."""
    params = nn.unbox(params)
    if config.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["unembed"]


def moe_layer_paths(config: ModelConfig) -> list[tuple[tuple[str, ...], Optional[int]]]:
    """(param-tree path, row) of every MoE layer, in the order of `Features.moe_load` rows: the layer's `expert_bias`
    is `params[path...]["expert_bias"]`, `[E]` (row None), or row `row` of that `[layers, E]` stack when scanned."""
    if config.scan_layers:
        main = [((group.name, "mlp"), row) for group in layer_stacks(config) for row, layer in enumerate(group.layers)
                if config.is_moe_layer(layer)]
    else:
        main = [((layer_key(i), "mlp"), None) for i in range(config.num_layers) if config.is_moe_layer(i)]
    mtp = [((f"mtp_{j}", "block", "mlp"), None) for j in range(config.mtp_depth)
           if config.is_moe_layer(config.num_layers + j)]
    return main + mtp


def update_expert_biases(params: dict, config: ModelConfig, moe_load: jnp.ndarray, rate: float) -> dict:
    """params with every MoE layer's `expert_bias` moved by `update_balance_bias(bias, load, rate)` (DeepSeek-V3
    sec. 2.1.2), `moe_load [num_moe_layers, E]` from `Features`. Boxed (nn.Partitioned) leaves stay boxed."""
    layers = moe_layer_paths(config)
    if moe_load.shape != (len(layers), config.num_experts):
        raise ValueError(f"moe_load.shape={moe_load.shape} must be [num_moe_layers, experts] = "
                         f"{(len(layers), config.num_experts)} for this config")
    # Rebuild the containers (not the arrays) so that assigning below leaves the caller's tree untouched.
    params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    for load, (path, row) in zip(moe_load, layers):
        holder = params
        for key in path:
            holder = holder[key]
        bias = holder["expert_bias"]
        value = bias.unbox() if isinstance(bias, nn.meta.AxisMetadata) else bias
        value = (update_balance_bias(value, load, rate) if row is None
                 else jnp.asarray(value).at[row].set(update_balance_bias(value[row], load, rate)))
        holder["expert_bias"] = bias.replace_boxed(value) if isinstance(bias, nn.meta.AxisMetadata) else value
    return params

"""DeepSeekMoE kernels: routing, dropless expert compute, load accounting and load balancing.

Public API (pure functions on arrays and Python numbers; no Flax, no configs):

  route(logits [..., experts], bias [experts] | None, *, top_k, score="sigmoid"|"softmax", num_groups=1,
        topk_groups=1, normalize=True, scale=1.0)
      -> (expert_ids [..., top_k] int32, weights [..., top_k] float32, scores [..., experts] float32)
  moe_experts(x [tokens, d], expert_ids [tokens, k], weights [tokens, k],
              w_gate [experts, d, f], w_up [experts, d, f], w_down [experts, f, d],
              updates=(LowRank | None,) * 3, *, grouped_matmul="ragged_dot"|"tiled") -> [tokens, d]
      (per-expert LoRA updates, see moe_experts)
  tiled_grouped_matmul(x [rows, in] sorted by expert, w [experts, in, out], group_sizes [experts], *, tile=128)
      -> [rows, out] float32   (ragged_dot's grouped matmul as fixed tiles: fast where ragged_dot has no grouped
      kernel, e.g. XLA:CPU)
  moe_experts_expert_parallel(<moe_experts args>, *, mesh, expert_axis="expert",
                              token_axes=("data", "fsdp", "expert")) -> [tokens, d]   (shard_map over experts;
      all-gather dispatch: every token to every expert shard)
  moe_experts_all_to_all(<moe_experts args>, *, mesh, expert_axis="expert", token_axes=..., capacity_factor=None,
                         exchange="all_to_all"|"ragged_all_to_all") -> ([tokens, d], dropped int32 scalar)
      (all-to-all dispatch: each (token, slot) pair only to its expert's device; dropless unless capacity_factor)
  expert_load(expert_ids [..., k], num_experts, mask [...] | None = None) -> [experts] float32
  update_balance_bias(bias [experts], load [experts], rate) -> [experts]
  sequence_balance_loss(scores [batch, seq, experts], expert_ids [batch, seq, k], segment_ids [batch, seq] | None)
      -> scalar float32 (multiply by the balance factor alpha yourself)

Typical DeepSeek-V3 layer (the shared experts are a plain SwiGLU added outside):
  ids, w, scores = route(x @ w_router, expert_bias, top_k=8, num_groups=8, topk_groups=4, scale=2.5)
  y = moe_experts(x, ids, w, w_gate, w_up, w_down)
  load = expert_load(ids, num_experts, mask)        # then, outside the gradient: update_balance_bias(...)

Shapes: see jaxopd/kernels/__init__.py.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxopd.kernels.layers import LowRank

ExpertUpdates = tuple[Optional[LowRank], Optional[LowRank], Optional[LowRank]]
GroupedMatmul = Literal["ragged_dot", "tiled"]

# transformers' DeepseekV3TopkRouter adds this to the top-k sum before normalizing, so an all-zero row stays finite.
_NORMALIZE_EPS = 1e-20


def _check_route_args(num_experts: int, top_k: int, score: str, num_groups: int, topk_groups: int) -> None:
    if score not in ("sigmoid", "softmax"):
        raise ValueError(f'score={score!r} is not supported: use "sigmoid" (DeepSeek-V3) or "softmax" (V2, Qwen-MoE)')
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide num_experts={num_experts}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups={topk_groups} must lie in [1, num_groups={num_groups}]")
    reachable = topk_groups * (num_experts // num_groups)
    if not 1 <= top_k <= reachable:
        raise ValueError(
            f"top_k={top_k} must lie in [1, {reachable}]: only topk_groups * experts_per_group experts can be chosen"
        )


def route(
    logits: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    top_k: int,
    score: str = "sigmoid",
    num_groups: int = 1,
    topk_groups: int = 1,
    normalize: bool = True,
    scale: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Choose `top_k` experts per token and their gate weights.

    Args:
      logits: router logits `[..., experts]` (usually `[tokens, experts]`); scored in float32.
      bias: `[experts]` load-balancing bias (DeepSeek-V3 `e_score_correction_bias`) or None. It changes which
        experts are chosen, never the gate weights, and receives no gradient.
      top_k: experts per token.
      score: "sigmoid" (DeepSeek-V3) or "softmax" over all experts (DeepSeek-V2, Qwen-MoE, Mixtral).
      num_groups, topk_groups: group-limited routing (DeepSeek-V2/V3): experts form `num_groups` equal groups, only
        the best `topk_groups` groups per token are eligible. A group's score is the sum of its two best biased
        scores for sigmoid (V3) and its best score for softmax (V2).
      normalize: divide the k gate weights by their sum (V3 `norm_topk_prob`; Mixtral's softmax over the top-k
        logits is the same thing).
      scale: multiplies the final weights (`routed_scaling_factor`).

    Returns:
      expert_ids `[..., top_k]` int32, weights `[..., top_k]` float32, scores `[..., experts]` float32 (the
      unbiased sigmoid or softmax scores, for the sequence-wise balance loss).
    """
    num_experts = logits.shape[-1]
    _check_route_args(num_experts, top_k, score, num_groups, topk_groups)
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"bias has shape {bias.shape}; expected ({num_experts},) to match the logits' experts axis")

    logits = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    # Selection is discrete and the bias takes no gradient (V3 sec. 2.1.2): the logits learn only through `weights`.
    choice = jax.lax.stop_gradient(choice)
    if num_groups > 1:
        per_group = num_experts // num_groups
        choice_xYxZ = choice.reshape(*choice.shape[:-1], num_groups, per_group)
        if score == "sigmoid":
            group_scores = jax.lax.top_k(choice_xYxZ, min(2, per_group))[0].sum(-1)
        else:
            group_scores = choice_xYxZ.max(-1)
        _, kept_groups = jax.lax.top_k(group_scores, topk_groups)
        keep_xY = jax.nn.one_hot(kept_groups, num_groups, dtype=jnp.bool_).any(-2)
        choice = jnp.where(keep_xY[..., None], choice_xYxZ, -jnp.inf).reshape(choice.shape)
    _, expert_ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if normalize:
        weights = weights / (weights.sum(-1, keepdims=True) + _NORMALIZE_EPS)
    return expert_ids.astype(jnp.int32), weights * scale, scores


def moe_experts(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    updates: ExpertUpdates = (None, None, None),
    *,
    grouped_matmul: GroupedMatmul = "ragged_dot",
) -> jax.Array:
    """Dropless routed-expert SwiGLU: `sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`.

    The `tokens * k` (token, slot) pairs are sorted by expert, gathered into one `[tokens * k, d]` array and run
    through grouped matmuls with per-expert group sizes, then unsorted and combined. No capacity, no dropped
    tokens, no `[tokens, experts, d]` array. `grouped_matmul="ragged_dot"` uses `jax.lax.ragged_dot`, which GPU and
    TPU run as grouped kernels; XLA:CPU lowers it as a masked matmul over all experts (E / k times the routed
    FLOPs), so on CPU use "tiled" (`tiled_grouped_matmul`: the routed FLOPs plus at most one tile of padding per
    expert).

    Args:
      x: `[tokens, d]`.
      expert_ids: `[tokens, k]` int, values in `[0, experts)`.
      weights: `[tokens, k]` gate weights.
      w_gate, w_up: `[experts, d, f]`; w_down: `[experts, f, d]`.
      updates: per-expert LoRA updates of (w_gate, w_up, w_down), each None or a `LowRank` with a `[experts, d, r]`,
        b `[experts, r, f]` (w_down: `[experts, f, r]`, `[experts, r, d]`), run through the same grouped matmuls;
        keep masks `[tokens, k, d]` (w_down: `[tokens, k, f]`), one per (token, slot) pair.
      grouped_matmul: "ragged_dot" or "tiled", see above.

    Returns:
      `[tokens, d]` in x's dtype (matmuls accumulate and combine in float32).
    """
    tokens, d = x.shape
    num_experts, _, f = w_gate.shape
    if expert_ids.ndim != 2 or expert_ids.shape[0] != tokens or weights.shape != expert_ids.shape:
        raise ValueError(
            f"expert_ids {expert_ids.shape} and weights {weights.shape} must both be [tokens={tokens}, k]"
        )
    if w_gate.shape != (num_experts, d, f) or w_up.shape != (num_experts, d, f) or w_down.shape != (num_experts, f, d):
        raise ValueError(
            f"expert weights w_gate {w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape} must be "
            f"[experts, d={d}, f], [experts, d, f], [experts, f, d]"
        )
    if grouped_matmul not in get_args(GroupedMatmul):
        raise ValueError(f"grouped_matmul={grouped_matmul!r} must be one of {get_args(GroupedMatmul)}")
    return _grouped_swiglu(x, expert_ids, weights, w_gate, w_up, w_down, updates, first_expert=0,
                           grouped_matmul=grouped_matmul)


def tiled_grouped_matmul(x_MxI: jax.Array, w_ExIxO: jax.Array, group_sizes: jax.Array, *, tile: int = 128
                         ) -> jax.Array:
    """`jax.lax.ragged_dot(x, w, group_sizes)` as one batched matmul of fixed tiles.

    Each expert's rows are padded to a multiple of `tile` and cut into tiles, every tile is multiplied by its
    expert's weights, and the rows are gathered back. The static tile count `(rows + experts * (tile - 1)) // tile`
    bounds every routing, so the FLOPs are the routed ones plus at most `tile - 1` padding rows per expert, not
    ragged_dot's XLA:CPU lowering's `experts` times all rows. Memory: the tiles' weights `[tiles, in, out]` are
    gathered (and their gradient summed back per expert), so keep `tile` large where `in * out` is.

    Args:
      x_MxI: `[rows, in]`, sorted by expert: rows `[sum(group_sizes[:e]), sum(group_sizes[:e+1]))` are expert e's.
      w_ExIxO: `[experts, in, out]`.
      group_sizes: `[experts]` int, summing to at most `rows` (rows past the sum give zero).
      tile: rows per tile.

    Returns:
      `[rows, out]` float32.
    """
    rows, _ = x_MxI.shape
    num_experts = w_ExIxO.shape[0]
    if group_sizes.shape != (num_experts,):
        raise ValueError(f"group_sizes has shape {group_sizes.shape}; expected ({num_experts},), one per expert")
    if tile < 1:
        raise ValueError(f"tile={tile} must be >= 1")
    tile = min(tile, rows) or 1
    num_tiles = (rows + num_experts * (tile - 1)) // tile
    group_sizes = group_sizes.astype(jnp.int32)
    padded_sizes_E = (group_sizes + tile - 1) // tile * tile
    group_ends_E, padded_ends_E = jnp.cumsum(group_sizes), jnp.cumsum(padded_sizes_E)
    shift_E = (padded_ends_E - padded_sizes_E) - (group_ends_E - group_sizes)  # padded position - row, in group e
    # Row r of expert e sits at padded position r + shift[e]; padded positions past their group take no row.
    # searchsorted gives num_experts past the last group; clamped, those rows and positions read the last expert's
    # entries and are masked out below.
    expert_of_row_M = jnp.searchsorted(group_ends_E, jnp.arange(rows), side="right")
    position_M = jnp.where(expert_of_row_M < num_experts,
                           jnp.arange(rows) + shift_E[jnp.minimum(expert_of_row_M, num_experts - 1)],
                           num_tiles * tile)
    position_P = jnp.arange(num_tiles * tile)
    expert_of_position_P = jnp.searchsorted(padded_ends_E, position_P, side="right")
    clamped_expert_P = jnp.minimum(expert_of_position_P, num_experts - 1)
    row_P = position_P - shift_E[clamped_expert_P]
    row_P = jnp.where((expert_of_position_P < num_experts) & (row_P < group_ends_E[clamped_expert_P]), row_P, rows)
    x_PxI = jnp.take(x_MxI, row_P, axis=0, mode="fill", fill_value=0)
    # Tiles past the last group hold only zero rows; any expert's weights do for them.
    tile_expert_N = clamped_expert_P[::tile]
    x_NxUxI = x_PxI.reshape(num_tiles, tile, -1)
    out_NxUxO = jnp.einsum("nui,nio->nuo", x_NxUxI, w_ExIxO[tile_expert_N], preferred_element_type=jnp.float32)
    return jnp.take(out_NxUxO.reshape(num_tiles * tile, -1), position_M, axis=0, mode="fill", fill_value=0)


def _matmul(grouped_matmul):
    """The grouped matmul `(x [M, in], w [E, in, out], group_sizes [E]) -> [M, out]` float32 of that name."""
    if grouped_matmul == "tiled":
        return tiled_grouped_matmul
    return lambda x, w, group_sizes: jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


def _grouped_dot(x_MxI, w_ExIxO, group_sizes, update, grouped_matmul="ragged_dot"):
    """The grouped matmul of the sorted rows with their experts' weights `[M, out]` float32, plus the LoRA update's
    ((keep * x) a) b through the same groups (keep `[M, in]` in the rows' order)."""
    matmul = _matmul(grouped_matmul)
    out_MxO = matmul(x_MxI, w_ExIxO, group_sizes)
    if update is None:
        return out_MxO
    if update.keep is not None:
        x_MxI = x_MxI * update.keep.astype(x_MxI.dtype)
    hidden_MxR = matmul(x_MxI, update.a, group_sizes)
    return out_MxO + matmul(hidden_MxR.astype(x_MxI.dtype), update.b, group_sizes)


def _sort_by_expert(local_ids_M, num_local):
    """(order `[M]`: sorted row -> row, group_sizes `[num_local]` int32) for rows routed to local experts
    `[0, num_local)`; rows with any other id sort last, past sum(group_sizes)."""
    local_ids_M = jnp.where((local_ids_M >= 0) & (local_ids_M < num_local), local_ids_M, num_local)
    order_M = jnp.argsort(local_ids_M, stable=True)
    return order_M, jnp.bincount(local_ids_M, length=num_local).astype(jnp.int32)


def _map_keeps(fn, updates):
    """The updates with `fn` applied to each keep mask."""
    return tuple(u if u is None or u.keep is None else u._replace(keep=fn(u.keep)) for u in updates)


def _pair_keeps(updates):
    """The updates with each keep mask `[tokens, k, in]` flattened to one row per (token, slot) pair `[M, in]`."""
    return _map_keeps(lambda keep: keep.reshape(-1, keep.shape[-1]), updates)


def _local_experts(x_MxD, local_ids_M, w_gate, w_up, w_down, updates, grouped_matmul="ragged_dot"):
    """The local experts' SwiGLU of rows in any order: row m through expert `local_ids_M[m]` of the
    `w_gate.shape[0]` local ones, zero for rows with an id outside them. updates' keep masks are `[M, in]`, one per
    row. Returns `[M, d]` float32 in the rows' order."""
    order_M, group_sizes = _sort_by_expert(local_ids_M, w_gate.shape[0])
    sorted_updates = _map_keeps(lambda keep: keep[order_M], updates)
    x_sorted_MxD = x_MxD[order_M]
    gate_update, up_update, down_update = sorted_updates
    gate_MxF = _grouped_dot(x_sorted_MxD, w_gate, group_sizes, gate_update, grouped_matmul)
    up_MxF = _grouped_dot(x_sorted_MxD, w_up, group_sizes, up_update, grouped_matmul)
    hidden_MxF = (jax.nn.silu(gate_MxF) * up_MxF).astype(x_MxD.dtype)
    out_sorted_MxD = _grouped_dot(hidden_MxF, w_down, group_sizes, down_update, grouped_matmul)
    # ragged_dot leaves rows outside every group unspecified; zero them explicitly.
    in_group_M = jnp.arange(order_M.shape[0]) < group_sizes.sum()
    out_sorted_MxD = jnp.where(in_group_M[:, None], out_sorted_MxD, 0.0)
    # Unsort with the inverse permutation (a gather, whose gradient is a scatter).
    return out_sorted_MxD[jnp.argsort(order_M)]


def _combine(out_MxD, weights_TxU):
    """`[tokens * k, d]` per-pair outputs (token-major) weighted over the k slots: `[tokens, d]` float32."""
    tokens, k = weights_TxU.shape
    out_TxUxD = out_MxD.reshape(tokens, k, -1).astype(jnp.float32)
    return jnp.einsum("tud,tu->td", out_TxUxD, weights_TxU.astype(jnp.float32))


def _grouped_swiglu(x, expert_ids, weights, w_gate, w_up, w_down, updates, first_expert, grouped_matmul="ragged_dot"):
    """Experts `[first_expert, first_expert + w_gate.shape[0])` applied to their (token, slot) pairs; pairs routed
    to other experts contribute zero. `[tokens, d]` float32-combined, in x's dtype."""
    k = expert_ids.shape[1]
    pair_token_M = jnp.arange(expert_ids.size) // k
    out_MxD = _local_experts(x[pair_token_M], expert_ids.reshape(-1) - first_expert, w_gate, w_up, w_down,
                             _pair_keeps(updates), grouped_matmul)
    return _combine(out_MxD, weights).astype(x.dtype)


def _check_expert_parallel(x, w_gate, mesh, expert_axis, token_axes):
    """The token axes the mesh has, after checking that experts and tokens divide over the mesh."""
    if expert_axis not in mesh.shape:
        raise ValueError(f"expert_axis={expert_axis!r} is not a mesh axis; the mesh has {tuple(mesh.shape)}")
    num_experts, num_shards = w_gate.shape[0], mesh.shape[expert_axis]
    if num_experts % num_shards:
        raise ValueError(f"num_experts={num_experts} must divide by the {expert_axis!r} mesh axis size {num_shards}")
    token_axes = tuple(a for a in token_axes if a in mesh.shape)
    token_shards = int(np.prod([mesh.shape[a] for a in token_axes]))
    if x.shape[0] % token_shards:
        raise ValueError(f"tokens={x.shape[0]} must divide by the token axes {token_axes} total size {token_shards}")
    return token_axes


def _update_specs(updates, expert_spec, token_spec):
    # Adapters split over experts like the weights; keep masks ([tokens, k, in]) over tokens like x.
    return tuple(None if u is None else LowRank(expert_spec, expert_spec, None if u.keep is None else token_spec)
                 for u in updates)


def moe_experts_expert_parallel(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    updates: ExpertUpdates = (None, None, None),
    *,
    mesh: jax.sharding.Mesh,
    expert_axis: str = "expert",
    token_axes: tuple[str, ...] = ("data", "fsdp", "expert"),
) -> jax.Array:
    """`moe_experts` with the experts sharded over the mesh axis `expert_axis` (expert parallelism, via shard_map).

    Tokens are sharded over those of `token_axes` that the mesh has; each device holds experts
    `[i * E/n, (i+1) * E/n)` for its index i along `expert_axis`. When tokens are sharded over `expert_axis` too,
    each device all-gathers the tokens of its expert group, runs its own experts on the pairs routed to them, and a
    reduce-scatter sums the partial outputs back to the token owners; otherwise a psum does. Dropless, with static
    shapes and no capacity factor; it moves every token to every expert shard (all-gather rather than all-to-all,
    see `moe_experts_all_to_all`), trading bandwidth for simplicity.

    Args/returns as `moe_experts` (the LoRA updates' adapters are split over experts like the weights, their keep
    masks over tokens like x); `tokens` must divide by the product of the token axes' sizes, `experts` by the
    size of `expert_axis`.
    """
    token_axes = _check_expert_parallel(x, w_gate, mesh, expert_axis, token_axes)
    tokens_over_experts = expert_axis in token_axes
    token_spec = P(token_axes or None)
    expert_spec = P(expert_axis)
    update_specs = _update_specs(updates, expert_spec, token_spec)

    def local(x, expert_ids, weights, w_gate, w_up, w_down, updates):
        if tokens_over_experts:
            x, expert_ids, weights = (
                jax.lax.all_gather(a, expert_axis, tiled=True) for a in (x, expert_ids, weights)
            )
            updates = _map_keeps(lambda keep: jax.lax.all_gather(keep, expert_axis, tiled=True), updates)
        else:
            # Mark the replicated tokens as varying over the expert axis so the transpose psums their cotangent
            # over expert shards (jax 0.10.2 returned a wrong x gradient without it, see the tests).
            x, weights = jax.lax.pcast((x, weights), expert_axis, to="varying")
        first_expert = jax.lax.axis_index(expert_axis) * w_gate.shape[0]
        out = _grouped_swiglu(x, expert_ids, weights, w_gate, w_up, w_down, updates, first_expert)
        if tokens_over_experts:
            return jax.lax.psum_scatter(out, expert_axis, tiled=True)
        return jax.lax.psum(out, expert_axis)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(token_spec,) * 3 + (expert_spec,) * 3 + (update_specs,),
        out_specs=token_spec,
    )(x, expert_ids, weights, w_gate, w_up, w_down, tuple(updates))


Exchange = Literal["all_to_all", "ragged_all_to_all"]


def _exchange(a_NxCx, send_sizes_N, recv_sizes_N, axis_name, exchange, fill):
    """Swap per-peer blocks over `axis_name`: block j of `a_NxCx` (`[peers, C, ...]`, its first `send_sizes_N[j]`
    rows filled) goes to peer j, which receives it as its block i (i = this device's index). "all_to_all" moves
    the whole static blocks; "ragged_all_to_all" moves only the filled rows and leaves the rest of each received
    block at `fill` (XLA:CPU does not implement it; GPU and TPU do)."""
    if exchange == "all_to_all":
        return jax.lax.all_to_all(a_NxCx, axis_name, 0, 0, tiled=True)
    num_peers, capacity = a_NxCx.shape[:2]
    flat = a_NxCx.reshape(num_peers * capacity, *a_NxCx.shape[2:])
    block_starts_N = jnp.arange(num_peers, dtype=jnp.int32) * capacity
    # Every peer keeps the block of sender i at rows [i * C, (i + 1) * C) of its buffer.
    landing_N = jnp.full((num_peers,), jax.lax.axis_index(axis_name) * capacity, jnp.int32)
    out = jax.lax.ragged_all_to_all(flat, jnp.full_like(flat, fill), block_starts_N, send_sizes_N, landing_N,
                                    recv_sizes_N, axis_name=axis_name)
    return out.reshape(a_NxCx.shape)


def moe_experts_all_to_all(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    updates: ExpertUpdates = (None, None, None),
    *,
    mesh: jax.sharding.Mesh,
    expert_axis: str = "expert",
    token_axes: tuple[str, ...] = ("data", "fsdp", "expert"),
    capacity_factor: Optional[float] = None,
    exchange: Exchange = "all_to_all",
) -> tuple[jax.Array, jax.Array]:
    """`moe_experts` with experts sharded over `expert_axis` and all-to-all dispatch: each (token, slot) pair goes
    only to the device holding its expert (DeepSeek-V3, MaxText), not every token to every expert shard.

    Tokens are sharded over those of `token_axes` that the mesh has, which must include `expert_axis`; device i
    along `expert_axis` holds experts `[i * E/n, (i+1) * E/n)`. Per device, with T local tokens and n = the
    expert axis size: the T * k pairs are sorted by expert (so by destination), packed into n per-peer blocks of
    C rows (x, the local expert id, the LoRA keep masks), exchanged, run through the local experts grouped by
    expert (ragged_dot), exchanged back to their senders and combined with the routing weights there.

    The blocks have a static size C. `capacity_factor=None` is dropless: C = T * k (every pair of a device may go
    to one peer), so each exchange moves and holds `n * T * k` rows per device with "all_to_all" (k times the
    all-gather dispatch's `n * T` rows of x). A capacity factor c sets C = ceil(c * T * k / n) (c = 1 fits a
    perfectly balanced routing): pairs past a block's C rows are dropped (they contribute zero) and counted.
    `exchange="ragged_all_to_all"` moves only the filled rows (at most T * k per device whatever the routing),
    with the same buffers; XLA:CPU does not implement it.

    Args: as `moe_experts`, plus mesh, expert_axis, token_axes, capacity_factor (None or > 0), exchange.
    Returns: (`[tokens, d]` in x's dtype, dropped: int32 scalar, the pairs dropped over all devices; 0 when
    dropless). `tokens` must divide by the product of the token axes' sizes, `experts` by the expert axis size.
    """
    token_axes = _check_expert_parallel(x, w_gate, mesh, expert_axis, token_axes)
    if expert_axis not in token_axes:
        raise ValueError(f"all-to-all dispatch needs the tokens sharded over expert_axis={expert_axis!r}; "
                         f"token_axes={token_axes} lack it (use moe_experts_expert_parallel for replicated tokens)")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0, or None for dropless dispatch")
    if exchange not in get_args(Exchange):
        raise ValueError(f"exchange={exchange!r} must be one of {get_args(Exchange)}")
    num_peers = mesh.shape[expert_axis]
    num_local = w_gate.shape[0] // num_peers
    token_shards = int(np.prod([mesh.shape[a] for a in token_axes]))
    k = expert_ids.shape[1]
    pairs = x.shape[0] // token_shards * k  # per device
    capacity = pairs if capacity_factor is None else min(pairs, math.ceil(capacity_factor * pairs / num_peers))
    token_spec = P(token_axes)
    expert_spec = P(expert_axis)

    def local(x, expert_ids, weights, w_gate, w_up, w_down, updates):
        ids_M = expert_ids.reshape(-1)
        order_M = jnp.argsort(ids_M, stable=True)  # sorted pair -> pair; by expert, hence by destination
        peer_of_pair_M = ids_M // num_local
        sizes_N = jnp.bincount(peer_of_pair_M, length=num_peers).astype(jnp.int32)
        starts_N = jnp.cumsum(sizes_N) - sizes_N
        # Block row c of peer j holds sorted pair starts[j] + c, when c < sizes[j] (and c < C).
        row_C = jnp.arange(capacity, dtype=jnp.int32)
        filled_NxC = row_C[None, :] < sizes_N[:, None]
        pair_NxC = order_M[jnp.minimum(starts_N[:, None] + row_C[None, :], pairs - 1)]
        send_sizes_N = jnp.minimum(sizes_N, capacity)
        recv_sizes_N = jax.lax.all_to_all(send_sizes_N, expert_axis, 0, 0, tiled=True)

        def send(a_NxCx, fill):
            a_NxCx = jnp.where(filled_NxC.reshape(filled_NxC.shape + (1,) * (a_NxCx.ndim - 2)), a_NxCx, fill)
            return _exchange(a_NxCx, send_sizes_N, recv_sizes_N, expert_axis, exchange, fill)

        local_id_NxC = ids_M[pair_NxC] - jnp.arange(num_peers, dtype=jnp.int32)[:, None] * num_local
        # Unfilled rows carry the id num_local: no local expert, so they compute nothing and return zero.
        got_ids_M = send(local_id_NxC, num_local).reshape(-1)
        got_x_MxD = send(x[pair_NxC // k], 0).reshape(-1, x.shape[-1])
        got_updates = _map_keeps(lambda keep: send(keep[pair_NxC], 0).reshape(-1, keep.shape[-1]),
                                 _pair_keeps(updates))
        out_MxD = _local_experts(got_x_MxD, got_ids_M, w_gate, w_up, w_down, got_updates).astype(x.dtype)
        # The reverse exchange: results go back to their senders' blocks (unfilled rows are zero already).
        back_NxCxD = _exchange(out_MxD.reshape(num_peers, capacity, -1), recv_sizes_N, send_sizes_N, expert_axis,
                               exchange, 0)

        # Pair p sat at row rank[p] of its peer's block; past the capacity it was dropped (no row, zero output).
        sorted_rank_M = jnp.arange(pairs, dtype=jnp.int32) - starts_N[peer_of_pair_M[order_M]]
        rank_M = jnp.zeros_like(ids_M).at[order_M].set(sorted_rank_M)
        slot_M = jnp.where(rank_M < capacity, peer_of_pair_M * capacity + rank_M, num_peers * capacity)
        out_pairs_MxD = jnp.take(back_NxCxD.reshape(num_peers * capacity, -1), slot_M, axis=0, mode="fill",
                                 fill_value=0)
        dropped = jax.lax.psum((sizes_N - send_sizes_N).sum(), token_axes)
        return _combine(out_pairs_MxD, weights).astype(x.dtype), dropped

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(token_spec,) * 3 + (expert_spec,) * 3 + (_update_specs(updates, expert_spec, token_spec),),
        out_specs=(token_spec, P()),
    )(x, expert_ids, weights, w_gate, w_up, w_down, tuple(updates))


def expert_load(expert_ids: jax.Array, num_experts: int, mask: Optional[jax.Array] = None) -> jax.Array:
    """Fraction of routed slots that went to each expert, `[experts]` float32 (sums to 1, or 0 if all masked).

    Args:
      expert_ids: `[..., k]` int.
      num_experts: E.
      mask: `[...]` (expert_ids without its last axis); nonzero marks real tokens, padding is not counted.
    """
    if mask is None:
        mask = jnp.ones(expert_ids.shape[:-1], jnp.float32)
    elif mask.shape != expert_ids.shape[:-1]:
        raise ValueError(f"mask has shape {mask.shape}; expected {expert_ids.shape[:-1]} (expert_ids without k)")
    slot_mask = jnp.broadcast_to((mask != 0)[..., None], expert_ids.shape).astype(jnp.float32)
    counts = jnp.zeros(num_experts, jnp.float32).at[expert_ids.reshape(-1)].add(slot_mask.reshape(-1))
    return counts / jnp.maximum(counts.sum(), 1.0)


def update_balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2): raise the bias of under-loaded experts by `rate`
    (the paper's gamma), lower it for over-loaded ones. `load` is `expert_load`'s output (or raw counts)."""
    load = load.astype(jnp.float32)
    return (bias + rate * jnp.sign(load.mean() - load)).astype(bias.dtype)


def sequence_balance_loss(
    scores: jax.Array,
    expert_ids: jax.Array,
    segment_ids: Optional[jax.Array] = None,
) -> jax.Array:
    """Sequence-wise balance loss (DeepSeek-V3 eqs. 17-20), averaged over sequences; the caller multiplies by alpha.

    Per sequence of T tokens: f_i = E / (top_k T) * #{t : i in top-k(t)}, P_i = mean_t s_{i,t} / sum_j s_{j,t},
    loss = sum_i f_i P_i (1 when perfectly balanced; larger when not). Gradients flow through P (the scores).

    Args:
      scores: `[batch, seq, experts]` unbiased router scores (route's third output).
      expert_ids: `[batch, seq, k]` chosen experts.
      segment_ids: `[batch, seq]` int in `[0, seq]` or None. Each (row, nonzero segment id) is one sequence, 0 is
        padding and ignored; pass `(segment_ids > 0)` to treat each packed row as one sequence. None: every row is
        one sequence.
    """
    batch, seq, num_experts = scores.shape
    k = expert_ids.shape[-1]
    if expert_ids.shape[:2] != (batch, seq):
        raise ValueError(f"expert_ids has shape {expert_ids.shape}; expected [batch={batch}, seq={seq}, k]")
    if segment_ids is None:
        segment_ids = jnp.ones((batch, seq), jnp.int32)
    elif segment_ids.shape != (batch, seq):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected [batch={batch}, seq={seq}]")

    # One flat id per (row, segment); segment ids are < seq + 1 per row, padding goes to a dropped bucket.
    valid = (segment_ids > 0).reshape(-1)
    num_sequences = batch * (seq + 1)
    sequence_of_token = (jnp.arange(batch)[:, None] * (seq + 1) + segment_ids).reshape(-1)
    sequence_of_token = jnp.where(valid, sequence_of_token, num_sequences)

    scores_TxE = scores.astype(jnp.float32).reshape(-1, num_experts)
    # Padding rows may hold anything (even all zeros); keep them out of the division so no NaN reaches the gradient.
    scores_TxE = jnp.where(valid[:, None], scores_TxE, 1.0)
    normalized_TxE = scores_TxE / scores_TxE.sum(-1, keepdims=True)
    segment_sum = lambda data: jax.ops.segment_sum(data, sequence_of_token, num_segments=num_sequences + 1)[:-1]
    tokens_Q = segment_sum(valid.astype(jnp.float32))
    selected_QxE = (
        jnp.zeros((num_sequences + 1, num_experts), jnp.float32)
        .at[sequence_of_token[:, None], expert_ids.reshape(-1, k)]
        .add(1.0)[:-1]
    )
    has_tokens_Q = tokens_Q > 0
    per_token_Q = 1.0 / jnp.where(has_tokens_Q, tokens_Q, 1.0)
    f_QxE = (num_experts / k) * selected_QxE * per_token_Q[:, None]
    p_QxE = segment_sum(normalized_TxE) * per_token_Q[:, None]
    loss_Q = (f_QxE * p_QxE).sum(-1)
    return jnp.where(has_tokens_Q, loss_Q, 0.0).sum() / jnp.maximum(has_tokens_Q.sum(), 1)

"""Rematerialization policies by name (`ModelConfig.remat`): what each decoder block keeps from its forward pass for
the backward pass, and what it recomputes instead.

Activation memory against recompute, from most memory to least (per block; everything not kept is recomputed from
the block's input, which every policy but "none" keeps):
  "none"    no remat: every intermediate the backward pass needs stays in device memory. Fastest; use it when the
            activations fit.
  "dots_saveable"
            keeps every matmul output, the attention logits `[b, heads, t, t]` included (float32 with the "xla"
            attention), and recomputes only the elementwise work (norms, SwiGLU, softmax, RoPE). Logits grow with t**2:
            for short sequences only.
  "dots_with_no_batch_dims_saveable"
            keeps the outputs of the weight matmuls (q/k/v/o projections, MLA's low-rank factors, dense and
            shared-expert MLPs, router), whose size grows with tokens * width, and recomputes attention itself (its
            einsums batch over batch and heads) and the elementwise work. The usual choice when "none" does not
            fit: little recompute for most of the memory saved.
  "offload" the same outputs as "dots_with_no_batch_dims_saveable", moved to pinned host memory after the forward pass
            and back for the backward pass: device memory close to "full", recompute close to the dots policies, at
            the cost of host<->device copies (PCIe on GPUs, so it pays where copies overlap compute). CPU devices also
            have a "pinned_host" memory, so it runs there too (and saves nothing: host memory is device memory).
  "full"    keeps only the block's input and recomputes the whole block (a second forward pass of it). Least
            memory, about a third more compute per step; the pod-scale choice.

Routed experts run through `jax.lax.ragged_dot`, which neither dots policy counts as a matmul: their outputs are
recomputed under every policy but "none".
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax

from jaxopd.model.config import RematPolicy

# nn.remat's `policy` for each name but "none"; None recomputes everything (jax.checkpoint's default).
_POLICIES: dict[str, Optional[Callable]] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(offload_src="device",
                                                                      offload_dst="pinned_host"),
}


def remat_block(block_cls: type[nn.Module], policy: RematPolicy, in_scan: bool = False) -> type[nn.Module]:
    """`block_cls` rematerialized in the backward pass under the named policy (the class itself for "none").
    in_scan: the block is the body of a scan, whose loop already keeps XLA from merging the recomputation into the
    forward pass, so jax.checkpoint's guard against that (prevent_cse) is dropped, as jax advises for scans."""
    if policy == "none":
        return block_cls
    return nn.remat(block_cls, policy=_POLICIES[policy], prevent_cse=not in_scan)

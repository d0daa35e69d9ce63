"""Kernels: pure functions on arrays and plain Python numbers (no Flax, no configs, no meshes).

masks (the attention mask rule), attention (GQA, MLA), blockwise_attention, context_parallel (attention with the
sequence split over a mesh axis), rope, moe (routing, dispatch, balance),
layers (RMSNorm, SwiGLU), losses (chunked cross-entropy, token log-probs, KL and JSD, top-k KL).

Shape legend. Inside kernels, array names end in their shape, one letter per axis (`q_BxTxKxGxA` is
`[batch, q_len, kv_heads, groups, qk_head_dim]`); a lowercase `x` first stands for any leading axes (`gate_xF` is
`[..., F]`), and `1` for a broadcast axis. Each letter means one thing in every file:
  B  batch
  T  sequence: query positions (a flat list of tokens is T too)
  S  key/value sequence (T itself in self-attention; the cache in decode)
  D  model width
  H  query heads
  K  key/value heads
  G  heads per key/value head (H = K * G)
  E  experts
  V  vocabulary
  F  MLP width (one expert's, in the MoE)
  C  latent rank (MLA kv_lora_rank)
  L  layers
Head dims, each its own letter:
  A  query/key head dim (MLA: N + R)
  O  value head dim (a head's output width)
  N  MLA non-rotary query/key head dim (qk_nope_head_dim)
  R  rotary head dim (MLA qk_rope_head_dim)
  P  rotary pairs (R / 2)
Blocks of a sequence:
  I  a block of T (a blockwise-attention query block; a losses sequence chunk)
  J  a block of S (a blockwise-attention key/value block)
Top-k choices:
  U  chosen per token (top_k): MoE's experts; the teacher's top-k tokens of the top-k distillation losses
MoE routing and balance:
  M  (token, chosen expert) pairs, T * U, sorted by expert
  Y  expert groups (group-limited routing)
  Z  experts per group (E / Y)
  Q  sequences (documents) of a packed batch
Distillation:
  W  the teacher's model width, where it may differ from the student's D
"""

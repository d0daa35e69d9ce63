"""RoPE frequencies vs transformers' ROPE_INIT_FUNCTIONS and float64 references; rotation vs complex multiplication."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek

from jaxopd.kernels.rope import RopeScaling, apply_rope, rope_frequencies, yarn_softmax_scale_factor

YARN_PAPER = RopeScaling(kind="yarn", factor=8.0, original_max_position_embeddings=512, beta_fast=32.0, beta_slow=1.0)
YARN_DEEPSEEK = RopeScaling(
    kind="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.8
)
LLAMA3 = RopeScaling(kind="llama3", factor=8.0, original_max_position_embeddings=8192, low_freq_factor=1.0,
                     high_freq_factor=4.0)


def _hf_frequencies(rope_type, head_dim, theta, scaling, max_position_embeddings=4096, seq_len=None):
    params = {"rope_type": rope_type, "rope_theta": theta, "factor": scaling.factor}
    if rope_type == "yarn":
        params.update(original_max_position_embeddings=scaling.original_max_position_embeddings,
                      beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, mscale=scaling.mscale,
                      mscale_all_dim=scaling.mscale_all_dim)
    if rope_type == "llama3":
        params.update(original_max_position_embeddings=scaling.original_max_position_embeddings,
                      low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=max_position_embeddings, rope_parameters=params)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    return inv_freq.numpy(), attention_factor


# ---- float64 references written from the papers, pair by pair -------------------------------------------------------

def _plain_inv_freq(head_dim, theta):
    return np.array([theta ** (-2.0 * i / head_dim) for i in range(head_dim // 2)])


def _yarn_reference(head_dim, theta, s: RopeScaling):
    """YaRN sec. 3.2 as released: the interpolation weight ramps linearly over the pair indices whose rotation count
    over the original context lies between beta_fast and beta_slow (boundaries rounded outwards to whole pairs)."""
    def pair_at(rotations):  # solve L * theta^(-2i/d) / (2 pi) = rotations for i
        return head_dim * math.log(s.original_max_position_embeddings / (2 * math.pi * rotations)) / (2 * math.log(theta))
    first = max(math.floor(pair_at(s.beta_fast)), 0)
    last = min(math.ceil(pair_at(s.beta_slow)), head_dim - 1)
    out = []
    for i, base_freq in enumerate(_plain_inv_freq(head_dim, theta)):
        interpolated_share = min(max((i - first) / (last - first), 0.0), 1.0)
        out.append(interpolated_share * base_freq / s.factor + (1 - interpolated_share) * base_freq)
    return np.array(out)


def _llama3_reference(head_dim, theta, s: RopeScaling):
    out = []
    for base_freq in _plain_inv_freq(head_dim, theta):
        wavelength = 2 * math.pi / base_freq
        if wavelength < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(base_freq)
        elif wavelength > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(base_freq / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * base_freq / s.factor + smooth * base_freq)
    return np.array(out)


@pytest.mark.parametrize("scaling", [YARN_PAPER, YARN_DEEPSEEK], ids=["paper", "deepseek_mscale"])
def test_yarn_frequencies_match_transformers_and_paper(scaling):
    head_dim, theta = 64, 10000.0
    inv_freq, attention_scale = rope_frequencies(head_dim, theta, scaling)
    hf_inv_freq, hf_attention = _hf_frequencies("yarn", head_dim, theta, scaling)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (head_dim // 2,)
    np.testing.assert_allclose(inv_freq, hf_inv_freq, rtol=2e-6)
    np.testing.assert_allclose(inv_freq, _yarn_reference(head_dim, theta, scaling), rtol=1e-6)
    np.testing.assert_allclose(attention_scale, hf_attention, rtol=1e-12)
    if scaling.mscale_all_dim:  # DeepSeek: ratio of the two temperatures
        expected = (0.1 * scaling.mscale * math.log(scaling.factor) + 1) / (
            0.1 * scaling.mscale_all_dim * math.log(scaling.factor) + 1)
    else:  # YaRN eq. 22: sqrt(1/t) = 0.1 ln(s) + 1
        expected = 0.1 * math.log(scaling.factor) + 1
    np.testing.assert_allclose(attention_scale, expected, rtol=1e-12)


def test_yarn_keeps_fast_pairs_and_interpolates_slow_pairs():
    head_dim, theta, s = 64, 10000.0, YARN_PAPER
    inv_freq, _ = rope_frequencies(head_dim, theta, s)
    plain = _plain_inv_freq(head_dim, theta)
    rotations = s.original_max_position_embeddings * plain / (2 * math.pi)
    fast, slow = rotations > s.beta_fast, rotations < s.beta_slow
    assert fast.any() and slow.any()
    np.testing.assert_allclose(inv_freq[fast], plain[fast], rtol=1e-6)
    np.testing.assert_allclose(inv_freq[slow], plain[slow] / s.factor, rtol=1e-6)


def test_yarn_untruncated_range_matches_transformers():
    from jaxopd.kernels.rope import _yarn_inv_freq

    head_dim, theta, s = 64, 150000.0, RopeScaling(kind="yarn", factor=32.0, original_max_position_embeddings=4096)
    params = {"rope_type": "yarn", "rope_theta": theta, "factor": s.factor, "truncate": False,
              "original_max_position_embeddings": s.original_max_position_embeddings}
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=131072,
                         rope_parameters=params)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = _yarn_inv_freq(_plain_inv_freq(head_dim, theta), head_dim, theta, s, truncate=False)
    np.testing.assert_allclose(ours, hf_inv_freq.numpy(), rtol=2e-6)
    truncated = _yarn_inv_freq(_plain_inv_freq(head_dim, theta), head_dim, theta, s, truncate=True)
    assert not np.allclose(ours, truncated, rtol=1e-4)


def test_linear_and_llama3_frequencies_match_transformers_and_reference():
    head_dim, theta = 64, 500000.0
    linear = RopeScaling(kind="linear", factor=4.0)
    inv_freq, attention_scale = rope_frequencies(head_dim, theta, linear)
    np.testing.assert_allclose(inv_freq, _hf_frequencies("linear", head_dim, theta, linear)[0], rtol=2e-6)
    np.testing.assert_allclose(inv_freq, _plain_inv_freq(head_dim, theta) / 4.0, rtol=1e-6)
    assert attention_scale == 1.0

    inv_freq, attention_scale = rope_frequencies(head_dim, theta, LLAMA3)
    reference = _llama3_reference(head_dim, theta, LLAMA3)
    plain = _plain_inv_freq(head_dim, theta)
    medium = ~np.isclose(reference, plain) & ~np.isclose(reference, plain / LLAMA3.factor)
    assert medium.any(), "test should cover the blended band"
    np.testing.assert_allclose(inv_freq, _hf_frequencies("llama3", head_dim, theta, LLAMA3)[0], rtol=2e-6)
    np.testing.assert_allclose(inv_freq, reference, rtol=1e-6)
    assert attention_scale == 1.0


def test_ntk_base_change_matches_transformers_dynamic_at_equal_stretch():
    head_dim, theta, factor, max_len = 32, 10000.0, 2.0, 1000
    ntk = RopeScaling(kind="ntk", factor=factor)
    inv_freq, _ = rope_frequencies(head_dim, theta, ntk)
    # transformers' dynamic NTK stretches the base by (f * n / L - (f - 1)); at n = L (2f - 1) / f that is exactly f.
    seq_len = int(max_len * (2 * factor - 1) / factor)
    hf_inv_freq, _ = _hf_frequencies("dynamic", head_dim, theta, ntk, max_position_embeddings=max_len, seq_len=seq_len)
    np.testing.assert_allclose(inv_freq, hf_inv_freq, rtol=2e-6)
    new_base = theta * factor ** (head_dim / (head_dim - 2))
    np.testing.assert_allclose(inv_freq, _plain_inv_freq(head_dim, new_base), rtol=1e-6)
    # The lowest frequency is interpolated by exactly `factor` (the point of the base change).
    np.testing.assert_allclose(inv_freq[-1], _plain_inv_freq(head_dim, theta)[-1] / factor, rtol=1e-6)


def test_plain_frequencies_and_softmax_scale_factor():
    inv_freq, attention_scale = rope_frequencies(16, 10000.0, None)
    np.testing.assert_allclose(inv_freq, _plain_inv_freq(16, 10000.0), rtol=1e-7)
    assert attention_scale == 1.0
    assert yarn_softmax_scale_factor(None) == 1.0
    assert yarn_softmax_scale_factor(YARN_PAPER) == 1.0
    hf_scale = hf_deepseek.yarn_apply_mscale(
        {"rope_type": "yarn", "factor": YARN_DEEPSEEK.factor, "mscale_all_dim": YARN_DEEPSEEK.mscale_all_dim}, 1.0)
    np.testing.assert_allclose(yarn_softmax_scale_factor(YARN_DEEPSEEK), hf_scale, rtol=1e-12)
    np.testing.assert_allclose(yarn_softmax_scale_factor(YARN_DEEPSEEK),
                               (0.1 * 0.8 * math.log(40.0) + 1) ** 2, rtol=1e-12)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(15, 10000.0)
    with pytest.raises(ValueError, match="kind"):
        rope_frequencies(16, 10000.0, RopeScaling(kind="dynamic", factor=2.0))
    with pytest.raises(ValueError, match="high_freq_factor"):
        rope_frequencies(16, 10000.0, dataclasses.replace(LLAMA3, high_freq_factor=1.0))
    inv_freq, _ = rope_frequencies(16, 10000.0)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(jnp.zeros((1, 2, 1, 16)), jnp.zeros((1, 2), jnp.int32), inv_freq, layout="neox")
    with pytest.raises(ValueError, match="positions"):
        apply_rope(jnp.zeros((1, 2, 1, 16)), jnp.zeros((2, 1), jnp.int32), inv_freq)


def _complex_rotation_reference(x, positions, inv_freq, layout, attention_scale):
    """Rotate each pair as a complex number a + ib by exp(i * position * freq), in float64."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    if layout == "interleaved":
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., :half] + 1j * x[..., half:]
    angle = np.asarray(positions, np.float64)[:, :, None, None] * np.asarray(inv_freq, np.float64)
    z = z * np.exp(1j * angle) * attention_scale
    out = np.empty_like(x)
    if layout == "interleaved":
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        out[..., :half], out[..., half:] = z.real, z.imag
    return out


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
def test_apply_rope_matches_complex_rotation(layout):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
    positions = np.array([[0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11]], np.int32)  # row 0: two packed docs
    inv_freq, attention_scale = rope_frequencies(16, 10000.0, YARN_DEEPSEEK)
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq, layout, attention_scale)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _complex_rotation_reference(x, positions, inv_freq, layout,
                                                                            attention_scale), atol=2e-5)
    # Position 0 is the identity (up to the temperature), so packed documents restart cleanly.
    np.testing.assert_allclose(np.asarray(out)[0, 3], x[0, 3] * attention_scale, rtol=1e-6)
    out_bf16 = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(positions), inv_freq, layout, attention_scale)
    assert out_bf16.dtype == jnp.bfloat16


def test_interleaved_matches_transformers_deepseek_v3_interleave():
    rope_dim, heads, seq = 16, 2, 9
    config = DeepseekV3Config(
        hidden_size=32, num_attention_heads=heads, num_key_value_heads=heads, qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=8, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None, max_position_embeddings=2048,
        rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 0.8})
    rotary = hf_deepseek.DeepseekV3RotaryEmbedding(config)
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 100, 1500]], np.int64)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, seq, heads, rope_dim)).astype(np.float32)
    k = rng.standard_normal((1, seq, heads, rope_dim)).astype(np.float32)
    cos, sin = rotary(torch.zeros(1, seq, rope_dim), torch.from_numpy(positions))
    hf_q, hf_k = hf_deepseek.apply_rotary_pos_emb_interleave(
        torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos, sin)
    hf_q, hf_k = hf_q.transpose(1, 2).numpy(), hf_k.transpose(1, 2).numpy()

    scaling = RopeScaling(kind="yarn", factor=8.0, original_max_position_embeddings=256, mscale=1.0,
                          mscale_all_dim=0.8)
    inv_freq, attention_scale = rope_frequencies(rope_dim, 10000.0, scaling)
    np.testing.assert_allclose(attention_scale, rotary.attention_scaling, rtol=1e-12)
    ours_q = np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(positions), inv_freq, "interleaved", attention_scale))
    ours_k = np.asarray(apply_rope(jnp.asarray(k), jnp.asarray(positions), inv_freq, "interleaved", attention_scale))
    # transformers returns the rotated pairs de-interleaved: evens then odds.
    deinterleave = np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])
    np.testing.assert_allclose(ours_q[..., deinterleave], hf_q, atol=5e-4, rtol=1e-4)
    np.testing.assert_allclose(ours_k[..., deinterleave], hf_k, atol=5e-4, rtol=1e-4)
    # ...so attention logits agree exactly in either layout.
    np.testing.assert_allclose(np.einsum("bthd,bshd->bhts", ours_q, ours_k),
                               np.einsum("bthd,bshd->bhts", hf_q, hf_k), atol=2e-3, rtol=1e-4)


def test_rope_imports_without_the_model():
    """Kernels are math: jaxopd.kernels.rope (RopeScaling included) must not import jaxopd.model."""
    code = "import sys, jaxopd.kernels.rope; assert not [m for m in sys.modules if m.startswith('jaxopd.model')]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2],
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})

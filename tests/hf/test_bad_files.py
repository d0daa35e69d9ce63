"""A damaged Hugging Face directory is an error that names the file and what is wrong with it."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxopd.distill.teacher import load_model
from jaxopd.hf import load_hf
from jaxopd.hf.safetensors_io import SafetensorsReader

CONFIG = {"model_type": "qwen3", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "max_position_embeddings": 32, "tie_word_embeddings": False}


def test_a_truncated_shard_is_named(tmp_path):
    shard = tmp_path / "model.safetensors"
    save_file({"a": np.zeros((64, 64), np.float32)}, str(shard))
    data = shard.read_bytes()
    shard.write_bytes(data[:40])  # the header cut off
    with pytest.raises(ValueError, match=rf"{shard} is not a readable safetensors file.*truncated"):
        SafetensorsReader(tmp_path)
    shard.write_bytes(data[: len(data) // 2])  # the header whole, the tensor's bytes cut
    try:
        reader = SafetensorsReader(tmp_path)
    except ValueError as error:  # safetensors may check the size up front
        assert str(shard) in str(error)
    else:
        with pytest.raises(ValueError, match=rf"{shard}: tensor 'a' does not read"):
            reader.read("a", (128, 128))


@pytest.mark.parametrize("loader", [load_hf, load_model])
def test_a_config_json_that_is_not_json_is_named(tmp_path, loader):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG)[:-5])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not valid JSON"):
        loader(tmp_path)

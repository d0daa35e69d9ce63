"""load_hf loads a checkpoint in its own dtype unless asked (config.json's `dtype`, or `torch_dtype` as transformers
before 5 wrote it, else the stored tensors'); save_hf stores the dtype it is asked for. Round trips are compared
tensor by tensor with the safetensors files and with transformers' float32 logits."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxopd.hf import hf_model_config, load_hf, save_hf
from jaxopd.hf.safetensors_io import SafetensorsReader
from tests import tiny_hf

TOKENS = np.array([[1, 6, 7, 15, 8, 17, 9, 10, 2]])


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return tiny_hf.write_qwen3(tmp_path_factory.mktemp("qwen3"), tokenizer=False)


def _stored(directory):
    return load_file(str(directory / "model.safetensors"))


def test_a_float32_checkpoint_loads_and_saves_as_float32_exactly(qwen3, tmp_path):
    model, params = load_hf(qwen3)
    assert model.config.param_dtype == model.config.dtype == "float32"
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype("float32")}
    reference = transformers.AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    expected = reference(torch.tensor(TOKENS)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, TOKENS)), expected, atol=1e-5, rtol=0)

    save_hf(model, params, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    original, written = _stored(qwen3), _stored(tmp_path / "out")
    assert written.keys() == original.keys()
    for name, tensor in original.items():
        assert written[name].dtype == np.float32 and np.array_equal(written[name], tensor), name


def test_save_hf_writes_bfloat16_when_asked_and_load_hf_then_defaults_to_it(qwen3, tmp_path):
    model, params = load_hf(qwen3)
    save_hf(model, params, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reader = SafetensorsReader(tmp_path / "bf16")
    assert {reader.stored_dtype(name) for name in reader.file_of} == {"BF16"}
    loaded, loaded_params = load_hf(tmp_path / "bf16")
    assert loaded.config.param_dtype == "bfloat16"
    for name, tensor in _stored(qwen3).items():  # each tensor is the float32 one rounded to bfloat16
        np.testing.assert_array_equal(reader.read(name, (128, 128)), tensor.astype(ml_dtypes.bfloat16), name)
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded_params)} == {np.dtype(ml_dtypes.bfloat16)}
    assert load_hf(tmp_path / "bf16", dtype="float32")[0].config.param_dtype == "float32"


@pytest.mark.parametrize("key, value, expected", [("torch_dtype", "bfloat16", "bfloat16"),  # transformers < 5
                                                  ("dtype", "float16", "float16"),
                                                  (None, None, "float32")])  # no key: the tensors' dtype
def test_the_checkpoints_own_dtype_is_read_from_config_json_then_the_tensors(qwen3, tmp_path, key, value, expected):
    config = json.loads((qwen3 / "config.json").read_text())
    del config["dtype"]
    if key is not None:
        config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(qwen3 / "model.safetensors")
    assert hf_model_config(tmp_path).param_dtype == expected


def test_an_unknown_dtype_in_config_json_is_named(qwen3, tmp_path):
    config = {**json.loads((qwen3 / "config.json").read_text()), "dtype": "int8"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(qwen3 / "model.safetensors")
    with pytest.raises(ValueError, match=r"config.json: dtype='int8' is not float32, bfloat16 or float16"):
        load_hf(tmp_path)

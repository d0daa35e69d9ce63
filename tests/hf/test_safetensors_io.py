"""jaxopd.hf.safetensors_io: sharded writing and reading, and the errors a broken index gives."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxopd.hf.safetensors_io import SafetensorsReader, ShardWriter


def test_shard_writer_splits_and_indexes(tmp_path):
    tensors = {f"t{i}": np.full((10, 10), i, np.float32) for i in range(5)}  # 400 bytes each
    writer = ShardWriter(tmp_path, max_shard_bytes=900)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 2000
    checkpoint = SafetensorsReader(tmp_path)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(checkpoint.read(name, (128, 128)), tensor)


def test_index_naming_a_tensor_its_shard_lacks_is_reported(tmp_path):
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="tensor 'b' is listed in .* but missing from .*model-00001-of-00001"):
        SafetensorsReader(tmp_path).read("b", (128, 128))

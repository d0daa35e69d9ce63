"""Config files, overrides, lock errors with close keys, model presets as overridable ConfigDicts."""

import json
import subprocess
import sys

import pytest

from jaxopd import config as config_lib
from jaxopd.model.config import ModelConfig, RopeScaling

CONFIG_FILE = '''
from jaxopd.config import base_config, model_config_dict
def get_config():
    config = base_config()
    config.model = model_config_dict(dict(vocab_size=64, d_model=16, num_layers=1, num_heads=2, mlp_dim=32))
    return config
'''


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(CONFIG_FILE)
    return path


def test_overrides_apply_and_nested_keys_work(config_file):
    config = config_lib.load_config_file(config_file, {"steps": 7, "optimizer.schedule.peak_lr": 1e-3,
                                                       "model.head_dim": 8})
    assert (config.steps, config.optimizer.schedule.peak_lr, config.model.head_dim) == (7, 1e-3, 8)


def test_misspelt_override_lists_close_keys(config_file):
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer.schedule.peak_rl'.*optimizer.schedule.peak_lr"):
        config_lib.load_config_file(config_file, {"optimizer.schedule.peak_rl": 1.0})


def test_config_is_locked(config_file):
    config = config_lib.load_config_file(config_file)
    with pytest.raises(AttributeError, match="learning_rate"):
        config.optimizer.learning_rate = 1.0


def test_cli_reports_misspelt_key_before_running(config_file):
    result = subprocess.run([sys.executable, "-m", "jaxopd.train", f"--config={config_file}", "--config.stpes=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'stpes'" in result.stderr and "steps" in result.stderr


def test_model_config_round_trip_and_optional_fields():
    model = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, mlp_dim=32, attention="mla",
                        kv_lora_rank=8, rope_scaling=RopeScaling(kind="yarn", factor=4.0))
    import dataclasses
    section = config_lib.model_config_dict(dataclasses.asdict(model))
    assert config_lib.to_model_config(section) == model
    section = config_lib.model_config_dict(dict(vocab_size=64, d_model=16, num_layers=2, num_heads=2, mlp_dim=32))
    section.num_kv_heads = 1  # a None field is a typed placeholder, so it can be set (and from the CLI)
    assert config_lib.to_model_config(section).num_kv_heads == 1
    assert config_lib.to_model_config(section).rope_scaling is None


def test_model_preset_missing_names_the_available_ones():
    with pytest.raises(ValueError, match="model preset 'nonexistent' not found"):
        config_lib.load_model_preset("nonexistent")


def test_saved_config_is_the_resolved_one(config_file, tmp_path):
    config = config_lib.load_config_file(config_file, {"seed": 5})
    saved = json.loads(config_lib.save_config(config, tmp_path / "work").read_text())
    assert saved["seed"] == 5 and saved["model"]["d_model"] == 16

"""Config files, overrides, lock errors with close keys, model presets as overridable ConfigDicts."""

import json
import subprocess
import sys

import pytest

from jaxopd.training import config as config_lib
from jaxopd.model.config import ModelConfig, RopeScaling

CONFIG_FILE = '''
from jaxopd.training.config import base_config, model_config_dict
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
                        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        rope_scaling=RopeScaling(kind="yarn", factor=4.0))
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


@pytest.mark.parametrize("name", ["tiny_pretrain", "tiny_distill", "llama3_1b_gpu", "deepseek_v3_671b_pretrain"])
def test_shipped_configs_load_and_validate(name):
    config = config_lib.load_config_file(name)
    config_lib.to_run_config(config)
    config_lib.to_model_config(config.model)


def test_deepseek_v3_config_follows_the_paper():
    from jaxopd.training import optimizer as optim, sharding
    config = config_lib.to_run_config(config_lib.load_config_file("deepseek_v3_671b_pretrain"))
    ramp = optim.batch_ramp(config.batch_size, config.seq_len, config.microbatch_size, config.batch_ramp.start,
                            config.batch_ramp.tokens)
    schedule = config.optimizer.schedule
    lr = optim.learning_rate_schedule(schedule)
    # DeepSeek-V3 §4.2: 3072 -> 15360 sequences over the first 469B tokens, 14.8T tokens of 4K in all.
    assert ramp.batch_size(0) == 3072 and ramp.batch_size(config.steps - 1) == 15360
    assert ramp.tokens_before(ramp.step_at_tokens(469e9) - 1) < 469e9 <= ramp.tokens_before(ramp.step_at_tokens(469e9))
    assert ramp.tokens_before(config.steps) >= 14.8e12 > ramp.tokens_before(config.steps - 1)
    # LR: 2K warmup steps to 2.2e-4, constant until 10T tokens, cosine to 2.2e-5 at 14.3T, 7.3e-6 for the last 167B.
    assert float(lr(1000)) == pytest.approx(1.1e-4) and float(lr(2000)) == pytest.approx(2.2e-4)
    assert ramp.tokens_before(schedule.decay_start) >= 10e12 > ramp.tokens_before(schedule.decay_start - 1)
    assert float(lr(schedule.decay_start)) == pytest.approx(2.2e-4)
    assert float(lr(schedule.decay_end)) == pytest.approx(2.2e-5)
    assert ramp.tokens_before(schedule.final_step) >= 14.3e12 + 333e9 > ramp.tokens_before(schedule.final_step - 1)
    assert float(lr(config.steps - 1)) == pytest.approx(7.3e-6)
    assert sharding.mesh_shape(config.mesh, 1024) == (1, 16, 64, 1)
    assert config.microbatch_size % (16 * 64) == 0

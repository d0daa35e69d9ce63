"""Config files, overrides, lock errors with close keys, model presets as overridable ConfigDicts."""

import json
import pathlib
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


@pytest.mark.parametrize("name", ["tiny_pretrain", "tiny_distill", "llama3_1b_gpu", "deepseek_v3_671b_pretrain",
                                  "deepseek_v3_671b_32k", "deepseek_v3_671b_128k", "tiny_long_256", "tiny_long_2k",
                                  "tiny_long_2k:plain", "column_addition_distill"])
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
    # The mesh and run choices benchmarks/RESULTS.md's plan shows to fit v5p:8x8x16.
    assert sharding.mesh_shape(config.mesh, 1024) == (1, 128, 8, 1, 1)
    assert config.microbatch_size % (128 * 8) == 0
    assert (config.model.param_dtype, config.model.remat, config.model.scan_layers) == ("float32", "full", True)
    assert config.model.expert_parallel and config.model.expert_dispatch == "ragged_all_to_all"
    assert config.model.moe_capacity_factor is None  # dropless, as the paper trains


def test_every_problem_is_reported_at_once_with_its_key(config_file):
    # Field problems (types and choices) are collected over the whole config ...
    config = config_lib.load_config_file(config_file, {"loss": "bogus", "optimizer.schedule.kind": "linear",
                                                       "data.packing": "first_fit"}).to_dict()
    config["steps"] = 2.5  # a hand-written dict (a ConfigDict would refuse it on assignment)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.to_run_config(config)
    assert len(error.value.problems) == 4, error.value
    for text in ("config.loss='bogus' must be one of 'ce', 'reverse_kl'", "config.optimizer.schedule.kind='linear'",
                 "config.data.packing='first_fit'", "config.steps=2.5 must be of type int"):
        assert text in str(error.value)
    # ... and so are the rules between fields.
    config = config_lib.load_config_file(config_file, {"batch_size": 12, "microbatch_size": 8, "log_every": 0,
                                                       "seq_len": 1})
    with pytest.raises(config_lib.ConfigError, match="3 problems") as error:
        config_lib.to_run_config(config)
    assert {"batch_size=12 must be a positive multiple of microbatch_size=8", "log_every=0 must be at least 1",
            "seq_len=1 is too short"} <= {p.split(" (")[0].split(":")[0] for p in error.value.problems}


def test_distillation_settings_are_checked_only_for_distillation(config_file):
    config_lib.to_run_config(config_lib.load_config_file(config_file))  # "ce": an empty distill.teacher is fine
    config = config_lib.load_config_file("tiny_distill", {"distill.teacher": "", "seq_len": 12, "batch_size": 510,
                                                          "microbatch_size": 510})
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.to_run_config(config)
    assert len(error.value.problems) == 3
    assert "distill.teacher is empty" in str(error.value) and "seq_len=12 must equal" in str(error.value)
    assert "batch_size=510 (rollouts per step) must be a multiple of distill.group_size=4" in str(error.value)


def test_typed_config_groups_the_flat_keys_and_round_trips():
    config = config_lib.load_config_file("tiny_distill", {"checkpoint_every": 7})
    run = config_lib.to_run_config(config)
    assert run.objective.loss == "reverse_kl" and run.checkpointing.checkpoint_every == 7
    assert run.distill.teacher == "data/tasks/arithmetic/teacher" and run.model.num_kv_heads == 2
    # The typed run turns back into the same ConfigDict, key for key.
    from jaxopd.configdict import config_dict_of
    assert config_dict_of(config_lib.RunConfig, run).to_dict() == config.to_dict()


def test_saved_config_json_loads_back_to_the_same_run(tmp_path):
    config = config_lib.load_config_file("tiny_pretrain", {"seed": 3, "model.num_layers": 2})
    path = config_lib.save_config(config, tmp_path)
    assert config_lib.to_run_config(config_lib.load_config_file(str(path))) == config_lib.to_run_config(config)


def test_config_json_saved_with_remat_true_loads_with_full_remat(tmp_path):
    config = config_lib.load_config_file("tiny_pretrain")
    saved = json.loads(config_lib.config_to_json(config))
    saved["model"]["remat"] = True  # as written before remat policies had names
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    assert config_lib.to_run_config(config_lib.load_config_file(str(path))).model.remat == "full"
    assert config_lib.load_config_file(str(path), {"model.remat": "dots_saveable"}).model.remat == "dots_saveable"
    assert config_lib.model_config_dict({"remat": False}).remat == "none"


def test_bundled_configs_and_files_are_found_from_any_directory(tmp_path, monkeypatch):
    from jaxopd import bundled
    monkeypatch.chdir(tmp_path)
    assert {"tiny_pretrain", "tiny_distill"} <= set(bundled.bundled_run_configs())
    config = config_lib.load_config_file("tiny_distill")
    for path in (config.distill.teacher, config.distill.prompts, config.data.tokenizer, config.init_from.path):
        assert pathlib.Path(bundled.resolve_path(path)).exists(), path
    assert pathlib.Path(bundled.resolve_path("configs/tiny_pretrain.py")).is_file()
    (tmp_path / "data").mkdir()  # a user's own file wins over the bundled one of the same name
    (tmp_path / "data" / "tokenizer.model").write_text("mine")
    assert bundled.resolve_path("data/tokenizer.model") == "data/tokenizer.model"
    with pytest.raises(ValueError, match="no bundled run config named 'tiny_distil'.*tiny_distill"):
        config_lib.load_config_file("tiny_distil")


def test_printed_differences_are_the_changed_keys_only():
    changed = config_lib.differences_from_defaults(config_lib.load_config_file("tiny_pretrain", {"seed": 4}))
    assert changed["seed"] == 4 and changed["steps"] == 200 and changed["unigram_entropy_batches"] == 50
    assert "log_every" not in changed and "keep_checkpoints" not in changed and not any(key.startswith("model.") for key in changed)


def test_help_lists_the_bundled_configs_and_exits_0(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxopd.train", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in ("tiny_distill", "tiny_pretrain", "deepseek_v3_671b_pretrain", "--config.steps=1000",
                 "config.loss is one of: ce, reverse_kl"):
        assert text in result.stdout


def test_config_variants_call_get_config_with_the_suffix(tmp_path):
    path = tmp_path / "variants.py"
    path.write_text("from jaxopd.training.config import base_config\n\n"
                    "def get_config(variant='cpu'):\n"
                    "    config = base_config()\n"
                    "    config.batch_size = {'cpu': 8, 'gpu8': 64}[variant]\n"
                    "    return config\n")
    assert config_lib.load_config_file(f"{path}:gpu8").batch_size == 64
    assert config_lib.load_config_file(str(path)).batch_size == 8
    from jaxopd.bundled import resolve_config_flag
    assert resolve_config_flag([f"--config={path}:gpu8", "--x"]) == [f"--config={path}:gpu8", "--x"]
    with pytest.raises(ValueError, match="tiny_pretrain.py has no variants .* drop ':gpu8'"):
        config_lib.load_config_file("tiny_pretrain:gpu8")

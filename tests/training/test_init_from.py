"""The student's architecture comes from its checkpoint (init_from.path), the tokenizers from the model directories;
a setting that contradicts a checkpoint, a missing tokenizer or an unsupported architecture is a ConfigError naming
the key, before anything is built. The checkpoints are written by transformers (tests/tiny_hf.py) and by jaxopd."""

import json
import shutil

import pytest

from jaxopd.training import init_from
from jaxopd.training.config import ConfigError, load_config_file, to_run_config
from tests import tiny_hf

CONFIG = "tests/tiny_hf_distill_config.py"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "prompts.jsonl").write_text('{"prompt": "1+2="}\n')
    return {"qwen3": tiny_hf.write_qwen3(root / "qwen3"), "deepseek": tiny_hf.write_deepseek_v3(root / "deepseek"),
            "prompts": root / "prompts.jsonl"}


def _resolved(models, **overrides):
    given = {"distill.teacher": str(models["deepseek"]), "distill.prompts": str(models["prompts"]),
             "distill.eval_prompts": str(models["prompts"]), **overrides}
    return to_run_config(init_from.resolve(load_config_file(CONFIG, given)))


def test_every_architecture_field_comes_from_config_json_and_the_run_choices_from_the_config(models):
    run = _resolved(models, **{"init_from.path": str(models["qwen3"]), "model.dtype": "bfloat16",
                               "model.remat": "full"})
    hf = json.loads((models["qwen3"] / "config.json").read_text())
    model = run.model
    assert (model.vocab_size, model.d_model, model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim,
            model.mlp_dim, model.rope_theta, model.rms_norm_eps, model.max_position_embeddings) == (
        hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
        hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"], hf["rope_parameters"]["rope_theta"],
        hf["rms_norm_eps"], hf["max_position_embeddings"])
    assert model.qk_norm and model.attention == "gqa" and not model.tie_embeddings
    assert (model.dtype, model.param_dtype, model.remat) == ("bfloat16", "float32", "full")
    assert run.data.tokenizer == str(models["qwen3"])  # data.tokenizer left unset: the student's own


def test_a_deepseek_v3_student_gets_mla_and_moe_from_its_checkpoint(models):
    model = _resolved(models, **{"init_from.path": str(models["deepseek"])}).model
    assert (model.attention, model.q_lora_rank, model.kv_lora_rank, model.num_experts, model.num_experts_per_token,
            model.num_shared_experts, model.first_k_dense, model.num_expert_groups, model.rope_layout) == (
        "mla", 16, 16, 4, 2, 1, 1, 2, "interleaved")


def test_settings_that_contradict_the_checkpoint_are_each_named_with_both_values(models):
    with pytest.raises(ConfigError) as error:
        _resolved(models, **{"init_from.path": str(models["qwen3"]), "model.rope_theta": 10000.5,
                             "model.rms_norm_eps": 1e-5, "model.d_model": 32,
                             "model.attention_implementation": "blockwise"})
    assert error.value.problems == [
        f"model.rope_theta=10000.5 contradicts the checkpoint {models['qwen3']}, which has rope_theta=1000000.0: the "
        "architecture comes from init_from.path; drop the setting",
        f"model.rms_norm_eps=1e-05 contradicts the checkpoint {models['qwen3']}, which has rms_norm_eps=1e-06: the "
        "architecture comes from init_from.path; drop the setting"]  # d_model agrees; the implementation is a choice


def test_a_model_preset_is_checked_field_by_field_against_a_jaxopd_checkpoint():
    config = load_config_file("tiny_distill", {"model.num_layers": 3})
    with pytest.raises(ConfigError, match=r"model.num_layers=3 contradicts the checkpoint .*student_init, which has "
                                          r"num_layers=2"):
        init_from.resolve(config)
    bundled = load_config_file("tiny_distill")  # its preset is its checkpoint's: the same run as before
    assert to_run_config(init_from.resolve(bundled)) == to_run_config(bundled)


def test_init_from_kind_is_detected_and_a_wrong_explicit_kind_is_named(models):
    with pytest.raises(ConfigError, match=r"init_from.path=.*qwen3 is a Hugging Face checkpoint directory .*, not a "
                                          r"jaxopd run/checkpoint directory; set init_from.kind='hf' or 'auto'"):
        _resolved(models, **{"init_from.path": str(models["qwen3"]), "init_from.kind": "checkpoint"})
    assert _resolved(models, **{"init_from.path": str(models["qwen3"]), "init_from.kind": "hf"}).model.qk_norm


def test_an_hf_student_without_tokenizer_files_needs_data_tokenizer(models, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(models["qwen3"], bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=rf"init_from.path={bare} has no tokenizer.json, and data.tokenizer is not "
                                          r"set: copy the model's tokenizer files .* or set data.tokenizer"):
        _resolved(models, **{"init_from.path": str(bare)})
    tokenizer = str(models["qwen3"] / "tokenizer.json")
    assert _resolved(models, **{"init_from.path": str(bare), "data.tokenizer": tokenizer}).data.tokenizer == tokenizer


def test_an_hf_teacher_brings_its_tokenizer_and_one_without_is_named(models, tmp_path):
    run = _resolved(models, **{"distill.teacher": str(models["deepseek"]), "init_from.path": str(models["qwen3"])})
    assert run.distill.teacher_tokenizer == str(models["deepseek"])
    bare = tmp_path / "bare"
    shutil.copytree(models["deepseek"], bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=rf"distill.teacher={bare} has no tokenizer.json, and "
                                          r"distill.teacher_tokenizer is not set"):
        _resolved(models, **{"distill.teacher": str(bare), "init_from.path": str(models["qwen3"])})


@pytest.mark.parametrize("key", ["init_from.path", "distill.teacher"])
def test_an_unsupported_architecture_is_named_with_the_supported_ones(models, tmp_path, key):
    shutil.copytree(models["qwen3"], tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    paths = {"init_from.path": str(models["qwen3"]), key: str(tmp_path / "gpt2")}
    with pytest.raises(ConfigError, match=rf"{key}={tmp_path / 'gpt2'}: model_type='gpt2' is not supported by "
                                          r"jaxopd.load_hf; supported: deepseek_v3, deepseek_v2, qwen3, qwen2, llama"):
        _resolved(models, **paths)

"""The student out as a Hugging Face checkpoint (`python -m jaxopd.export`, and `export_hf` at the end of a run):
transformers loads it, tokenizer included, with float32 logits within 1e-5 of jaxopd's."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxopd import export, train
from jaxopd.bundled import resolve_path
from jaxopd.distill.teacher import load_model
from jaxopd.hf.safetensors_io import SafetensorsReader
from jaxopd.training.config import ConfigError
from tests import tiny_hf
from tests.distill.test_distill_hf import assert_kl_dropped, run_config, write_prompts
from tests.test_train import _launch

STUDENT_INIT = "data/tasks/arithmetic/student_init"
TOKENS = np.array([[1, 4, 5, 13, 8, 15, 4, 10, 2]])


def assert_transformers_matches(exported, checkpoint, tokens=TOKENS):
    """transformers' float32 logits of the exported directory against jaxopd's of the checkpoint."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    expected = reference(torch.tensor(tokens)).logits.detach().numpy()
    model, params = load_model(checkpoint)
    actual = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_cli_exports_a_step_with_its_tokenizer_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "hf"
    tokenizer = "data/tasks/arithmetic/tokenizer.json"
    export.main([f"--checkpoint={resolve_path(STUDENT_INIT)}", f"--out={out}", f"--tokenizer={tokenizer}"])
    assert "tokenizer files: tokenizer.json, tokenizer_config.json" in capsys.readouterr().out
    assert_transformers_matches(out, resolve_path(STUDENT_INIT))
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded("12+5=").input_ids == [4, 5, 13, 8, 15] and loaded.eos_token == "<eos>"

    with pytest.raises(SystemExit, match=rf"error: --out={out} exists and is not empty; .* pass --overwrite"):
        export.main([f"--checkpoint={resolve_path(STUDENT_INIT)}", f"--out={out}"])
    step_directory = resolve_path(f"{STUDENT_INIT}/0")
    export.main([f"--checkpoint={step_directory}", f"--out={out}", "--dtype=bfloat16", "--overwrite"])
    reader = SafetensorsReader(out)
    assert {reader.stored_dtype(name) for name in reader.file_of} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "tokenizer.json").exists()  # replaced whole; the bundled checkpoint records no tokenizer
    with pytest.raises(SystemExit, match=r"is step 0 but --step=3"):
        export.main([f"--checkpoint={step_directory}", f"--out={tmp_path / 'other'}", "--step=3"])


def test_export_hf_into_a_non_empty_directory_is_refused_before_step_1(tmp_path):
    root = tmp_path
    teacher, student = tiny_hf.write_deepseek_v3(root / "teacher"), tiny_hf.write_qwen3(root / "student")
    (root / "taken").mkdir()
    (root / "taken" / "file").write_text("")
    config = run_config(root, root / "run", **{"init_from.path": str(student), "distill.teacher": str(teacher),
                                               "export_hf": str(root / "taken")})
    with pytest.raises(ConfigError, match=rf"export_hf={root / 'taken'} exists and is not empty"):
        train.train(config)
    assert not (root / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_run_of_hf_models_from_the_command_line_exports_its_student(tmp_path):
    """Qwen3 student and DeepSeek-V3 teacher as transformers wrote them, through `python -m jaxopd.train`: the run
    finishes, its reverse KL drops, and the student it writes to export_hf is the trained one."""
    teacher, student = tiny_hf.write_deepseek_v3(tmp_path / "teacher"), tiny_hf.write_qwen3(tmp_path / "student")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "run" / "hf"
    process = _launch(tmp_path / "run", f"--config.init_from.path={student}", f"--config.distill.teacher={teacher}",
                      f"--config.distill.prompts={prompts}", f"--config.distill.eval_prompts={prompts}",
                      f"--config.export_hf={out}", config="tests/tiny_hf_distill_config.py")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert f"exported the student of step 30 to {out}" in output
    assert_kl_dropped(tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    tokens = np.array([[1, 6, 7, 15, 8, 17, 9, 10, 2]])
    assert_transformers_matches(out, tmp_path / "run", tokens)
    reference = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    trained = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not torch.equal(reference.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    assert transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "1+1="}], tokenize=False, add_generation_prompt=True) == \
        "<bos><|user|>1+1=<|assistant|>"

"""On-policy distillation runs with models as transformers writes them (tests/tiny_hf.py): a DeepSeek-V3 (MLA + MoE)
teacher and a Qwen3 student sharing one tokenizer, each side a Hugging Face directory or a jaxopd checkpoint. Each run
finishes and its held-out reverse KL to the teacher drops. (Both sides Hugging Face, through the command line and
exported back: tests/test_export.py.)"""

import json
import random

import pytest

from jaxopd import train
from jaxopd.distill.teacher import save_model
from jaxopd.hf import load_hf
from jaxopd.training.config import load_config_file
from tests import tiny_hf

CONFIG = "tests/tiny_hf_distill_config.py"
# A fresh jaxopd student of the teacher's vocabulary (Qwen3-style).
STUDENT = dict(vocab_size=tiny_hf.VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
               qk_norm=True, max_position_embeddings=64)


def write_prompts(path, count=64, seed=0):
    """`count` addition prompts in the tiny tokenizer's alphabet, as JSON Lines: every other one as chat messages
    (rendered with the tokenizer's chat template), the others as plain prompt strings."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for index in range(count):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            row = {"messages": [{"role": "user", "content": f"{a}+{b}="}]} if index % 2 else {"prompt": f"{a}+{b}="}
            f.write(json.dumps({**row, "answer": str(a + b)}) + "\n")
    return path


def run_config(root, workdir, **overrides):
    prompts = write_prompts(root / "prompts.jsonl")
    return load_config_file(CONFIG, {"workdir": str(workdir), "distill.prompts": str(prompts),
                                     "distill.eval_prompts": str(prompts), **overrides})


def reverse_kl(workdir):
    """{step: eval/reverse_kl} of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["eval/reverse_kl"] for line in lines if "eval/reverse_kl" in line}


def assert_kl_dropped(workdir, steps=30):
    kl = reverse_kl(workdir)
    assert set(kl) == {0, steps} and kl[steps] < 0.9 * kl[0], kl


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_hf.write_deepseek_v3(tmp_path_factory.mktemp("teacher") / "deepseek_v3")


@pytest.mark.slow
def test_hf_teacher_distills_into_a_fresh_jaxopd_student_on_an_fsdp_tensor_mesh(tmp_path, teacher):
    overrides = {f"model.{name}": value for name, value in STUDENT.items()}
    config = run_config(tmp_path, tmp_path / "run", **overrides, **{
        "distill.teacher": str(teacher), "data.tokenizer": str(teacher / "tokenizer.json"),
        "mesh.data": -1, "mesh.fsdp": 2, "mesh.tensor": 2})
    train.train(config)
    assert_kl_dropped(tmp_path / "run")


@pytest.mark.slow
def test_hf_student_distills_from_a_jaxopd_teacher(tmp_path, teacher):
    """The student's architecture and tokenizer come from its directory; the teacher is the DeepSeek-V3 saved by
    jaxopd (its tokenizer: data.tokenizer, here the student's)."""
    student = tiny_hf.write_qwen3(tmp_path / "qwen3")
    model, params = load_hf(teacher)
    fields = {name: getattr(model.config, name) for name in model.config.__dataclass_fields__}
    jaxopd_teacher = save_model(tmp_path / "teacher", fields, params)
    train.train(run_config(tmp_path, tmp_path / "run", **{"init_from.path": str(student),
                                                           "distill.teacher": str(jaxopd_teacher)}))
    assert_kl_dropped(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["tokenizer"] == str(student) and saved["model"]["rope_theta"] == 1e6

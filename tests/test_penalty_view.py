"""The per-token penalty page: shading follows log p_student - log p_teacher; the CLI scores with both models, jaxopd
checkpoints or Hugging Face directories."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopd import penalty_view
from jaxopd.distill.teacher import save_model
from jaxopd.model import ModelConfig, Transformer
from tests import tiny_hf

FIELDS = dict(vocab_size=17, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)


def test_render_shades_by_penalty_sign_and_size_and_escapes_text():
    page = penalty_view.render_html(["<bos>", "1", "+"], ["2", "<", "&"], [-0.1, -2.0, -1.0], [-1.1, -1.0, -1.5])
    assert "&lt;bos&gt;" in page and "&amp;" in page and "<bos>" not in page
    penalties = [float(x) for x in re.findall(r'data-penalty="([-0-9.]+)"', page)]
    np.testing.assert_allclose(penalties, [1.0, -1.0, 0.5])
    colours = re.findall(r"background:rgba\((\d+),\d+,\d+,([0-9.]+)\)", page)
    assert colours == [("220", "1.000"), ("40", "1.000"), ("220", "0.500")]  # red = penalized, blue = preferred


def test_cli_writes_the_penalties_of_two_checkpoints(tmp_path, capsys):
    paths, reference = [], []
    tokens = jnp.asarray([[1, 4, 5, 13, 8, 15, 4, 10]])  # <bos> 1 2 + 5 = | 1 7
    for seed in (0, 1):
        model = Transformer(ModelConfig(**FIELDS))
        params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
        paths.append(save_model(tmp_path / f"model{seed}", FIELDS, params))
        logits = np.asarray(model.apply({"params": params}, tokens)[0], np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        reference.append([log_probs[5, 4], log_probs[6, 10]])
    out = tmp_path / "page.html"
    penalty_view.main([f"--student={paths[0]}", f"--teacher={paths[1]}", "--prompt", "12+5=", "--completion", "17",
                       "--out", str(out)])
    page = out.read_text()
    assert page.count('class="token"') == 2 and page.count('class="prompt"') == 6  # <bos> 1 2 + 5 =
    printed = re.search(r"penalties \[([^\]]+)\]", capsys.readouterr().out).group(1)
    page_penalties = [float(x) for x in re.findall(r'data-penalty="([-0-9.]+)"', page)]
    np.testing.assert_allclose([float(x) for x in printed.split(",")], page_penalties, atol=1e-4)
    np.testing.assert_allclose(page_penalties, np.subtract(*reference), atol=1e-5)
    assert max(abs(p) for p in page_penalties) > 1e-3  # two different random models disagree


def test_cli_scores_hugging_face_directories_with_the_students_tokenizer(tmp_path, capsys):
    """A Qwen3 student and a DeepSeek-V3 teacher written by transformers; the tokenizer is read from the student's
    directory. The penalties are transformers' float32 log-prob differences."""
    import torch
    import transformers

    student, teacher = tiny_hf.write_qwen3(tmp_path / "student"), tiny_hf.write_deepseek_v3(tmp_path / "teacher")
    tokens = [1, 6, 7, 15, 8, 17, 9, 10]  # <bos> 1 2 + 3 = | 4 5
    reference = []
    for directory in (student, teacher):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        log_probs = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1).detach().numpy()
        reference.append([log_probs[5, 9], log_probs[6, 10]])
    out = tmp_path / "page.html"
    penalty_view.main([f"--student={student}", f"--teacher={teacher}", "--prompt", "12+3=", "--completion", "45",
                       "--out", str(out)])
    page_penalties = [float(x) for x in re.findall(r'data-penalty="([-0-9.]+)"', out.read_text())]
    np.testing.assert_allclose(page_penalties, np.subtract(*reference), atol=1e-5)
    assert "wrote" in capsys.readouterr().out

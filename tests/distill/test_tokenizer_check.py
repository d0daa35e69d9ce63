"""The teacher/student tokenizer check: each kind of difference is one error naming both tokenizers and the first
difference, raised by check_tokenizers before anything compiles."""

import json
import re

import pytest

from jaxopd.data.tokenizer import HFTokenizer
from jaxopd.distill.teacher import CHAT_PROBE_TEXT, PROBE_TEXT, check_tokenizers
from jaxopd.model import ModelConfig
from tests.data.conftest import make_hf_tokenizer

MODEL = ModelConfig(vocab_size=512, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
TEXTS = ["The teacher and the student share a tokenizer. def f(x): return x + 1\n", "Grüße, 世界! user system"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
CHATML = ("<|im_start|>", "<|im_end|>")


def tokenizer(directory, specials=CHATML, added=(), template=TEMPLATE, **config):
    return HFTokenizer(make_hf_tokenizer(directory, TEXTS, specials, added,
                                         {"chat_template": template, **config} if template else config))


def check_fails(student, teacher, difference):
    with pytest.raises(ValueError) as error:
        check_tokenizers(MODEL, MODEL, student, teacher)
    message = str(error.value)
    assert f"student tokenizer {student.path} and teacher tokenizer {teacher.path} differ: " in message
    assert re.search(difference, message), message


def test_the_same_tokenizer_saved_twice_passes(tmp_path):
    check_tokenizers(MODEL, MODEL, tokenizer(tmp_path / "student"), tokenizer(tmp_path / "teacher"))


def test_vocabulary_size(tmp_path):
    check_fails(tokenizer(tmp_path / "student"), tokenizer(tmp_path / "teacher", added=("<extra>",)),
                r"the student tokenizer has \d+ tokens, the teacher's \d+")


def test_special_tokens(tmp_path):
    student = tokenizer(tmp_path / "student")
    check_fails(student, tokenizer(tmp_path / "eos", eos_token="<|im_end|>"),
                r"eos token \(id, spelling\) \(2, '</s>'\) vs \(\d+, '<\|im_end\|>'\)")
    check_fails(student, tokenizer(tmp_path / "pad", pad_token=None),  # pads with EOS then
                r"pad token \(id, spelling\) \(0, '<pad>'\) vs \(2, '</s>'\)")


def test_probe_ids(tmp_path):
    student = tokenizer(tmp_path / "student")
    teacher_dir = tmp_path / "teacher"
    tokenizer(teacher_dir)
    # The same vocabulary with two ids swapped: sizes and special tokens agree, the ids of text do not.
    saved = json.loads((teacher_dir / "tokenizer.json").read_text())
    vocab = saved["model"]["vocab"]
    first, second = (student.id_to_token(i) for i in student.encode(PROBE_TEXT)[:2])
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (teacher_dir / "tokenizer.json").write_text(json.dumps(saved))
    check_fails(student, HFTokenizer(teacher_dir),
                re.escape(f"they encode the probe text {PROBE_TEXT!r} differently, first at token ") + r"\d+: \[")


def test_chat_markup_probe(tmp_path):
    # ChatML tokens in one tokenizer, other names in the same slots in the other: plain text encodes alike.
    student = tokenizer(tmp_path / "student")
    teacher = tokenizer(tmp_path / "teacher", specials=("<|begin|>", "<|end|>"))
    assert student.encode(PROBE_TEXT) == teacher.encode(PROBE_TEXT)
    check_fails(student, teacher, re.escape(f"the probe text {CHAT_PROBE_TEXT!r} differently, first at token 0: "))


def test_chat_templates(tmp_path):
    student = tokenizer(tmp_path / "student")
    edited = tokenizer(tmp_path / "edited", template=TEMPLATE.replace("<|im_end|>\n", "<|im_end|>\n\n"))
    check_fails(student, edited, re.escape("their chat templates differ first at character ")
                + r"\d+: '\{% endfor %\}' vs '\\n\{% endfor %\}'")
    check_fails(student, tokenizer(tmp_path / "none", template=None), "only the student has a chat template")

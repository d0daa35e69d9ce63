import json
import sys

import pytest

from jaxopd.data import tokenizer as tokenizer_lib
from jaxopd.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.data.conftest import make_hf_tokenizer

CODE = 'def f(x):\n\treturn {"ä": x ** 2}  # ☃ 𝄞\n\n\nclass A:\n    pass\n'


def test_bundled_tokenizer_round_trips_code_exactly(tokenizer):
    assert tokenizer.vocab_size == 4096
    for text in [CODE, "  leading and trailing  ", "\x00\x7f", "a" * 1000]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_fim_tokens_are_reserved_and_never_produced_by_text(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    fim = tokenizer.fim_ids
    assert len(set(fim)) == 3 and not set(fim) & {0, 1, 2, 3}
    assert not set(tokenizer.encode("<|fim_begin|>x<|fim_hole|>y<|fim_end|>")) & set(fim)


def test_train_cli_on_tiny_corpus_with_custom_fim_names(tmp_path, capsys):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": CODE * (i + 1)}) + "\n" for i in range(20)))
    output = tmp_path / "tiny.model"
    tokenizer_lib.main(["--train", "--input", str(corpus), "--vocab-size", "300", "--output", str(output),
                        "--fim-tokens", "<PRE>,<SUF>,<MID>"])
    assert "vocab_size=300" in capsys.readouterr().out
    trained = SentencePieceTokenizer(output, fim_tokens=("<PRE>", "<SUF>", "<MID>"))
    assert trained.vocab_size == 300
    assert (trained.pad_id, trained.bos_id, trained.eos_id) == (0, 2, 3)
    assert [trained.id_to_token(i) for i in trained.fim_ids] == ["<PRE>", "<SUF>", "<MID>"]
    assert trained.decode(trained.encode(CODE)) == CODE
    with pytest.raises(ValueError, match="<\\|fim_begin\\|>"):
        SentencePieceTokenizer(output).fim_ids  # default names are not in this model


def test_train_cli_rejects_wrong_number_of_fim_tokens(tmp_path):
    with pytest.raises(SystemExit):
        tokenizer_lib.main(["--train", "--input", "x", "--vocab-size", "300", "--output", str(tmp_path / "m"),
                            "--fim-tokens", "<a>,<b>"])


def test_hf_backend_behind_the_same_interface(tmp_path):
    import tokenizers

    make_hf_tokenizer(tmp_path, [CODE] * 10)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    wrapped = load_tokenizer(tmp_path)
    assert isinstance(wrapped, HFTokenizer)
    assert (wrapped.pad_id, wrapped.bos_id, wrapped.eos_id) == (0, 1, 2)
    assert tuple(wrapped.fim_ids) == (3, 4, 5)
    assert wrapped.encode(CODE) == hf.encode(CODE, add_special_tokens=False).ids
    assert wrapped.decode(wrapped.encode(CODE)) == CODE
    with pytest.raises(ValueError, match="<fim_prefix>"):
        HFTokenizer(tmp_path, fim_tokens=("<fim_prefix>", "<fim_suffix>", "<fim_middle>")).fim_ids


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer"):
        load_tokenizer(tmp_path / "nope.model")


def test_too_small_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=20"):
        tokenizer_lib.train_sentencepiece([CODE], tmp_path / "m.model", vocab_size=20)


def test_hf_backend_without_tokenizers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"jaxopd\[hf\]"):
        HFTokenizer(tmp_path)

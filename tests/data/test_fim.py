import numpy as np
import pytest

from jaxopd.data.fim import TokenizeDocument
from jaxopd.data.tokenizer import SentencePieceTokenizer
from tests.data.conftest import BUNDLED_CORPUS, BUNDLED_TOKENIZER

DOCUMENT = 'def área(r):\n    """Circle ☃."""\n    return 3.14159 * r ** 2\n'


def reference_split(text: str, seed: int, epoch: int, index: int) -> tuple[int, int]:
    """The documented draws: one uniform for the FIM decision, then two character positions in [0, len]."""
    rng = np.random.default_rng([seed, epoch, index])
    rng.random()
    start, stop = sorted(rng.integers(0, len(text) + 1, size=2))
    return int(start), int(stop)


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_exact_token_order(tokenizer, mode):
    transform = TokenizeDocument(tokenizer, seed=7, fim_rate=1.0, fim_mode=mode)
    begin, hole, end = (tokenizer.token_to_id(name) for name in ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"))
    bos, eos, enc = tokenizer.bos_id, tokenizer.eos_id, tokenizer.encode
    for index in range(20):
        start, stop = reference_split(DOCUMENT, 7, 0, index)
        prefix, middle, suffix = enc(DOCUMENT[:start]), enc(DOCUMENT[start:stop]), enc(DOCUMENT[stop:])
        if mode == "psm":  # <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>
            expected = [bos, begin, *prefix, hole, *suffix, end, *middle, eos]
        else:  # FIM paper SPM variant: <PRE> <SUF> suffix <MID> prefix middle <EOT>
            expected = [bos, begin, hole, *suffix, end, *prefix, *middle, eos]
        output = transform.map((0, index, DOCUMENT.encode()))
        assert output["fim"] and output["tokens"].dtype == np.int32
        assert output["tokens"].tolist() == expected


def undo_fim(tokens: list[int], tokenizer, mode: str) -> str:
    """Inverse permutation, found from the sentinel positions alone."""
    begin, hole, end = tokenizer.fim_ids
    assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id and tokens[1] == begin
    body = tokens[2:-1]
    if mode == "psm":
        prefix, rest = body[:body.index(hole)], body[body.index(hole) + 1:]
        suffix, middle = rest[:rest.index(end)], rest[rest.index(end) + 1:]
        return tokenizer.decode(prefix) + tokenizer.decode(middle) + tokenizer.decode(suffix)
    assert body[0] == hole
    suffix, prefix_middle = body[1:body.index(end)], body[body.index(end) + 1:]
    return tokenizer.decode(prefix_middle) + tokenizer.decode(suffix)


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_round_trip_on_real_documents(tokenizer, mode):
    import gzip
    import json

    with gzip.open(BUNDLED_CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(25), f)]
    transform = TokenizeDocument(tokenizer, seed=3, fim_rate=1.0, fim_mode=mode)
    for index, text in enumerate(texts + ["x", "é", "ab"]):
        tokens = transform.map((0, index, text.encode()))["tokens"].tolist()
        assert undo_fim(tokens, tokenizer, mode) == text


def test_rate_matches_fraction_and_is_deterministic(tokenizer):
    transform = TokenizeDocument(tokenizer, seed=11, fim_rate=0.1)
    flags = [transform.map((0, index, b"abc def"))["fim"] for index in range(3000)]
    # Binomial(3000, 0.1): standard deviation 0.0055; 5 sigma.
    assert abs(np.mean(flags) - 0.1) < 0.0275
    again = TokenizeDocument(tokenizer, seed=11, fim_rate=0.1)
    assert flags == [again.map((0, index, b"abc def"))["fim"] for index in range(3000)]
    other_epoch = [again.map((1, index, b"abc def"))["fim"] for index in range(3000)]
    assert flags != other_epoch
    assert not any(TokenizeDocument(tokenizer, seed=11, fim_rate=0.0).map((0, i, b"abc"))["fim"] for i in range(100))


def test_plain_document_framing_and_flags(tokenizer):
    transform = TokenizeDocument(tokenizer, seed=0, fim_rate=0.0, add_bos=False)
    output = transform.map((0, 5, DOCUMENT.encode()))
    assert output["tokens"].tolist() == tokenizer.encode(DOCUMENT) + [tokenizer.eos_id]
    assert output["index"] == 5 and not output["fim"] and not output["empty"]
    empty = transform.map((0, 6, b""))
    assert empty["empty"] and empty["tokens"].shape == (0,)


def test_invalid_utf8_is_replaced_and_flagged(tokenizer):
    output = TokenizeDocument(tokenizer, seed=0, fim_rate=1.0).map((0, 0, b"ab\xff\xfecd"))
    assert output["invalid_utf8"]
    assert undo_fim(output["tokens"].tolist(), tokenizer, "psm") == "ab\ufffd\ufffdcd"


def test_tokenizer_without_fim_tokens_names_the_missing_token():
    plain = SentencePieceTokenizer(BUNDLED_TOKENIZER, fim_tokens=("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"))
    with pytest.raises(ValueError, match="<｜fim▁begin｜>"):
        TokenizeDocument(plain, seed=0, fim_rate=0.1)
    TokenizeDocument(plain, seed=0, fim_rate=0.0)  # FIM off: the tokens are not needed


def test_bad_settings_name_the_setting(tokenizer):
    with pytest.raises(ValueError, match="fim_rate"):
        TokenizeDocument(tokenizer, seed=0, fim_rate=1.5)
    with pytest.raises(ValueError, match="fim_mode"):
        TokenizeDocument(tokenizer, seed=0, fim_rate=0.1, fim_mode="pms")

import json
import pathlib

import pytest

from jaxopd.data.pipeline import default_data_config
from jaxopd.data.tokenizer import SentencePieceTokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
BUNDLED_TOKENIZER = REPO / "data" / "tokenizer.model"
BUNDLED_CORPUS = REPO / "data" / "corpus" / "python_stdlib.jsonl.gz"


@pytest.fixture(scope="session")
def tokenizer() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(BUNDLED_TOKENIZER)


def write_jsonl(path: pathlib.Path, texts) -> str:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


def make_hf_tokenizer(directory: pathlib.Path, texts, extra_specials=(), added_tokens=(), config=None
                      ) -> pathlib.Path:
    """A byte-level BPE Hugging Face tokenizer with BOS/EOS/PAD and the default FIM tokens, saved in `directory`.

    extra_specials: more special tokens (chat markup); added_tokens: non-special added tokens (Qwen's <think>);
    config: extra tokenizer_config.json entries (a chat template, other special token names)."""
    tokenizers = pytest.importorskip("tokenizers")
    specials = ["<pad>", "<s>", "</s>", "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>", *extra_specials]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    hf.add_tokens(list(added_tokens))
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>", **(config or {})}))
    return directory


def data_config(paths, **overrides):
    """The default data config on other files: no eval split, no FIM unless asked."""
    config = default_data_config()
    config.paths = str(paths)
    config.eval_fraction = 0.0
    config.fim_rate = 0.0
    config.read_threads = 1
    config.update(overrides)
    return config

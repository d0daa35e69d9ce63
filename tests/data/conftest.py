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


def data_config(paths, **overrides):
    """The default data config on other files: no eval split, no FIM unless asked."""
    config = default_data_config()
    config.paths = str(paths)
    config.eval_fraction = 0.0
    config.fim_rate = 0.0
    config.read_threads = 1
    config.update(overrides)
    return config

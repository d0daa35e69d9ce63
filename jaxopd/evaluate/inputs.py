"""What both evaluations read: context lengths as written on the command line, a checkpoint's tokenizer and run
config, and the token stream that filler text and perplexity windows are cut from."""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any, Optional

from jaxopd.bundled import resolve_path
from jaxopd.data.retrieval import DOCUMENT_SEPARATOR
from jaxopd.data.tokenizer import Tokenizer, load_tokenizer, read_training_texts

# The passkey-retrieval filler of Mohtashami & Jaggi 2023 (Landmark Attention), repeated as often as needed.
GENERATED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
GENERATED = "generated"


def parse_lengths(text: str) -> list[int]:
    """"1k,2k,4096" -> [1024, 2048, 4096] (k = 1024, as in a "128K" context)."""
    lengths = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)([kK]?)\s*", item)
        if match is None:
            raise ValueError(f"--lengths item {item!r} is not a token count such as 512, 2k or 1.5k")
        value = float(match.group(1)) * (1024 if match.group(2) else 1)
        if value != int(value) or value < 1:
            raise ValueError(f"--lengths item {item!r} is {value} tokens; give a whole positive number")
        lengths.append(int(value))
    return lengths


def format_length(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def _config_json(path: pathlib.Path) -> dict[str, Any]:
    file = path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def run_config(checkpoint: str | pathlib.Path) -> Optional[dict[str, Any]]:
    """The run config of a jaxopd workdir or of its checkpoints/ (the workdir/config.json the loop writes), else
    None (a Hugging Face directory, or one written by `teacher.save_model`, which records only the model)."""
    path = pathlib.Path(checkpoint)
    for directory in (path, path.parent):
        config = _config_json(directory)
        if "data" in config and "model" in config:
            return config
    return None


def checkpoint_tokenizer(checkpoint: str | pathlib.Path, tokenizer: Optional[str] = None) -> Tokenizer:
    """`tokenizer` when given; else a Hugging Face checkpoint's own tokenizer.json, or the data.tokenizer of a
    jaxopd run's config.json."""
    path = pathlib.Path(checkpoint)
    if tokenizer:
        return load_tokenizer(resolve_path(tokenizer))
    if "model_type" in _config_json(path):
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} is a Hugging Face checkpoint without tokenizer.json; pass --tokenizer")
        return load_tokenizer(path, kind="hf")
    config = run_config(path)
    if config is None:
        raise ValueError(f"{path} has no run config.json naming its tokenizer (a directory written by save_model "
                         "records only the model); pass --tokenizer=<.model file or tokenizer.json>")
    return load_tokenizer(resolve_path(config["data"]["tokenizer"]), kind=config["data"].get("tokenizer_kind", "auto"))


def token_stream(tokenizer: Tokenizer, text: str, min_tokens: int, text_field: str = "text") -> list[int]:
    """Token ids to cut filler or windows from: GENERATED ("generated") repeats GENERATED_FILLER to at least
    `min_tokens`; otherwise the documents of .jsonl(.gz) or plain text files `text` (comma-separated), each followed
    by DOCUMENT_SEPARATOR (a blank line, as in retrieval training filler), read until 4 * min_tokens tokens (room for
    seeded offsets to differ) or the end of the files."""
    if text == GENERATED:
        sentence = tokenizer.encode(GENERATED_FILLER)
        return sentence * math.ceil(min_tokens / len(sentence))
    paths = [resolve_path(path) for path in text.split(",")]
    missing = [path for path in paths if not pathlib.Path(path).is_file()]
    if missing:
        raise ValueError(f"--text files {missing} do not exist; give .jsonl(.gz) or text files, or '{GENERATED}'")
    stream: list[int] = []
    for document in read_training_texts(paths, text_field):
        stream += tokenizer.encode(document + DOCUMENT_SEPARATOR)
        if len(stream) >= 4 * min_tokens:
            break
    return stream


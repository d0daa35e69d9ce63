"""Tokenizers behind one small interface: sentencepiece (own models) and Hugging Face `tokenizers` (imported models).

Train a sentencepiece model on a corpus (plain text files, JSON Lines, optionally gzipped):

    python -m jaxopd.data.tokenizer --train --input data/corpus/python_stdlib.jsonl.gz --vocab-size 4096 \
        --output data/tokenizer.model

The trained model reserves PAD=0, UNK=1, BOS=2, EOS=3 and the three FIM tokens as control symbols (ids 4, 5, 6
with the default names), so they can only be produced by id, never by text that happens to spell them.
"""

from __future__ import annotations

import abc
import argparse
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from jaxopd.data.chat import render_chat


# DeepSeek spells these "<｜fim▁begin｜>" etc., StarCoder "<fim_prefix>"; the names are configurable everywhere.
DEFAULT_FIM_TOKENS = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")


class FimIds(NamedTuple):
    """Token ids of the FIM sentinels (Bavarian et al. 2022 call them <PRE>, <SUF>, <MID>)."""

    begin: int
    hole: int
    end: int


class Tokenizer(abc.ABC):
    """The interface the pipeline needs. `encode` adds no BOS/EOS; the caller frames documents."""

    path: str
    fim_tokens: tuple[str, str, str]
    _chat_template_file = "<chat template>"  # named in template errors

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a token given by its exact spelling, or None if the vocabulary lacks it."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    @property
    def fim_ids(self) -> FimIds:
        """FIM sentinel ids; a ValueError names the token the vocabulary lacks."""
        ids = []
        for name in self.fim_tokens:
            token_id = self.token_to_id(name)
            if token_id is None:
                raise ValueError(
                    f"FIM is on but the tokenizer has no token {name!r} (FIM tokens {self.fim_tokens}); train one "
                    "with `python -m jaxopd.data.tokenizer --train`, set data.fim_tokens to the model's spelling, "
                    "or set data.fim_rate=0"
                )
            ids.append(token_id)
        return FimIds(*ids)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template the model was tuned with, None when the tokenizer has none."""
        return None

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens a chat template sees: {"bos_token": "<s>", "eos_token": ..., ...}."""
        return {}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **template_vars) -> str:
        """The prompt text of a conversation, rendered as transformers' `apply_chat_template(tokenize=False)` does;
        its token ids are `encode(text)` (the template writes BOS itself). template_vars: e.g. enable_thinking=False."""
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer {self.path} has no chat template; set distill.chat_template to the template (or its "
                ".jinja file), or give prompts as plain `prompt` strings"
            )
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, template_file=self._chat_template_file,
                           **template_vars)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file. Picklable (grain workers get a copy), loads the model lazily."""

    def __init__(self, path: str | os.PathLike, fim_tokens: Sequence[str] = DEFAULT_FIM_TOKENS):
        import sentencepiece

        self.path = os.fspath(path)
        self.fim_tokens = tuple(fim_tokens)
        self._processor = sentencepiece.SentencePieceProcessor(model_file=self.path)

    def __getstate__(self):
        return {"path": self.path, "fim_tokens": self.fim_tokens, "model": self._processor.serialized_model_proto()}

    def __setstate__(self, state):
        import sentencepiece

        self.path, self.fim_tokens = state["path"], state["fim_tokens"]
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=state["model"])

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def bos_id(self) -> int | None:
        return None if self._processor.bos_id() < 0 else self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        # A model trained without a pad piece pads with EOS; padding is masked by segment id 0 anyway.
        return self._processor.pad_id() if self._processor.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        token_id = self._processor.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces.
        if token_id == self._processor.unk_id() and token != self._processor.id_to_piece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str:
        return self._processor.id_to_piece(int(token_id))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json, or a checkpoint directory holding one).

    Special tokens are looked up by name; tokenizer_config.json in the same directory supplies the names when present,
    and the chat template (chat_template.jinja beside it wins over tokenizer_config.json's, as in transformers).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fim_tokens: Sequence[str] = DEFAULT_FIM_TOKENS,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        try:
            import tokenizers
        except ImportError as error:
            raise ImportError(
                "the Hugging Face tokenizer backend needs the `tokenizers` package: pip install 'jaxopd[hf]'"
            ) from error
        path = os.fspath(path)
        directory, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (
            os.path.dirname(path), path)
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        overrides = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self._special_tokens = {**_special_token_names(config), **{k: v for k, v in overrides.items() if v}}
        self._chat_template, self._chat_template_file = _read_chat_template(directory, config)
        self.path = path
        self.fim_tokens = tuple(fim_tokens)
        self._tokenizer = tokenizers.Tokenizer.from_file(file)
        self._bos_id = self._special_id(self._special_tokens.get("bos_token"), required=False)
        self._eos_id = self._special_id(self._special_tokens.get("eos_token"), required=True, role="eos")
        pad = self._special_tokens.get("pad_token")
        self._pad_id = self._special_id(pad, required=False) if pad else self._eos_id

    def _special_id(self, name: str | None, *, required: bool, role: str = "") -> int | None:
        token_id = None if name is None else self.token_to_id(name)
        if required and token_id is None:
            raise ValueError(
                f"{self.path}: no {role} token (looked for {name!r}); pass {role}_token= with the model's spelling"
            )
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(int(token_id))

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special_tokens)


# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens, each a chat template variable when set.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _special_token_names(config: dict) -> dict[str, str]:
    # Values are either plain strings or AddedToken dicts {"content": ...}.
    return {
        key: value["content"] if isinstance(value, dict) else value
        for key, value in config.items()
        if key in _SPECIAL_TOKEN_NAMES and value
    }


def _read_chat_template(directory: str, config: dict) -> tuple[str | None, str]:
    """(template or None, the file it came from). transformers 5 saves chat_template.jinja; older checkpoints keep it
    in tokenizer_config.json, as a string or as a list of {"name", "template"} of which "default" is the chat one."""
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read(), jinja_file
    config_file = os.path.join(directory, "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
        config_file += ' ("default" of its chat templates)'
    return template, config_file


def load_tokenizer(path: str | os.PathLike, fim_tokens: Sequence[str] = DEFAULT_FIM_TOKENS, kind: str = "auto"
                   ) -> Tokenizer:
    """Opens a tokenizer: kind "sentencepiece" (a .model file), "hf" (tokenizer.json or its directory) or "auto"."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"tokenizer path {path!r} does not exist; set data.tokenizer to a .model or tokenizer.json")
    if kind == "auto":
        kind = "hf" if os.path.isdir(path) or path.endswith(".json") else "sentencepiece"
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, fim_tokens)
    if kind == "hf":
        return HFTokenizer(path, fim_tokens)
    raise ValueError(f"tokenizer kind {kind!r} is not one of 'auto', 'sentencepiece', 'hf'")


def read_training_texts(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Documents from .jsonl(.gz) files (the `text_field` of each line) or plain text files (the whole file)."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            if path.removesuffix(".gz").endswith(".jsonl"):
                yield from (json.loads(line)[text_field] for line in f if line.strip())
            else:
                yield f.read()


def train_sentencepiece(
    texts: Iterable[str],
    output: str | os.PathLike,
    vocab_size: int,
    fim_tokens: Sequence[str] = DEFAULT_FIM_TOKENS,
    model_type: str = "bpe",
) -> SentencePieceTokenizer:
    """Trains a byte-fallback sentencepiece model that round-trips any text exactly (code included).

    sentencepiece reads sentences, not documents, so each line is a sentence; the newline and tab are user-defined
    pieces so that they are single tokens rather than byte-fallback pieces. Single-threaded, so the model is a
    deterministic function of the input.
    """
    import sentencepiece

    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("cannot train a tokenizer: the input has no non-empty lines")
    model = io.BytesIO()
    options = dict(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        # Identity normalization, no whitespace collapsing and no dummy "▁" prefix: decode(encode(x)) == x, and
        # FIM pieces encoded separately concatenate back to the document.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=1 << 16,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        control_symbols=list(fim_tokens),
        user_defined_symbols=["\n", "\t"],
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    try:
        sentencepiece.SentencePieceTrainer.train(**options)
    except RuntimeError as error:  # e.g. a vocabulary smaller than the corpus's character set
        raise ValueError(f"sentencepiece cannot train vocab_size={vocab_size} on this input: {error}") from error
    output = os.fspath(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "wb") as f:
        f.write(model.getvalue())
    return SentencePieceTokenizer(output, fim_tokens)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxopd.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", required=True, help="train a sentencepiece model")
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl(.gz) or plain text files")
    parser.add_argument("--text-field", default="text", help="JSON Lines field holding the document")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--fim-tokens", default=",".join(DEFAULT_FIM_TOKENS),
                        help="comma-separated names of the FIM begin, hole and end tokens")
    args = parser.parse_args(argv)
    fim_tokens = tuple(args.fim_tokens.split(","))
    if len(fim_tokens) != 3:
        parser.error(f"--fim-tokens needs three comma-separated names, got {args.fim_tokens!r}")
    tokenizer = train_sentencepiece(read_training_texts(args.input, args.text_field), args.output, args.vocab_size,
                                    fim_tokens, args.model_type)
    print(f"wrote {args.output}: vocab_size={tokenizer.vocab_size} bos={tokenizer.bos_id} eos={tokenizer.eos_id} "
          f"pad={tokenizer.pad_id} fim={tuple(tokenizer.fim_ids)}")


if __name__ == "__main__":
    main()

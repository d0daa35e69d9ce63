"""Prompt rows as users have them: JSON Lines (optionally gzipped) or Parquet, each row a `prompt` string or chat
`messages` (system/user/assistant turns) plus any other fields (an `answer`, metadata) that reach the grader.

A `messages` row is rendered with the tokenizer's chat template as transformers'
`apply_chat_template(messages, add_generation_prompt=True, **template_vars)` renders it, and tokenized without a BOS
of ours (templates write their own, as transformers' tokenize=True path does: add_special_tokens=False). A `prompt`
string is used as written (`prompt_as_user_turn`: as the one user turn of a chat instead), after a BOS when
data.add_bos. Every row is read and checked before step 1: a bad row is an error naming file:line (Parquet: file:row)
and a prompt longer than max_prompt_len tokens after templating is an error naming the first, or is left out, counted
and reported (distill.long_prompts="skip"); never cut.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from typing import Any, Iterator, Sequence

import grain
import jax

from jaxopd.bundled import resolve_path
from jaxopd.data.sources import expand_paths


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How rows become model input (DistillConfig's prompt_field, messages_field, prompt_as_user_turn,
    template_vars; data.add_bos)."""

    prompt_field: str = "prompt"
    messages_field: str = "messages"
    add_bos: bool = True
    prompt_as_user_turn: bool = False
    template_vars: tuple[tuple[str, Any], ...] = ()  # e.g. (("enable_thinking", False),)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: the text the model is given (template applied), its token ids (BOS included where added), the row
    as read, and where it was read (file:line)."""

    text: str
    ids: tuple[int, ...]
    row: dict
    where: str


def plain_prompts(texts: Sequence[str], tokenizer: Any, add_bos: bool = True) -> list[Prompt]:
    """Prompt strings used as written (BOS first when `add_bos`), each its own row {"prompt": text}."""
    form = PromptFormat(add_bos=add_bos)
    return [Prompt(text, tuple(render({"prompt": text}, "", tokenizer, form)[1]), {"prompt": text}, "")
            for text in texts]


def parse_template_vars(text: str, key: str = "distill.template_vars") -> tuple[tuple[str, Any], ...]:
    """'{"enable_thinking": false}' (a JSON object, the command line's form) as sorted (name, value) pairs."""
    if not text:
        return ()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{key}={text!r} is not JSON ({error.msg}); write a JSON object such as "
                         "'{\"enable_thinking\": false}'") from error
    if not isinstance(values, dict):
        raise ValueError(f"{key}={text!r} must be a JSON object of template variables")
    return tuple(sorted(values.items()))


def read_rows(paths: str, key: str) -> Iterator[tuple[str, Any]]:
    """(where, row) of every non-blank line of JSON Lines files and every row of Parquet files (`paths`:
    comma-separated files or globs), in file order; `key` is the config key the paths came from, for the messages."""
    try:
        files = expand_paths([resolve_path(p) for p in paths.split(",") if p])
    except ValueError as error:
        raise ValueError(f"{key}={paths!r}: {error}".replace("; set data.paths", f"; set {key}")) from error
    for path in files:
        if path.endswith(".parquet"):
            try:
                import pyarrow.parquet as parquet
            except ImportError as error:
                raise ImportError(f"{key}: {path} is Parquet, which needs pyarrow: pip install 'jaxopd[hf]'") from error
            for number, row in enumerate(parquet.read_table(path).to_pylist(), start=1):
                yield f"{path}:row {number}", row
            continue
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            lines = f.read().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield f"{path}:{number}", _json_row(line, f"{path}:{number}")


def _json_row(line: bytes, where: str) -> Any:
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); a prompts file holds one "
                         "JSON object per line") from error


def _messages(row: dict, field: str, where: str) -> list[dict]:
    messages = row[field]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field {field!r} must be a non-empty list of chat turns, got "
                         f"{type(messages).__name__}")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(
                turn.get("content"), str):
            raise ValueError(f"{where}: every turn of {field!r} needs string 'role' and 'content' fields, got "
                             f"{turn!r}")
    return messages


def render(row: Any, where: str, tokenizer: Any, form: PromptFormat) -> tuple[str, list[int]]:
    """(the text the model is given, its token ids) for one row; ValueError naming `where` for a bad row."""
    fields = (form.prompt_field, form.messages_field)
    if not isinstance(row, dict) or not any(name in row for name in fields):
        found = f"fields {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        raise ValueError(f"{where}: no field {form.prompt_field!r} or {form.messages_field!r} ({found}); set "
                         "distill.prompt_field (a prompt string) or distill.messages_field (chat turns)")
    if form.messages_field in row:
        messages = _messages(row, form.messages_field, where)
    else:
        text = row[form.prompt_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {form.prompt_field!r} is a JSON {type(text).__name__}, not a string")
        if not text:
            raise ValueError(f"{where}: field {form.prompt_field!r} is empty")
        if not form.prompt_as_user_turn:
            prefix = [tokenizer.bos_id] if form.add_bos and tokenizer.bos_id is not None else []
            return text, prefix + tokenizer.encode(text)
        messages = [{"role": "user", "content": text}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **dict(form.template_vars))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    return text, tokenizer.encode(text)


def load_prompts(paths: str, *, key: str, tokenizer: Any, form: PromptFormat = PromptFormat(),
                 max_prompt_len: int, long_prompts: str = "error") -> list[Prompt]:
    """Every prompt of `paths` in file order, rendered and checked (module docstring); `key` names the config key."""
    prompts, too_long = [], []
    for where, row in read_rows(paths, key):
        text, ids = render(row, where, tokenizer, form)
        if len(ids) > max_prompt_len:
            too_long.append((where, len(ids)))
        else:
            prompts.append(Prompt(text, tuple(ids), row, where))
    if too_long:
        where, length = too_long[0]
        counted = f"{len(too_long)} of the {len(prompts) + len(too_long)} prompts of {key} are longer than " \
                  f"distill.max_prompt_len={max_prompt_len} tokens (BOS and chat template included), the first at " \
                  f"{where} ({length} tokens)"
        if long_prompts == "error":
            raise ValueError(f"{counted}: raise distill.max_prompt_len (seq_len with it), shorten them, or set "
                             "distill.long_prompts='skip' to leave them out")
        if jax.process_index() == 0:
            print(f"{counted}: left out (distill.long_prompts='skip')", flush=True)
    if not prompts:
        raise ValueError(f"{key}={paths!r} holds no prompt" + (" that fits distill.max_prompt_len" if too_long else "")
                         + f"; give JSON Lines or Parquet rows with a {form.prompt_field!r} string or "
                         f"{form.messages_field!r} chat turns")
    return prompts


def read_prompts(paths: str, count: int, *, key: str = "distill.eval_prompts", **checks: Any) -> list[Prompt]:
    """The first `count` prompts of `paths` in file order (a fixed eval set), checked by `load_prompts`."""
    prompts = load_prompts(paths, key=key, **checks)
    if count > len(prompts):
        raise ValueError(f"{count} prompts requested (distill.eval_prompts_count) but {key}={paths!r} has "
                         f"{len(prompts)}; lower distill.eval_prompts_count or give more prompts")
    return prompts[:count]


class PromptStream:
    """Prompts shuffled with `seed`, reshuffled every epoch and repeated forever, through grain;
    `get_state()`/`set_state()` resume exactly.

    On several processes every process holds the same global stream and `next(count)` returns its share: the
    `process_index`-th of `process_count` contiguous parts of the next `count` prompts. So the prompts of a step are
    the same whatever the number of processes, and the state (the global position) is too."""

    def __init__(self, prompts: Sequence[Any], seed: int, process_index: int = 0, process_count: int = 1):
        self._dataset = grain.MapDataset.source(list(prompts)).shuffle(seed=seed).repeat(None)
        self._process_index, self._process_count = process_index, process_count
        self._next_index = 0  # global position of the next prompt (what grain's iterator state calls next_index)

    def next(self, count: int) -> list[Any]:
        """This process's part of the next `count` prompts (count must divide by the process count)."""
        if count % self._process_count:
            raise ValueError(f"{count} prompts do not split evenly over {self._process_count} processes")
        share = count // self._process_count
        start = self._next_index + self._process_index * share
        self._next_index += count
        return [self._dataset[index] for index in range(start, start + share)]

    def get_state(self) -> Any:
        return {"next_index": self._next_index}

    def set_state(self, state: Any) -> None:
        self._next_index = int(state["next_index"])

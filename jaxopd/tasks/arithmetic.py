"""Multi-digit addition and subtraction: a prompt generator, an exact checker and a character-level tokenizer.

A problem is `"{a}{op}{b}="` (op "+" or "-", with a >= b for "-"), its answer the decimal result followed by EOS:
`"347+85="` -> `"432"`. Every character is one token, so a completion is a handful of digit tokens and the checker
needs no model. Write the bundled prompt sets and tokenizer with

    python -m jaxopd.tasks.arithmetic --out data/tasks/arithmetic

Prompt files are JSON Lines `{"prompt": "347+85=", "answer": "432"}` (the answer is for SFT baselines and reading;
`check` recomputes it from the prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
from typing import Iterator, Sequence

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARACTERS = "0123456789+-= "
VOCAB = (PAD, BOS, EOS, *CHARACTERS)
_PROBLEM = re.compile(r"^(\d+)([+-])(\d+)=$")


def answer(prompt: str) -> str:
    """The correct completion of `prompt` ("a+b=" or "a-b="), computed from the prompt alone."""
    match = _PROBLEM.match(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not an arithmetic problem 'a+b=' or 'a-b='")
    left, op, right = int(match[1]), match[2], int(match[3])
    return str(left + right if op == "+" else left - right)


def check(prompt: str, completion: str) -> bool:
    """True when `completion` (decoded text, up to the first EOS; nothing after the number but EOS/padding) is the
    exact answer of `prompt`."""
    text = completion.split(EOS, 1)[0].replace(PAD, "")
    return text == answer(prompt)


def make_problems(num_problems: int, *, max_digits: int, ops: str = "+", seed: int = 0) -> list[dict[str, str]]:
    """`num_problems` random problems whose operands have 1..max_digits digits (digit count uniform, then the value
    uniform within it, so short and long operands are equally common); `ops` is a string of "+" and/or "-"."""
    if max_digits < 1 or not ops or set(ops) - {"+", "-"}:
        raise ValueError(f"max_digits={max_digits} must be >= 1 and ops={ops!r} a non-empty string of '+' and '-'")
    rng = np.random.default_rng(seed)

    def operand() -> int:
        digits = int(rng.integers(1, max_digits + 1))
        return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))

    problems = []
    for _ in range(num_problems):
        left, right, op = operand(), operand(), ops[int(rng.integers(len(ops)))]
        if op == "-" and left < right:
            left, right = right, left
        prompt = f"{left}{op}{right}="
        problems.append({"prompt": prompt, "answer": answer(prompt)})
    return problems


def grade(row: dict, completion: str) -> float:
    """`check` as a grader (jaxopd.distill.graders): 1.0 or 0.0 for a completion of row["prompt"]."""
    return float(check(row["prompt"], completion))


def write_tokenizer(directory: str | os.PathLike, vocab: Sequence[str] = VOCAB) -> pathlib.Path:
    """A character-level Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) over `vocab` (PAD, BOS and
    EOS first, then one-character tokens), loadable by jaxopd.data.tokenizer.load_tokenizer and by transformers'
    PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([PAD, BOS, EOS])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "tokenizer_class": "PreTrainedTokenizerFast"},
        indent=2) + "\n")
    return directory / "tokenizer.json"


def write_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/tasks/arithmetic")
    parser.add_argument("--max-digits", type=int, default=2)
    parser.add_argument("--train", type=int, default=5000, help="training prompts (addition)")
    parser.add_argument("--eval", type=int, default=512, help="held-out prompts (addition)")
    parser.add_argument("--new-task", type=int, default=5000, help="subtraction problems (personalization docs)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    write_tokenizer(out)
    train = make_problems(args.train, max_digits=args.max_digits, ops="+", seed=0)
    seen = {p["prompt"] for p in train}
    # Held-out prompts never appear in the training set, so eval accuracy measures generalization.
    candidates = make_problems(4 * args.eval + 1000, max_digits=args.max_digits, ops="+", seed=1)
    held_out = [p for p in candidates if p["prompt"] not in seen][:args.eval]
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    write_jsonl(out / "subtraction.jsonl", make_problems(args.new_task, max_digits=args.max_digits, ops="-", seed=2))
    print(f"wrote {out}: tokenizer ({len(VOCAB)} tokens), {len(train)} train, {len(held_out)} eval prompts")


if __name__ == "__main__":
    main()

"""Key/value retrieval: the one needle format of needle-in-a-haystack evaluation (`python -m jaxopd.evaluate niah`)
and of the synthetic training documents that make that retrieval learnable at a small model's size
(`data.retrieval_weight`).

A fact (needle) is "The secret key for <name> is <6 digits>." on a line of its own; the question "What is the secret
key for <name>? The secret key for <name> is" ends with the start of the answer sentence, so a base model answers by
continuing it with `Needle.answer`, " <6 digits>.". Every part is encoded on its own and the parts are joined as
token ids, so a training document holds exactly the tokens an evaluation prompt does.

A training document (`RetrievalDocuments`) is [BOS] + a window of corpus text with 1 to `max_facts` facts of distinct
names at independent uniform depths + the question for one of them + its answer + EOS, `length` tokens in all with
`length` uniform in [min_tokens, seq_len]: retrieval at every depth and distance the rows allow, and never longer
than a row, so packing never cuts a question from its facts.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import numpy as np

from jaxopd.data.tokenizer import Tokenizer

NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kemal",
         "Leila", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar")
# Separates corpus documents in filler, as the evaluation's token stream does (evaluate/inputs.py).
DOCUMENT_SEPARATOR = "\n\n"
# Characters of corpus text encoded per filler token wanted: English and code run 3 to 4 characters a token.
_CHARACTERS_PER_TOKEN = 8


@dataclasses.dataclass(frozen=True)
class Needle:
    """The fact to retrieve: `name`'s six-digit `key`."""

    name: str
    key: str

    @property
    def statement(self) -> str:
        return f"\nThe secret key for {self.name} is {self.key}.\n"

    @property
    def question(self) -> str:
        return f"\n\nWhat is the secret key for {self.name}? The secret key for {self.name} is"

    @property
    def answer(self) -> str:
        return f" {self.key}."


def make_needles(rng: np.random.Generator, count: int = 1) -> list[Needle]:
    """`count` needles of distinct names (count <= len(NAMES)), each with a uniform six-digit key."""
    names = rng.choice(NAMES, size=count, replace=False)
    return [Needle(name=str(name), key=f"{int(rng.integers(0, 10**6)):06d}") for name in names]


def place_needles(filler_ids: Sequence[int], needle_ids: Sequence[Sequence[int]], question_ids: Sequence[int],
                  depths: Sequence[float], prefix_ids: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """(prompt, needle starts): the prefix, the filler with needle i inserted after round(depths[i] * len(filler)) of
    its tokens (needles at the same point in their given order), then the question; starts[i] is where needle i
    begins. The prompt has len(prefix) + len(filler) + the needles' lengths + len(question) tokens."""
    if len(needle_ids) != len(depths):
        raise ValueError(f"{len(needle_ids)} needles but {len(depths)} depths")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth} must lie in [0, 1] (the fraction of the filler before the needle)")
    cuts = [round(depth * len(filler_ids)) for depth in depths]
    tokens, starts, done = list(prefix_ids), [0] * len(needle_ids), 0
    for i in sorted(range(len(needle_ids)), key=lambda i: (cuts[i], i)):
        tokens += filler_ids[done:cuts[i]]
        done = cuts[i]
        starts[i] = len(tokens)
        tokens += needle_ids[i]
    return [*tokens, *filler_ids[done:], *question_ids], starts


class RetrievalDocuments:
    """Random-access, endless training documents of the module docstring: `[index] -> {"tokens": int32 [length],
    "index", "retrieval": True}` plus the flags TokenizeDocument sets (all False), drawn from a generator seeded by
    (seed, stream, index) alone, so a document does not depend on workers or on which others were read.

    `corpus[j]` is the raw text (bytes or str) of document j; filler is a window of consecutive corpus documents
    from a random one on, each followed by DOCUMENT_SEPARATOR.
    """

    def __init__(self, tokenizer: Tokenizer, corpus: Sequence[bytes | str], *, seq_len: int, min_tokens: int,
                 max_facts: int, seed: int, stream: int = 0, add_bos: bool = True):
        if not 1 <= max_facts <= len(NAMES):
            raise ValueError(f"data.retrieval_max_facts={max_facts} must lie in [1, {len(NAMES)}] (one name a fact)")
        if len(corpus) == 0:
            raise ValueError("retrieval documents need corpus text for their filler; data.paths has no document")
        self.tokenizer, self.corpus, self.seq_len, self.min_tokens = tokenizer, corpus, seq_len, min_tokens
        self.max_facts, self.seed, self.stream = max_facts, seed, stream
        self.prefix = [tokenizer.bos_id] if add_bos else []
        # The longest facts, question and answer any draw can give: every length from min_tokens on must hold them.
        longest = [Needle(name, "0" * 6) for name in NAMES]
        fixed = (len(self.prefix) + 1 + max_facts * max(len(tokenizer.encode(n.statement)) for n in longest)
                 + max(len(tokenizer.encode(n.question)) + len(tokenizer.encode(n.answer)) for n in longest))
        if not fixed <= min_tokens <= seq_len:
            raise ValueError(f"data.retrieval_min_tokens={min_tokens} must lie in [{fixed}, seq_len={seq_len}]: "
                             f"{max_facts} facts, the question, the answer, BOS and EOS take up to {fixed} tokens")

    def __len__(self) -> int:
        return sys.maxsize

    def filler(self, rng: np.random.Generator, count: int) -> list[int]:
        """`count` consecutive tokens of the corpus from a random document and offset on."""
        ids: list[int] = []
        first = int(rng.integers(0, len(self.corpus)))
        for step in range(len(self.corpus)):
            if len(ids) >= count:
                break
            raw = self.corpus[(first + step) % len(self.corpus)]
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            # A long document is encoded only up to what the filler can use; its last token, which the cut may
            # have split, is dropped. A document that falls short is encoded whole.
            limit = _CHARACTERS_PER_TOKEN * (count - len(ids) + 1)
            if len(text) > limit:
                head = self.tokenizer.encode(text[:limit])[:-1]
                if len(ids) + len(head) >= count:
                    ids += head
                    break
            ids += self.tokenizer.encode(text + DOCUMENT_SEPARATOR)
        if len(ids) < count:
            raise ValueError(f"the corpus has {len(ids)} tokens, fewer than the {count} filler tokens a retrieval "
                             "document needs; give more data.paths or a smaller seq_len")
        offset = int(rng.integers(0, len(ids) - count + 1))
        return ids[offset:offset + count]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.stream, index])
        length = int(rng.integers(self.min_tokens, self.seq_len + 1))
        needles = make_needles(rng, int(rng.integers(1, self.max_facts + 1)))
        asked = needles[int(rng.integers(0, len(needles)))]
        encode = self.tokenizer.encode
        needle_ids = [encode(needle.statement) for needle in needles]
        question_ids, answer_ids = encode(asked.question), encode(asked.answer)
        body = (length - len(self.prefix) - sum(map(len, needle_ids)) - len(question_ids) - len(answer_ids) - 1)
        tokens, _ = place_needles(self.filler(rng, body), needle_ids, question_ids,
                                  rng.random(len(needles)).tolist(), self.prefix)
        return {"tokens": np.asarray([*tokens, *answer_ids, self.tokenizer.eos_id], np.int32), "index": index,
                "retrieval": True, "fim": False, "invalid_utf8": False, "empty": False}

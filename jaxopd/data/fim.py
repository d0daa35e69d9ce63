"""Tokenization with Fill-in-the-Middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
Middle"), as a grain map transform over raw documents.

A document chosen for FIM (probability `fim_rate`; DeepSeek-V3 uses 0.1 with PSM) is cut at two character positions
drawn uniformly (the paper's character-level span selection), each part is encoded on its own, and
the parts are reordered:

    PSM: <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>
    SPM: <fim_begin> <fim_hole> suffix <fim_end> prefix middle <eos>

SPM is the variant the paper trains (Appendix D): both sentinels first, so that after <fim_end> the model continues
the prefix straight into the middle. Every document, FIM or not, is framed as [<bos>] body <eos>.

The random draws depend only on (seed, epoch, document index), so the output does not depend on worker count,
sharding or the order documents are read in.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxopd.data.tokenizer import FimIds, Tokenizer

FIM_MODES = ("psm", "spm")


def fim_token_ids(prefix: list[int], middle: list[int], suffix: list[int], fim_ids: FimIds, mode: str) -> list[int]:
    """The FIM body (no BOS/EOS) from the separately encoded parts, in PSM or SPM order."""
    begin, hole, end = fim_ids
    if mode == "psm":
        return [begin, *prefix, hole, *suffix, end, *middle]
    if mode == "spm":
        return [begin, hole, *suffix, end, *prefix, *middle]
    raise ValueError(f"data.fim_mode={mode!r} is not one of {FIM_MODES}")


class TokenizeDocument(grain.transforms.Map):
    """(epoch, document index, raw) -> {"tokens": int32 [length], "prompt_tokens", "fim", "invalid_utf8", "empty",
    "index"}.

    raw is a document's bytes, or (prompt bytes, completion bytes) from a source with data.prompt_field: then the two
    are encoded on their own (as a sampler encodes a prompt) and "prompt_tokens" counts BOS + the prompt's tokens,
    whose targets the packer leaves out of the loss (0 without a prompt). A prompted document is never FIM'd.
    Invalid UTF-8 is decoded with U+FFFD replacements and flagged; an empty document (an empty completion, also after
    a prompt) yields no tokens and is flagged. The flags travel with the element so the main process can count them
    whatever the number of workers.
    """

    def __init__(self, tokenizer: Tokenizer, *, seed: int, fim_rate: float = 0.0, fim_mode: str = "psm",
                 add_bos: bool = True):
        if not 0.0 <= fim_rate <= 1.0:
            raise ValueError(f"data.fim_rate={fim_rate} must be in [0, 1]")
        if fim_mode not in FIM_MODES:
            raise ValueError(f"data.fim_mode={fim_mode!r} is not one of {FIM_MODES}")
        if add_bos and tokenizer.bos_id is None:
            raise ValueError("data.add_bos=True but the tokenizer has no BOS token; set data.add_bos=False")
        self.tokenizer, self.seed, self.fim_rate, self.fim_mode = tokenizer, seed, fim_rate, fim_mode
        # Looked up now, so a tokenizer without the FIM tokens fails before the first batch, naming the token.
        self.fim_ids = tokenizer.fim_ids if fim_rate > 0 else None
        self.prefix = [tokenizer.bos_id] if add_bos else []

    def map(self, element: tuple[int, int, bytes | str | tuple[bytes, bytes]]) -> dict[str, Any]:
        epoch, index, raw = element
        prompted = isinstance(raw, tuple)
        prompt_raw, raw = raw if prompted else (None, raw)
        prompt, prompt_invalid = decode_document(prompt_raw) if prompted else ("", False)
        text, invalid = decode_document(raw)
        result = {"index": index, "fim": False, "invalid_utf8": invalid or prompt_invalid, "empty": not text,
                  "prompt_tokens": 0}
        if not text:
            result["tokens"] = np.zeros([0], np.int32)
            return result
        rng = np.random.default_rng([self.seed, epoch, index])
        encode = self.tokenizer.encode
        if prompted:
            head = [*self.prefix, *encode(prompt)] if prompt else self.prefix
            result["prompt_tokens"] = len(head)
            body = encode(text)
        elif self.fim_ids is not None and rng.random() < self.fim_rate:
            start, stop = sorted(rng.integers(0, len(text) + 1, size=2))
            head, body = self.prefix, fim_token_ids(encode(text[:start]), encode(text[start:stop]),
                                                    encode(text[stop:]), self.fim_ids, self.fim_mode)
            result["fim"] = True
        else:
            head, body = self.prefix, encode(text)
        result["tokens"] = np.asarray([*head, *body, self.tokenizer.eos_id], np.int32)
        return result


def decode_document(raw: bytes | str) -> tuple[str, bool]:
    """Text of a document and whether it held invalid UTF-8 (replaced by U+FFFD)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True

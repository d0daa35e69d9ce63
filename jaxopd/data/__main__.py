"""Pipeline statistics for a run config: `python -m jaxopd.data --config=<name or file> --stats`.

The config file's get_config() must have `data` (see default_data_config), `seq_len`, `batch_size` and `seed`;
overrides work as in training (`--config.data.fim_rate=0.5`). Runs one epoch of the train split on this host (or
`--max_batches`) and prints tokens/s, packing efficiency, documents cut, rows vs the lower bound
ceil(token pairs / seq_len), the skipped/empty/invalid counts, and two decoded rows with their segment boundaries.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxopd.bundled import resolve_config_flag
from jaxopd.data.pipeline import DataIterator, make_pipeline
from jaxopd.data.tokenizer import Tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file with get_config()", lock_config=True)
_STATS = flags.DEFINE_bool("stats", False, "print pipeline statistics")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "stop after this many batches (default: one epoch)")
_SHOW_CHARS = flags.DEFINE_integer("show_chars", 160, "characters shown from each end of a decoded segment")


def segment_spans(segment_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(segment id, start, end) of each run of equal nonzero ids in one row [seq_len]."""
    change = np.flatnonzero(np.diff(segment_ids)) + 1
    starts, ends = np.concatenate([[0], change]), np.concatenate([change, [len(segment_ids)]])
    return [(int(segment_ids[s]), int(s), int(e)) for s, e in zip(starts, ends) if segment_ids[s] != 0]


def render_tokens(tokenizer: Tokenizer, token_ids: Iterable[int], special: set[int]) -> str:
    """Decoded text with special tokens (BOS, EOS, FIM sentinels) shown by name."""
    parts, run = [], []
    for token_id in token_ids:
        if int(token_id) in special:
            parts.append(tokenizer.decode(run))
            parts.append(tokenizer.id_to_token(token_id))
            run = []
        else:
            run.append(token_id)
    parts.append(tokenizer.decode(run))
    return "".join(parts)


def collect_stats(iterator: DataIterator, max_batches: int | None = None) -> dict:
    """Consumes the iterator: batches, rows holding data, real (non-padding) slots, all slots, two example rows."""
    totals = dict.fromkeys(["batches", "rows", "real_slots", "slots"], 0)
    examples = []
    start = time.perf_counter()
    for batch in iterator:
        segment_ids = batch["segment_ids"]
        totals["batches"] += 1
        totals["rows"] += int(segment_ids.any(axis=1).sum())
        totals["real_slots"] += int((segment_ids != 0).sum())
        totals["slots"] += segment_ids.size
        for row in range(len(segment_ids)):
            spans = segment_spans(segment_ids[row])
            if len(examples) < 2 and len(spans) > 1:
                examples.append((batch["tokens"][row], batch["targets"][row], spans))
        if max_batches is not None and totals["batches"] >= max_batches:
            break
    totals["seconds"] = time.perf_counter() - start
    totals["examples"] = examples
    return totals


def print_stats(iterator: DataIterator, totals: dict, seq_len: int, show_chars: int) -> None:
    tokenizer, stats, packing = iterator.tokenizer, iterator.stats, iterator.packing_stats
    lower_bound = math.ceil(totals["real_slots"] / seq_len)
    seconds = max(totals["seconds"], 1e-9)
    print(f"batches {totals['batches']}  rows {totals['rows']}  seq_len {seq_len}  time {seconds:.2f} s")
    print(f"tokens/s (documents tokenized, FIM, packed, batched): {stats['tokens_read'] / seconds:,.0f}")
    print(f"packing efficiency (non-padding fraction): {totals['real_slots'] / max(totals['slots'], 1):.4f}")
    # A slot holds one (input, target) pair: a document of L tokens fills L - 1 slots.
    print(f"rows produced {totals['rows']} vs lower bound ceil({totals['real_slots']} / {seq_len}) = "
          f"{lower_bound} ({totals['rows'] / max(lower_bound, 1) - 1:+.2%}; token pairs / seq_len)")
    print(f"documents: read {stats['documents_read']}  cut {packing['documents_cut']}  FIM {stats['documents_fim']}  "
          f"pieces {packing['pieces']}")
    print(f"skipped empty {stats['documents_empty']}  skipped under 2 tokens {packing['documents_skipped']}  "
          f"invalid UTF-8 (replaced) {stats['documents_invalid_utf8']}  left out by host sharding "
          f"{stats['documents_dropped_by_sharding']}  padding batches {stats['padding_batches']}")
    if stats["documents_retrieval"]:
        print(f"generated retrieval documents (data.retrieval_weight) {stats['documents_retrieval']}, "
              f"{stats['tokens_retrieval'] / stats['tokens_read']:.1%} of the tokens read")
    special = {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None}
    special |= {i for i in map(tokenizer.token_to_id, tokenizer.fim_tokens) if i is not None}
    for number, (tokens, targets, spans) in enumerate(totals["examples"]):
        print(f"\n=== row {number}: {len(spans)} segments ===")
        for segment, start, end in spans:
            # The piece's tokens are its inputs plus the last target.
            text = render_tokens(tokenizer, [*tokens[start:end], targets[end - 1]], special)
            if len(text) > 2 * show_chars:
                text = f"{text[:show_chars]}\n  [... {len(text) - 2 * show_chars} characters ...]\n{text[-show_chars:]}"
            print(f"--- segment {segment}: slots [{start}, {end}) ---\n{text}")


def main(argv) -> None:
    del argv
    if not _STATS.value:
        raise app.UsageError("nothing to do: pass --stats")
    config = _CONFIG.value
    data_config = config.data
    with data_config.unlocked():
        if data_config.num_epochs is None and _MAX_BATCHES.value is None:
            data_config.num_epochs = 1  # one pass, so the run ends and the row count is comparable to the bound
    iterator = make_pipeline(data_config, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed,
                             process_index=0, process_count=1)
    totals = collect_stats(iterator, _MAX_BATCHES.value)
    print_stats(iterator, totals, config.seq_len, _SHOW_CHARS.value)
    iterator.close()


if __name__ == "__main__":
    app.run(main, argv=resolve_config_flag(sys.argv))

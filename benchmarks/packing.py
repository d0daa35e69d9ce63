"""Packing benchmark: rows against the lower bound, documents cut, throughput; ours against grain's packers.

    PYTHONPATH=. python benchmarks/packing.py [--lengths-file lengths.npy] [--seq-lens 2048,8192]

Document lengths (tokens) come from a synthetic lognormal with a long tail, from the Python standard library's .py
files (file bytes / 4 as a token estimate, labelled so), and from --lengths-file (a .npy of token counts, e.g. the
bundled corpus tokenized). Every method gets the same training pairs (a document of L tokens is L - 1 pairs, see
jaxopd/data/packing.py): our best-fit and concat-then-split get whole documents; grain's FirstFit/BestFit packers get
the pieces our cutter makes (they refuse longer elements); grain's ConcatThenSplit gets whole documents.

Columns: rows / ceil(pairs / seq_len) - 1 (padding overhead over the best any packing can do), fraction of documents
(with at least one pair) cut into more than one piece, pieces/s and tokens (pairs)/s through the whole transform
(grain source -> packer -> rows as numpy dicts), in this one process. "pack_best_fit alone" times the algorithm on the
piece lengths of one buffer after another, without building rows.
"""

from __future__ import annotations

import argparse
import collections
import math
import pathlib
import sysconfig
import time

import grain
import numpy as np

from jaxopd.data.packing import BestFitPackDataset, ConcatThenSplitDataset, pack_best_fit


def synthetic_lengths(count: int, seed: int = 0) -> np.ndarray:
    """Lognormal document lengths: median 600 tokens, a tail past 100k (web/code corpora look like this)."""
    lengths = np.random.default_rng(seed).lognormal(np.log(600), 1.4, count)
    return np.clip(lengths, 2, 400_000).astype(np.int64)


def stdlib_lengths() -> np.ndarray:
    """Token estimates (bytes / 4) of the .py files of this Python's standard library."""
    files = pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")
    lengths = np.array(sorted(max(f.stat().st_size // 4, 2) for f in files if f.is_file()), np.int64)
    return np.random.default_rng(0).permutation(lengths)  # a shuffled corpus, as the pipeline feeds it


def _documents(lengths: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Each document's tokens are its index, so cuts can be counted from the rows."""
    return [{"tokens": np.full(n, i, np.int32)} for i, n in enumerate(lengths)]


def _pieces(lengths: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Our cut (pieces of at most seq_len pairs), as grain's packers need it; pieces carry the document's index."""
    pieces = []
    for i, n in enumerate(lengths):
        pairs = int(n) - 1
        pieces.extend({"tokens": np.full(min(seq_len, pairs - start), i, np.int32)} for start in range(0, pairs, seq_len))
    return pieces


IN_MEMORY = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # no reader threads: grain's advice for RAM


def _consume(dataset: grain.IterDataset, segment_key: str) -> tuple[int, int, collections.Counter, float]:
    """Runs the dataset to the end: rows, tokens in segments, per-document count of rows whose first or last segment
    it is (a cut can only be there), seconds."""
    rows = tokens = 0
    edge_documents: collections.Counter = collections.Counter()
    start = time.perf_counter()
    for row in dataset:
        used = int(np.count_nonzero(row[segment_key]))
        rows += 1
        tokens += used
        first, last = int(row["tokens"][0]), int(row["tokens"][used - 1])
        edge_documents.update({first, last})
    return rows, tokens, edge_documents, time.perf_counter() - start


def run(name: str, lengths: np.ndarray, seq_len: int, buffer_sizes: list[int], grain_bins: int) -> list[str]:
    lengths = lengths[lengths >= 2]  # documents with at least one training pair
    pairs = lengths - 1
    bound = math.ceil(pairs.sum() / seq_len)
    num_pieces = int(np.ceil(pairs / seq_len).sum())
    must_cut = int(np.sum(pairs > seq_len))
    documents = grain.MapDataset.source(_documents(lengths))
    pieces = grain.MapDataset.source(_pieces(lengths, seq_len))
    methods = {}
    for buffer_size in buffer_sizes:
        methods[f"jaxopd best-fit, buffer {buffer_size}"] = (
            BestFitPackDataset(documents.to_iter_dataset(IN_MEMORY), seq_len=seq_len, buffer_size=buffer_size, stats={}),
            "segment_ids", "pieces")
    methods["jaxopd concat-then-split"] = (
        ConcatThenSplitDataset(documents.to_iter_dataset(IN_MEMORY), seq_len=seq_len, stats={}), "segment_ids", "edges")
    for cls in (grain.experimental.FirstFitPackIterDataset, grain.experimental.BestFitPackIterDataset):
        methods[f"grain {cls.__name__}, {grain_bins} bins"] = (
            cls(pieces.to_iter_dataset(IN_MEMORY), length_struct={"tokens": seq_len}, num_packing_bins=grain_bins,
                shuffle_bins=False), "tokens_segment_ids", "pieces")
    whole = documents.map(lambda d: {"tokens": d["tokens"][:-1]})  # pairs only: same token count for everyone
    methods["grain ConcatThenSplitIterDataset"] = (
        grain.experimental.ConcatThenSplitIterDataset(whole.to_iter_dataset(IN_MEMORY), length_struct={"tokens": seq_len}),
        "tokens_segment_ids", "edges")

    lines = [f"\n{name}: {len(lengths):,} documents of >= 2 tokens, {int(pairs.sum()):,} tokens, seq_len {seq_len}, "
             f"lower bound {bound:,} rows, {must_cut / len(lengths):.2%} of documents longer than a row\n",
             "| method | rows | over bound | docs cut | pieces/s | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for method, (dataset, segment_key, cut_from) in methods.items():
        rows, tokens, edges, seconds = _consume(dataset, segment_key)
        assert tokens == pairs.sum(), f"{method} lost tokens: {tokens} != {pairs.sum()}"
        if cut_from == "pieces":  # whole pieces in, so exactly the documents longer than a row are cut
            cut, pieces_out = must_cut, num_pieces
        else:
            cut = sum(1 for count in edges.values() if count > 1)
            pieces_out = len(lengths) + sum(count - 1 for count in edges.values())
        stats = getattr(dataset, "stats", None)
        if stats:  # our own counts must agree with what the rows show
            assert (stats["rows"], stats["documents_cut"], stats["pieces"]) == (rows, cut, pieces_out), stats
        lines.append(f"| {method} | {rows:,} | {rows / bound - 1:.3%} | {cut / len(lengths):.2%} | "
                     f"{pieces_out / seconds:,.0f} | {tokens / seconds:,.0f} |")

    buffer_size = max(buffer_sizes)
    piece_lengths = np.concatenate([np.minimum(seq_len, p - np.arange(0, p, seq_len)) for p in pairs])
    start = time.perf_counter()
    for begin in range(0, len(piece_lengths), buffer_size):
        pack_best_fit(piece_lengths[begin:begin + buffer_size], seq_len)
    seconds = time.perf_counter() - start
    lines.append(f"| pack_best_fit alone, buffer {buffer_size} | | | | {len(piece_lengths) / seconds:,.0f} | "
                 f"{piece_lengths.sum() / seconds:,.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths-file", help=".npy of document lengths in tokens")
    parser.add_argument("--seq-lens", default="2048,8192")
    parser.add_argument("--buffer-sizes", default="1000,10000", help="best-fit buffers, in pieces")
    parser.add_argument("--grain-bins", type=int, default=512)
    parser.add_argument("--synthetic-documents", type=int, default=50_000)
    args = parser.parse_args()
    sources = {"synthetic lognormal (median 600, sigma 1.4)": synthetic_lengths(args.synthetic_documents),
               "Python stdlib .py files (bytes/4 token ESTIMATE)": stdlib_lengths()}
    if args.lengths_file:
        sources[f"lengths file {args.lengths_file}"] = np.load(args.lengths_file).astype(np.int64)
    buffer_sizes = [int(b) for b in args.buffer_sizes.split(",")]
    for name, lengths in sources.items():
        for seq_len in (int(s) for s in args.seq_lens.split(",")):
            print("\n".join(run(name, lengths, seq_len, buffer_sizes, args.grain_bins)), flush=True)


if __name__ == "__main__":
    main()

"""Packing tokenized documents into fixed-length rows of the Batch contract.

    rows = BestFitPackDataset(documents, seq_len=2048, buffer_size=10_000)   # documents: {"tokens": [length] int}
    # a document may also carry "prompt_tokens": int, its leading tokens that are no target of the loss
    row = next(iter(rows))   # {"tokens", "targets", "segment_ids", "positions", "loss_mask"}, each [seq_len]

Conventions (the same for both packers):
- A row slot holds one training pair (input, target) = (document[i], document[i + 1]): a document of L tokens is
  L - 1 pairs and fills L - 1 slots. Every pair of every document appears exactly once with loss_mask 1, also where a
  document is cut: the last slot of a piece has as its target the first input of the next piece. No target is lost
  at a cut and no slot is spent on the document's last token, which has nothing to predict.
- A document with more than seq_len pairs is cut into pieces of seq_len pairs, the last piece taking the remainder
  (Best-Fit Packing, Ding et al. 2024, "Fewer Truncations Improve Language Modeling"). A document of at most
  seq_len + 1 tokens is never cut by the best-fit packer.
- Documents with fewer than 2 tokens have no pair: they are skipped and counted in `stats["documents_skipped"]`.
- segment_ids number the pieces of a row 1..k in row order, 0 on padding. positions restart at 0 at every piece,
  also a continued one, as MaxText and DeepSeek do: a row cannot attend to the start of a cut document, so a
  continued piece is treated as a document of its own. Padding slots: tokens = targets = pad_id, positions 0,
  loss_mask 0.
- A document's first `prompt_tokens` tokens (default 0) are inputs only: the pairs whose target is one of them have
  loss_mask 0 and are not counted in loss_tokens (SFT on completions, data.prompt_field).

Counts in `stats` (cumulative over the stream, saved in the iterator state so they survive a restore):
documents (read from the parent), documents_skipped, documents_cut, pieces, rows, loss_tokens, padding_tokens.
Pass a dict as `stats=` to the dataset to read them from outside (the iterator updates it in place).
"""

from __future__ import annotations

import heapq
from typing import Any, Sequence

import grain
import numpy as np

STATS_KEYS = ("documents", "documents_skipped", "documents_cut", "pieces", "rows", "loss_tokens", "padding_tokens")


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short: packing needs at least 2 tokens per row")


def pack_best_fit(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-Fit-Decreasing: assigns pieces to as few bins of capacity seq_len as BFD finds.

    Pieces are taken longest first (ties in index order); each goes into the bin with the least remaining room that
    still fits it (ties: the bin opened first), or opens a new bin. BFD uses at most 11/9 OPT + 6/9 bins (Dósa 2007).
    Remaining capacities live in a max-tree over the values 0..seq_len, so finding the tightest bin is one descent:
    O(log seq_len) per piece, plus O(log bins) for the tie-break.

    Args:
      lengths: [num_pieces] piece lengths, each in 0..seq_len. Pieces of length 0 take no room and are left out of
        every bin (their indices appear nowhere in the result).
      seq_len: bin capacity, at least 2.
    Returns:
      bins in the order they were opened, each the list of piece indices in the order they were placed.
    """
    _check_seq_len(seq_len)
    lengths_N = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths_N.size and (lengths_N.min() < 0 or lengths_N.max() > seq_len):
        bad = int(np.flatnonzero((lengths_N < 0) | (lengths_N > seq_len))[0])
        raise ValueError(f"lengths[{bad}]={int(lengths_N[bad])} is outside 0..seq_len={seq_len}; "
                         "cut longer documents into pieces first (BestFitPackDataset does)")
    order = np.argsort(-lengths_N, kind="stable")
    order = order[lengths_N[order] > 0].tolist()
    lengths_list = lengths_N.tolist()

    size = 1 << seq_len.bit_length()  # leaves for remaining capacities 0..seq_len
    # tree[size + c] = c if some bin has exactly c remaining, else -1; inner nodes hold the max of their children,
    # so the leftmost leaf >= length is the smallest remaining capacity that fits.
    tree = [-1] * (2 * size)
    bins_with_room: list[list[int]] = [[] for _ in range(seq_len + 1)]  # min-heaps of bin indices
    bins: list[list[int]] = []

    def set_leaf(capacity: int, value: int) -> None:
        node = size + capacity
        tree[node] = value
        node >>= 1
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node >>= 1

    for piece in order:
        length = lengths_list[piece]
        if tree[1] >= length:
            node = 1
            while node < size:
                node <<= 1
                if tree[node] < length:
                    node += 1
            remaining = node - size
            same_room = bins_with_room[remaining]
            bin_index = heapq.heappop(same_room)
            if not same_room:
                set_leaf(remaining, -1)
        else:
            bin_index, remaining = len(bins), seq_len
            bins.append([])
        bins[bin_index].append(piece)
        left = remaining - length
        if left:
            heapq.heappush(bins_with_room[left], bin_index)
            if len(bins_with_room[left]) == 1:
                set_leaf(left, left)
    return bins


def _document_tokens(element: Any) -> tuple[np.ndarray, int]:
    """A document's tokens and its first pair with a loss (the first whose target is past its prompt)."""
    tokens = element["tokens"] if isinstance(element, dict) else None
    if tokens is None:
        raise ValueError(f"packing expects dicts with a 'tokens' array, got {type(element).__name__}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"'tokens' must be a 1-D integer array (one tokenized document), got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    return tokens, max(int(element.get("prompt_tokens", 0)) - 1, 0)


# A piece of a document placed in a row: (document tokens, first pair, number of pairs, the document's first pair
# with a loss).
Piece = tuple[np.ndarray, int, int, int]


def _loss_range(piece: Piece) -> tuple[int, int]:
    """The piece's slots with loss_mask 1, as [begin, end) counted from the piece's first slot."""
    _, start, num_pairs, first_loss = piece
    return min(max(first_loss - start, 0), num_pairs), num_pairs


def _make_row(pieces: Sequence[Piece], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One Batch-contract row from pieces, placed in order."""
    tokens = np.full(seq_len, pad_id, np.int32)
    targets = np.full(seq_len, pad_id, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    loss_mask = np.zeros(seq_len, np.float32)
    offset = 0
    for segment, piece in enumerate(pieces, start=1):
        document, start, num_pairs, _ = piece
        end = offset + num_pairs
        tokens[offset:end] = document[start:start + num_pairs]
        targets[offset:end] = document[start + 1:start + num_pairs + 1]
        segment_ids[offset:end] = segment
        positions[offset:end] = np.arange(num_pairs, dtype=np.int32)
        begin, stop = _loss_range(piece)
        loss_mask[offset + begin:offset + stop] = 1.0
        offset = end
    return {"tokens": tokens, "targets": targets, "segment_ids": segment_ids, "positions": positions,
            "loss_mask": loss_mask}


class _PackingIterator(grain.DatasetIterator):
    """What both packers share: reading documents with counts, the stats, the rows' padding count."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int, stats: dict[str, int] | None):
        super().__init__(parent)
        self.seq_len, self.pad_id = seq_len, pad_id
        self.stats = stats if stats is not None else {}
        self.stats.update(dict.fromkeys(STATS_KEYS, 0))

    def _next_document(self) -> tuple[np.ndarray, int, int] | None:
        """The next document with at least one pair as (tokens, number of pairs, first pair with a loss); None at
        the end of the input."""
        while True:
            try:
                tokens, first_loss = _document_tokens(next(self._parent))
            except StopIteration:
                return None
            self.stats["documents"] += 1
            if len(tokens) >= 2:
                return tokens, len(tokens) - 1, first_loss
            self.stats["documents_skipped"] += 1

    def _count_row(self, pieces: Sequence[Piece]) -> None:
        used = sum(num_pairs for _, _, num_pairs, _ in pieces)
        self.stats["rows"] += 1
        self.stats["pieces"] += len(pieces)
        self.stats["loss_tokens"] += sum(stop - begin for begin, stop in map(_loss_range, pieces))
        self.stats["padding_tokens"] += self.seq_len - used

    def _emit(self, pieces: Sequence[Piece]) -> dict[str, np.ndarray]:
        self._count_row(pieces)
        return _make_row(pieces, self.seq_len, self.pad_id)


class _BestFitIterator(_PackingIterator):
    """Fills a buffer of pieces, packs it by Best-Fit-Decreasing, emits its rows, repeats.

    State: the parent's state, the stats and the buffer index at the start of the current buffer, and the rows
    already emitted from it.
    Restoring re-reads the buffer, packs it again (deterministic) and skips the emitted rows.
    """

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, buffer_size: int, pad_id: int,
                 shuffle_seed: int | None, stats: dict[str, int] | None):
        super().__init__(parent, seq_len=seq_len, pad_id=pad_id, stats=stats)
        self.buffer_size, self.shuffle_seed = buffer_size, shuffle_seed
        self._buffers = 0  # buffers started so far: keys the row shuffle of each buffer
        self._start_state = self._start_of_buffer()
        self._rows: list[list[Piece]] = []
        self._rows_emitted = 0

    def _start_of_buffer(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "stats": dict(self.stats), "buffer_index": self._buffers}

    def _fill_and_pack(self) -> None:
        pieces: list[Piece] = []
        while len(pieces) < self.buffer_size:
            document = self._next_document()
            if document is None:
                break
            tokens, num_pairs, first_loss = document
            if num_pairs > self.seq_len:
                self.stats["documents_cut"] += 1
            pieces.extend((tokens, start, min(self.seq_len, num_pairs - start), first_loss)
                          for start in range(0, num_pairs, self.seq_len))
        bins = pack_best_fit([num_pairs for _, _, num_pairs, _ in pieces], self.seq_len)
        if self.shuffle_seed is not None:
            # Bins open longest piece first, so unshuffled the rows of a buffer run from long documents to many
            # short ones, and a batch of consecutive rows would be length-sorted.
            order = np.random.default_rng([self.shuffle_seed, self._buffers]).permutation(len(bins))
            bins = [bins[i] for i in order]
        # Pieces keep their arrival order inside a row (a cut document's pieces never share a row anyway).
        self._rows = [[pieces[index] for index in sorted(row)] for row in bins]
        self._rows_emitted = 0
        self._buffers += 1

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rows_emitted == len(self._rows):
            self._start_state = self._start_of_buffer()
            self._fill_and_pack()
            if not self._rows:
                raise StopIteration
        row = self._emit(self._rows[self._rows_emitted])
        self._rows_emitted += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {**self._start_state, "rows_emitted": self._rows_emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.stats.update(state["stats"])
        self._start_state = {"parent": state["parent"], "stats": dict(state["stats"]),
                             "buffer_index": state["buffer_index"]}
        self._buffers, self._rows, self._rows_emitted = state["buffer_index"], [], 0
        if state["rows_emitted"]:
            self._fill_and_pack()
            for _ in range(state["rows_emitted"]):
                self._count_row(self._rows[self._rows_emitted])  # counted as when they were first emitted
                self._rows_emitted += 1


class BestFitPackDataset(grain.IterDataset):
    """Documents {"tokens": [length] int} -> Batch-contract rows [seq_len] packed by Best-Fit-Decreasing.

    Streaming: documents are cut into pieces of at most seq_len pairs and collected until the buffer holds at least
    buffer_size pieces (or the input ends); the buffer is packed with `pack_best_fit` and its rows are emitted in an
    order shuffled with (shuffle_seed, buffer index), or in the order their bins were opened if shuffle_seed is None.
    Larger buffers pack tighter: 0.1%-0.3% more rows than ceil(pairs / seq_len) at 1k pieces, under 0.05% at 10k
    on long-tailed lengths (benchmarks/RESULTS.md). Restoring replays the parent from the start of the buffer, so the parent must be
    deterministic (grain pipelines are); a restored iterator continues with exactly the next row.
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, buffer_size: int, pad_id: int = 0,
                 shuffle_seed: int | None = 0, stats: dict[str, int] | None = None):
        super().__init__(parent)
        _check_seq_len(seq_len)
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be at least 1 piece")
        self.seq_len, self.buffer_size, self.pad_id, self.stats = seq_len, buffer_size, pad_id, stats
        self.shuffle_seed = shuffle_seed

    def __iter__(self) -> grain.DatasetIterator:
        return _BestFitIterator(self._parent.__iter__(), seq_len=self.seq_len, buffer_size=self.buffer_size,
                                pad_id=self.pad_id, shuffle_seed=self.shuffle_seed, stats=self.stats)

    def __str__(self) -> str:
        return f"BestFitPackDataset(seq_len={self.seq_len}, buffer_size={self.buffer_size})"


class _ConcatThenSplitIterator(_PackingIterator):
    """Lays documents end to end and cuts every seq_len pairs.

    State: the parent's state before the document that continues into the next row (or now, if none does), how
    many of its pairs are already emitted, and the stats.
    """

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int, stats: dict[str, int] | None):
        super().__init__(parent, seq_len=seq_len, pad_id=pad_id, stats=stats)
        self._document: tuple[np.ndarray, int, int] | None = None
        self._done = 0  # pairs of self._document already emitted
        self._document_parent_state = self._parent.get_state()

    def __next__(self) -> dict[str, np.ndarray]:
        pieces: list[Piece] = []
        room = self.seq_len
        while room:
            if self._document is None:
                self._document_parent_state = self._parent.get_state()
                self._document, self._done = self._next_document(), 0
                if self._document is None:
                    break
            tokens, num_pairs, first_loss = self._document
            take = min(room, num_pairs - self._done)
            if take < num_pairs - self._done and self._done == 0:
                self.stats["documents_cut"] += 1
            pieces.append((tokens, self._done, take, first_loss))
            self._done += take
            room -= take
            if self._done == num_pairs:
                self._document = None
        if not pieces:
            raise StopIteration
        return self._emit(pieces)

    def get_state(self) -> dict[str, Any]:
        parent = self._document_parent_state if self._document is not None else self._parent.get_state()
        return {"parent": parent, "pairs_done": self._done if self._document is not None else 0,
                "stats": dict(self.stats)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._document_parent_state = state["parent"]
        self._document, self._done = None, state["pairs_done"]
        if self._done:
            self._document = self._next_document()  # counted when it was first read: the stats below undo this
        self.stats.update(state["stats"])


class ConcatThenSplitDataset(grain.IterDataset):
    """Documents {"tokens": [length] int} -> Batch-contract rows [seq_len], documents laid end to end and cut at
    every row boundary (the baseline best-fit packing improves on: it cuts most documents that cross a boundary)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int = 0,
                 stats: dict[str, int] | None = None):
        super().__init__(parent)
        _check_seq_len(seq_len)
        self.seq_len, self.pad_id, self.stats = seq_len, pad_id, stats

    def __iter__(self) -> grain.DatasetIterator:
        return _ConcatThenSplitIterator(self._parent.__iter__(), seq_len=self.seq_len, pad_id=self.pad_id,
                                        stats=self.stats)

    def __str__(self) -> str:
        return f"ConcatThenSplitDataset(seq_len={self.seq_len})"

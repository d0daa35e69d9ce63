"""Packing: pack_best_fit against a naive Best-Fit-Decreasing and a brute-force optimum; the grain transforms against
the documents they were given (every pair reconstructed), hand-made rows, and checkpoint restore mid-buffer."""

import json
import math

import grain
import numpy as np
import pytest

from jaxopd.data import BestFitPackDataset, ConcatThenSplitDataset, pack_best_fit

PAD = -1


def naive_best_fit_decreasing(lengths, capacity):
    """O(pieces * bins): longest first (stable), tightest bin that fits, ties to the bin opened first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, room = [], []
    for piece in order:
        if lengths[piece] == 0:
            continue
        best = None
        for b in range(len(bins)):
            if room[b] >= lengths[piece] and (best is None or room[b] < room[best]):
                best = b
        if best is None:
            bins.append([])
            room.append(capacity)
            best = len(bins) - 1
        bins[best].append(piece)
        room[best] -= lengths[piece]
    return bins


def optimal_bin_count(lengths, capacity):
    """Exact bin packing by DP over subsets: dp[mask] = least (bins, load of the open bin) packing `mask`."""
    n = len(lengths)
    dp = [(math.inf, 0)] * (1 << n)
    dp[0] = (1, 0)
    for mask in range(1 << n):
        bins, load = dp[mask]
        if bins == math.inf:
            continue
        for i in range(n):
            if mask >> i & 1:
                continue
            step = (bins, load + lengths[i]) if load + lengths[i] <= capacity else (bins + 1, lengths[i])
            dp[mask | 1 << i] = min(dp[mask | 1 << i], step)
    return dp[-1][0]


def test_pack_best_fit_hand_made():
    # 6 -> bin 0 (room 2); 4 -> bin 1 (room 4); 3 -> bin 1 (room 1); 1 -> bin 1, the tightest (first fit: bin 0).
    assert pack_best_fit([6, 4, 3, 1], 8) == [[0], [1, 2, 3]]
    # Decreasing order with ties by index; the zero-length piece 5 is left out.
    assert pack_best_fit([3, 5, 2, 4, 1, 0], 6) == [[1, 4], [3, 2], [0]]
    assert pack_best_fit([4, 4, 4], 4) == [[0], [1], [2]]
    assert pack_best_fit([], 4) == []
    assert pack_best_fit([0, 0], 4) == []


def test_pack_best_fit_equals_naive_reference():
    rng = np.random.default_rng(0)
    for trial in range(300):
        capacity = int(rng.integers(2, 40))
        n = int(rng.integers(0, 60))
        lengths = rng.integers(0, capacity + 1, n).tolist()
        if trial % 3 == 0:  # many ties
            lengths = rng.choice([0, 1, capacity // 2, capacity], n).tolist()
        assert pack_best_fit(lengths, capacity) == naive_best_fit_decreasing(lengths, capacity), (lengths, capacity)


def test_pack_best_fit_within_bfd_bound_of_optimum():
    rng = np.random.default_rng(1)
    for _ in range(150):
        capacity = int(rng.integers(2, 20))
        lengths = rng.integers(1, capacity + 1, int(rng.integers(1, 11))).tolist()
        bins = pack_best_fit(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        optimum = optimal_bin_count(lengths, capacity)
        assert optimum >= math.ceil(sum(lengths) / capacity)
        assert len(bins) >= optimum
        assert len(bins) <= 11 / 9 * optimum + 6 / 9, (lengths, capacity, len(bins), optimum)


def test_pack_best_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="outside 0..seq_len"):
        pack_best_fit([3, 9], 8)
    with pytest.raises(ValueError, match="outside 0..seq_len"):
        pack_best_fit([-1], 8)
    for seq_len in (0, 1):
        with pytest.raises(ValueError, match="seq_len"):
            pack_best_fit([1], seq_len)


def _dataset(documents):
    return grain.MapDataset.source([{"tokens": np.asarray(d, np.int32)} for d in documents]).to_iter_dataset()


def _rows(dataset):
    return list(iter(dataset))


def _row_pieces(row, seq_len):
    """Checks a row's layout and returns its pieces as (tokens, targets) in row order."""
    for key in ("tokens", "targets", "segment_ids", "positions", "loss_mask"):
        assert row[key].shape == (seq_len,)
    assert row["loss_mask"].dtype == np.float32 and row["tokens"].dtype == np.int32
    segment_ids = row["segment_ids"]
    used = int(np.count_nonzero(segment_ids))
    assert np.all(segment_ids[:used] > 0) and np.all(segment_ids[used:] == 0), "padding only at the end"
    assert np.all(row["tokens"][used:] == PAD) and np.all(row["targets"][used:] == PAD)
    assert np.all(row["positions"][used:] == 0) and np.all(row["loss_mask"][used:] == 0)
    assert np.all(row["loss_mask"][:used] == 1)
    pieces = []
    for segment in range(1, int(segment_ids.max(initial=0)) + 1):
        where = np.flatnonzero(segment_ids == segment)
        assert len(where) and np.all(np.diff(where) == 1), "segment ids are 1..k, each one contiguous run"
        np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
        pieces.append((row["tokens"][where], row["targets"][where]))
    return pieces


def _reconstruct(rows, seq_len, documents):
    """Each token encodes (document, position) as 100_000 * document + position, so pieces can be put back."""
    pieces_per_document = {}
    for row in rows:
        for tokens, targets in _row_pieces(row, seq_len):
            document = int(tokens[0]) // 100_000
            pieces_per_document.setdefault(document, []).append((int(tokens[0]) % 100_000, tokens, targets))
    rebuilt = {}
    for document, pieces in pieces_per_document.items():
        pieces.sort(key=lambda piece: piece[0])
        inputs = np.concatenate([tokens for _, tokens, _ in pieces])
        targets = np.concatenate([targets for _, _, targets in pieces])
        # every pair exactly once: inputs are the document minus its last token, targets minus its first
        np.testing.assert_array_equal(inputs[1:], targets[:-1])
        rebuilt[document] = np.append(inputs, targets[-1])
    for document, tokens in enumerate(documents):
        if len(tokens) >= 2:
            np.testing.assert_array_equal(rebuilt.pop(document), tokens)
    assert not rebuilt, "pieces of documents that have no pair"
    return pieces_per_document


def _random_documents(rng, count, seq_len):
    lengths = np.minimum(rng.lognormal(np.log(seq_len / 2), 1.2, count).astype(int), 30 * seq_len)
    lengths[:4] = [0, 1, 101 * seq_len + 3, seq_len + 1]  # empty, one token (no pair), > 100 rows, exactly fits
    return [100_000 * i + np.arange(n) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("packer", ["best_fit", "concat"])
def test_rows_reconstruct_the_documents(packer):
    seq_len, rng = 16, np.random.default_rng(2)
    documents = _random_documents(rng, 300, seq_len)
    stats = {}
    if packer == "best_fit":
        dataset = BestFitPackDataset(_dataset(documents), seq_len=seq_len, buffer_size=64, pad_id=PAD, stats=stats)
    else:
        dataset = ConcatThenSplitDataset(_dataset(documents), seq_len=seq_len, pad_id=PAD, stats=stats)
    rows = _rows(dataset)
    pieces = _reconstruct(rows, seq_len, documents)

    pairs = np.array([max(len(d) - 1, 0) for d in documents])
    cut = {d for d, p in pieces.items() if len(p) > 1}
    if packer == "best_fit":
        # No avoidable cut: a document that fits a row is one piece; a longer one is full rows plus a remainder.
        for document, document_pieces in pieces.items():
            lengths = sorted(len(tokens) for _, tokens, _ in document_pieces)
            assert len(lengths) == math.ceil(pairs[document] / seq_len)
            assert all(length == seq_len for length in lengths[1:])
        assert len(rows) >= math.ceil(pairs.sum() / seq_len)
    else:
        assert len(rows) == math.ceil(pairs.sum() / seq_len)
    assert stats == {"documents": len(documents), "documents_skipped": int(np.sum(pairs == 0)),
                     "documents_cut": len(cut), "pieces": sum(len(p) for p in pieces.values()), "rows": len(rows),
                     "loss_tokens": int(pairs.sum()), "padding_tokens": len(rows) * seq_len - int(pairs.sum())}


def _expect_rows(rows, expected):
    assert len(rows) == len(expected)
    for row, (tokens, targets, segment_ids, positions) in zip(rows, expected):
        np.testing.assert_array_equal(row["tokens"], tokens)
        np.testing.assert_array_equal(row["targets"], targets)
        np.testing.assert_array_equal(row["segment_ids"], segment_ids)
        np.testing.assert_array_equal(row["positions"], positions)
        np.testing.assert_array_equal(row["loss_mask"], np.asarray(segment_ids) > 0)


HAND_DOCUMENTS = [[10, 11, 12], [20, 21, 22, 23, 24, 25], [30, 31]]  # 2, 5 and 1 pairs


def test_best_fit_rows_hand_made():
    # seq_len 4: pieces A(2), B[0:4](4), B[4:5](1), C(1); BFD: B4 -> row 0 full; A -> row 1; B1, C -> row 1.
    rows = _rows(BestFitPackDataset(_dataset(HAND_DOCUMENTS), seq_len=4, buffer_size=100, pad_id=PAD, shuffle_seed=None))
    _expect_rows(rows, [([20, 21, 22, 23], [21, 22, 23, 24], [1, 1, 1, 1], [0, 1, 2, 3]),
                        ([10, 11, 24, 30], [11, 12, 25, 31], [1, 1, 2, 3], [0, 1, 0, 0])])
    # seq_len 5: B fits whole in row 0; A and C share row 1 with two padding slots.
    rows = _rows(BestFitPackDataset(_dataset(HAND_DOCUMENTS), seq_len=5, buffer_size=100, pad_id=PAD, shuffle_seed=None))
    _expect_rows(rows, [([20, 21, 22, 23, 24], [21, 22, 23, 24, 25], [1, 1, 1, 1, 1], [0, 1, 2, 3, 4]),
                        ([10, 11, 30, PAD, PAD], [11, 12, 31, PAD, PAD], [1, 1, 2, 0, 0], [0, 1, 0, 0, 0])])
    # buffer_size 1: each document is packed alone (B's two pieces fill the buffer together).
    rows = _rows(BestFitPackDataset(_dataset(HAND_DOCUMENTS), seq_len=4, buffer_size=1, pad_id=PAD, shuffle_seed=None))
    _expect_rows(rows, [([10, 11, PAD, PAD], [11, 12, PAD, PAD], [1, 1, 0, 0], [0, 1, 0, 0]),
                        ([20, 21, 22, 23], [21, 22, 23, 24], [1, 1, 1, 1], [0, 1, 2, 3]),
                        ([24, PAD, PAD, PAD], [25, PAD, PAD, PAD], [1, 0, 0, 0], [0, 0, 0, 0]),
                        ([30, PAD, PAD, PAD], [31, PAD, PAD, PAD], [1, 0, 0, 0], [0, 0, 0, 0])])


def test_best_fit_row_shuffle_is_a_seeded_permutation():
    documents = _random_documents(np.random.default_rng(5), 200, 16)

    def row_keys(shuffle_seed):
        dataset = BestFitPackDataset(_dataset(documents), seq_len=16, buffer_size=50, shuffle_seed=shuffle_seed)
        return [tuple(row["tokens"]) + tuple(row["segment_ids"]) for row in dataset]

    in_bin_order, seed_0, seed_1 = row_keys(None), row_keys(0), row_keys(1)
    assert sorted(seed_0) == sorted(in_bin_order) == sorted(seed_1)
    assert seed_0 != in_bin_order and seed_0 != seed_1
    assert row_keys(0) == seed_0


def test_concat_then_split_rows_hand_made():
    rows = _rows(ConcatThenSplitDataset(_dataset(HAND_DOCUMENTS), seq_len=4, pad_id=PAD))
    _expect_rows(rows, [([10, 11, 20, 21], [11, 12, 21, 22], [1, 1, 2, 2], [0, 1, 0, 1]),
                        ([22, 23, 24, 30], [23, 24, 25, 31], [1, 1, 1, 2], [0, 1, 2, 0])])


def _make(packer, documents, seq_len):
    if packer == "best_fit":
        return BestFitPackDataset(_dataset(documents), seq_len=seq_len, buffer_size=12, pad_id=PAD, stats={})
    return ConcatThenSplitDataset(_dataset(documents), seq_len=seq_len, pad_id=PAD, stats={})


@pytest.mark.parametrize("packer", ["best_fit", "concat"])
def test_restore_from_any_row_continues_identically(packer):
    seq_len = 8
    documents = _random_documents(np.random.default_rng(3), 40, seq_len)
    documents[3] = documents[3][: 4 * seq_len]  # keep the run short, but still cut over several rows
    reference = _make(packer, documents, seq_len)
    iterator = iter(reference)
    expected = list(iterator)
    final_stats = dict(reference.stats)
    states = []
    for stop in range(len(expected) + 1):
        first = iter(_make(packer, documents, seq_len))
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.get_state()))
        states.append(state)
        restored_dataset = _make(packer, documents, seq_len)
        restored = iter(restored_dataset)
        restored.set_state(state)
        rest = list(restored)
        assert len(rest) == len(expected) - stop
        for got, want in zip(rest, expected[stop:]):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        assert restored_dataset.stats == final_stats
    # set_state on a used (exhausted) iterator rewinds it as well
    middle = len(expected) // 2
    iterator.set_state(states[middle])
    rest = list(iterator)
    assert len(rest) == len(expected) - middle
    for got, want in zip(rest, expected[middle:]):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    assert reference.stats == final_stats


@pytest.mark.parametrize("packer", ["best_fit", "concat"])
def test_deterministic(packer):
    documents = _random_documents(np.random.default_rng(4), 60, 8)
    first, second = _rows(_make(packer, documents, 8)), _rows(_make(packer, documents, 8))
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_bad_arguments_and_elements():
    for seq_len in (0, 1):
        with pytest.raises(ValueError, match="seq_len"):
            BestFitPackDataset(_dataset([[1, 2]]), seq_len=seq_len, buffer_size=4)
        with pytest.raises(ValueError, match="seq_len"):
            ConcatThenSplitDataset(_dataset([[1, 2]]), seq_len=seq_len)
    with pytest.raises(ValueError, match="buffer_size"):
        BestFitPackDataset(_dataset([[1, 2]]), seq_len=4, buffer_size=0)
    two_d = grain.MapDataset.source([{"tokens": np.zeros([2, 3], np.int32)}]).to_iter_dataset()
    with pytest.raises(ValueError, match="1-D integer"):
        next(iter(BestFitPackDataset(two_d, seq_len=4, buffer_size=4)))
    not_dict = grain.MapDataset.source([np.zeros(3, np.int32)]).to_iter_dataset()
    with pytest.raises(ValueError, match="'tokens'"):
        next(iter(ConcatThenSplitDataset(not_dict, seq_len=4)))


def test_restore_inside_a_grain_pipeline():
    """Shuffled, repeated, filtered parent and a batch after packing, as jaxopd.data.pipeline composes them."""
    documents = _random_documents(np.random.default_rng(6), 30, 8)
    documents[2] = documents[2][:40]

    def batches():
        parent = (grain.MapDataset.source([{"tokens": np.asarray(d, np.int32)} for d in documents])
                  .shuffle(seed=3).repeat(2).to_iter_dataset()
                  .filter(lambda document: len(document["tokens"]) != 7))
        return iter(BestFitPackDataset(parent, seq_len=8, buffer_size=10, pad_id=PAD).batch(3))

    expected = [batch["tokens"] for batch in batches()]
    for stop in (1, len(expected) // 3, len(expected) - 1):
        first = batches()
        for _ in range(stop):
            next(first)
        restored = batches()
        restored.set_state(json.loads(json.dumps(first.get_state())))
        rest = [batch["tokens"] for batch in restored]
        assert len(rest) == len(expected) - stop
        for got, want in zip(rest, expected[stop:]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("packer", ["best_fit", "concat"])
def test_prompt_tokens_are_inputs_only(packer):
    # Brute force: pair (document, position) has a loss exactly when its target, position + 1, is past the prompt,
    # also across the cuts of documents longer than a row.
    seq_len, rng = 8, np.random.default_rng(7)
    documents = _random_documents(rng, 120, seq_len)
    prompts = [int(rng.integers(0, len(d) + 1)) for d in documents]
    elements = [{"tokens": np.asarray(d, np.int32), "prompt_tokens": p} for d, p in zip(documents, prompts)]
    stats = {}
    dataset = grain.MapDataset.source(elements).to_iter_dataset()
    if packer == "best_fit":
        dataset = BestFitPackDataset(dataset, seq_len=seq_len, buffer_size=16, pad_id=PAD, stats=stats)
    else:
        dataset = ConcatThenSplitDataset(dataset, seq_len=seq_len, pad_id=PAD, stats=stats)
    trained = sorted(int(token) for row in dataset for token in row["tokens"][row["loss_mask"] == 1])
    expected = sorted(100_000 * i + position for i, (d, p) in enumerate(zip(documents, prompts))
                      for position in range(len(d) - 1) if position + 1 >= p)
    assert trained == expected and stats["loss_tokens"] == len(expected)
    assert any(0 < p < len(d) - 1 for d, p in zip(documents, prompts))

import collections
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxopd.data.pipeline import default_data_config, make_pipeline
from tests.data.conftest import REPO, data_config, make_hf_tokenizer, write_jsonl
from tests.data.test_fim import undo_fim

KEYS = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
        "loss_mask": np.float32}


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def pieces_of(batches):
    """(inputs, targets) token lists of every (row, segment) run, in row order."""
    pieces = []
    for batch in batches:
        for tokens, targets, segment_ids in zip(batch["tokens"], batch["targets"], batch["segment_ids"]):
            for segment in range(1, segment_ids.max() + 1):
                where = segment_ids == segment
                pieces.append((tokens[where].tolist(), targets[where].tolist()))
    return pieces


def documents_in_order(batches, eos):
    """Documents rebuilt from pieces read in order: inputs laid end to end, closed by the final target EOS."""
    documents, current = [], []
    for inputs, targets in pieces_of(batches):
        current += inputs
        if targets[-1] == eos:
            documents.append(current + [eos])
            current = []
    return documents


def decoded_documents(batches, tokenizer) -> list[str]:
    return [tokenizer.decode(document[1:-1]) for document in documents_in_order(batches, tokenizer.eos_id)]


@pytest.mark.parametrize("packing", ["best_fit", "concat"])
def test_batches_follow_the_contract(tokenizer, packing):
    config = default_data_config()
    config.update(fim_rate=0.5, packing=packing, read_threads=1)
    batches = take(make_pipeline(config, seq_len=64, batch_size=4, seed=0, process_index=0, process_count=1), 12)
    for batch in batches:
        assert {key: (value.shape, value.dtype) for key, value in batch.items()} == {
            key: ((4, 64), np.dtype(dtype)) for key, dtype in KEYS.items()}
        for row in range(4):
            tokens, targets, segment_ids, positions, loss_mask = (batch[key][row] for key in KEYS)
            # Every slot is one (input, target) pair of one document: loss on all of them, none on padding.
            np.testing.assert_array_equal(loss_mask, (segment_ids != 0).astype(np.float32))
            assert (segment_ids[:np.count_nonzero(segment_ids)] > 0).all()  # padding only at the end
            for segment in range(1, segment_ids.max() + 1):
                where = np.flatnonzero(segment_ids == segment)
                start, end = where[0], where[-1] + 1
                np.testing.assert_array_equal(where, np.arange(start, end))  # contiguous, numbered in order
                np.testing.assert_array_equal(positions[start:end], np.arange(end - start))
                np.testing.assert_array_equal(targets[start:end - 1], tokens[start + 1:end])
                if targets[end - 1] != tokenizer.eos_id:  # a cut piece runs to the end of the row
                    assert end == 64


def write_bad_corpus(tmp_path, tokenizer, seq_len):
    """Text documents separated by a marker: empty, one token, > 100 * seq_len tokens, invalid UTF-8, ordinary."""
    long_text = " ".join(str(i) for i in range(2000))
    assert len(tokenizer.encode(long_text)) > 100 * seq_len
    documents = [b"", b"x", long_text.encode(), b"caf\xe9 \xff", b"def f():\n    return 1\n", b"", b"y = 2"]
    (tmp_path / "corpus.txt").write_bytes(b"\n<|doc|>\n".join(documents))
    return documents


@pytest.mark.parametrize("packing", ["best_fit", "concat"])
def test_bad_documents_are_packed_exactly_and_counted(tmp_path, tokenizer, packing):
    seq_len = 8
    documents = write_bad_corpus(tmp_path, tokenizer, seq_len)
    config = data_config(tmp_path / "corpus.txt", source="text", separator="\n<|doc|>\n", packing=packing,
                         num_epochs=1)
    iterator = make_pipeline(config, seq_len=seq_len, batch_size=3, seed=0, process_index=0, process_count=1)
    batches = list(iterator)
    expected = [[tokenizer.bos_id, *tokenizer.encode(d.decode("utf-8", "replace")), tokenizer.eos_id]
                for d in documents if d]
    # Every (input, target) pair of every non-empty document appears exactly once, and nothing else does.
    produced = collections.Counter(pair for inputs, targets in pieces_of(batches) for pair in zip(inputs, targets))
    assert produced == collections.Counter(pair for doc in expected for pair in zip(doc[:-1], doc[1:]))
    if packing == "best_fit":  # a document that fits a row is one piece
        whole = [inputs + targets[-1:] for inputs, targets in pieces_of(batches)]
        assert all(doc in whole for doc in expected if len(doc) - 1 <= seq_len)
    else:  # in order: the pieces lay the documents end to end
        assert sorted(documents_in_order(batches, tokenizer.eos_id)) == sorted(expected)
    stats = iterator.stats
    assert (stats["documents_read"], stats["documents_empty"], stats["documents_invalid_utf8"]) == (7, 2, 1)
    assert stats["tokens_read"] == sum(map(len, expected))
    assert iterator.packing_stats["documents"] == 5 and iterator.packing_stats["documents_cut"] >= 1


def test_bad_settings_are_clear_errors(tmp_path, tokenizer):
    write_bad_corpus(tmp_path, tokenizer, 8)
    config = data_config(tmp_path / "corpus.txt", source="text", separator="\n<|doc|>\n")
    with pytest.raises(ValueError, match="seq_len=1"):
        make_pipeline(config, seq_len=1, batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="packing"):
        make_pipeline(data_config(config.paths, packing="first_fit"), seq_len=8, batch_size=2, seed=0,
                      process_index=0, process_count=1)
    missing = data_config(config.paths, source="text", fim_rate=0.1, fim_tokens="<PRE>,<SUF>,<MID>")
    with pytest.raises(ValueError, match="<PRE>"):
        make_pipeline(missing, seq_len=8, batch_size=2, seed=0, process_index=0, process_count=1)


def test_checkpoint_resumes_with_the_next_batch_mid_buffer():
    config = default_data_config()
    config.update(fim_rate=0.5, read_threads=1, packing_buffer=200)
    make = lambda: make_pipeline(config, seq_len=64, batch_size=2, seed=3, process_index=0, process_count=1)
    iterator = make()
    # Tokens emitted: one per (input, target) pair, plus at most the last target of each row.
    emitted = sum(int((b["segment_ids"] != 0).sum() + b["segment_ids"].any(axis=1).sum()) for b in take(iterator, 5))
    # Documents the packer has pulled but not yet emitted: the checkpoint falls inside its buffer.
    assert iterator.stats["tokens_read"] > emitted
    state = json.loads(json.dumps(iterator.get_state()))  # as the trainer stores it
    expected = take(iterator, 6)
    restored = make()
    restored.set_state(state)
    assert_same_batches(take(restored, 6), expected)


def test_same_batches_across_runs_and_worker_counts():
    config = default_data_config()
    config.update(fim_rate=0.5, read_threads=1, packing_buffer=64)
    run = lambda seed, workers: take(make_pipeline(_with(config, num_workers=workers), seq_len=64, batch_size=2,
                                                   seed=seed, process_index=0, process_count=1), 8)
    reference = run(0, 0)
    assert_same_batches(run(0, 0), reference)
    assert_same_batches(run(0, 2), reference)
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(run(1, 0), reference))


def _with(config, **overrides):
    copy = config.copy_and_resolve_references()
    copy.update(overrides)
    return copy


def test_host_shards_are_disjoint_and_yield_equal_batch_counts(tmp_path, tokenizer):
    texts = [f"document {i} " + "word " * (i % 7 * 3) for i in range(41)]
    config = data_config(write_jsonl(tmp_path / "d.jsonl", texts), num_epochs=1)
    with pytest.raises(ValueError, match="num_batches"):
        make_pipeline(config, seq_len=64, batch_size=2, seed=0, process_index=0, process_count=2)
    # Batches each host packs from its own documents, before the count is equalized (the inner grain iterator).
    natural = []
    for process_index in range(2):
        iterator = make_pipeline(config, seq_len=64, batch_size=2, seed=0, process_index=process_index,
                                 process_count=2, num_batches=1)
        natural.append(len(list(iterator._iterator)))
    count = max(natural) + 1
    iterators = [make_pipeline(config, seq_len=64, batch_size=2, seed=0, process_index=p, process_count=2,
                               num_batches=count) for p in range(2)]
    hosts = [(list(iterator), iterator.stats) for iterator in iterators]
    decoded = [decoded_documents(batches, tokenizer) for batches, _ in hosts]
    assert len(decoded[0]) == len(decoded[1]) == 20
    assert not set(decoded[0]) & set(decoded[1]) and set(decoded[0]) | set(decoded[1]) < set(texts)
    for (batches, stats), produced in zip(hosts, natural):
        assert len(batches) == count
        assert stats["documents_dropped_by_sharding"] == 1
        assert stats["padding_batches"] == count - produced
        assert all(b["loss_mask"].sum() == 0 and (b["segment_ids"] == 0).all() for b in batches[produced:])


def test_eval_split_is_held_out_and_fixed(tmp_path, tokenizer):
    texts = [f"document {i}" for i in range(50)]
    config = data_config(write_jsonl(tmp_path / "d.jsonl", texts), eval_fraction=0.2, num_epochs=1)
    decode = lambda batches: set(decoded_documents(batches, tokenizer))
    run = lambda split, seed: decode(list(make_pipeline(config, seq_len=32, batch_size=2, seed=seed,
                                                        process_index=0, process_count=1, split=split)))
    eval_docs, train_docs = run("eval", 0), run("train", 0)
    assert len(eval_docs) == 10 and not eval_docs & train_docs and eval_docs | train_docs == set(texts)
    assert run("eval", 1) == eval_docs


def test_stats_cli_reports_packing_numbers():
    command = [sys.executable, "-m", "jaxopd.data", "--config=tests/data/stats_config.py", "--stats",
               "--config.seq_len=128", "--max_batches=300", "--show_chars=40"]
    output = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    rows, tokens, seq_len, bound = map(int, re.search(
        r"rows produced (\d+) vs lower bound ceil\((\d+) / (\d+)\) = (\d+)", output).groups())
    assert seq_len == 128 and bound == math.ceil(tokens / 128) and rows >= bound
    batches = int(re.search(r"batches (\d+)", output).group(1))
    efficiency = float(re.search(r"non-padding fraction\): ([\d.]+)", output).group(1))
    assert efficiency == pytest.approx(tokens / (batches * 4 * 128), abs=1e-4)
    assert re.search(r"skipped empty \d+ +skipped under 2 tokens 0 +invalid UTF-8 \(replaced\) 0", output)
    assert int(re.search(r"cut (\d+)", output).group(1)) > 0
    assert output.count("=== row") == 2 and "--- segment 2" in output and "</s>" in output


def test_orbax_grain_checkpoint_handler_round_trip(tmp_path):
    from etils import epath
    import grain

    config = default_data_config()
    config.update(fim_rate=0.5, read_threads=1)
    make = lambda: make_pipeline(config, seq_len=64, batch_size=2, seed=5, process_index=0, process_count=1)
    iterator = make()
    take(iterator, 3)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), iterator)
    expected = take(iterator, 2)
    restored = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), make())
    assert_same_batches(take(restored, 2), expected)


def test_checkpoint_resume_with_worker_processes():
    config = default_data_config()
    config.update(fim_rate=0.5, read_threads=1, num_workers=2, packing_buffer=64)
    make = lambda: make_pipeline(config, seq_len=64, batch_size=2, seed=4, process_index=0, process_count=1)
    iterator = make()
    take(iterator, 4)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 4)
    iterator.close()
    restored = make()
    restored.set_state(state)
    assert_same_batches(take(restored, 4), expected)
    restored.close()


def test_bundled_data_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    batch = next(make_pipeline(_with(default_data_config(), packing_buffer=8), seq_len=32, batch_size=1, seed=0,
                               process_index=0, process_count=1))
    assert batch["loss_mask"].sum() > 0


def test_process_defaults_come_from_jax():
    config = default_data_config()
    config.update(read_threads=1, packing_buffer=32)
    explicit = take(make_pipeline(config, seq_len=32, batch_size=2, seed=0, process_index=0, process_count=1), 2)
    assert_same_batches(take(make_pipeline(config, seq_len=32, batch_size=2, seed=0), 2), explicit)


def test_every_source_kind_gives_the_same_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    texts = [f"def f{i}():\n    return {i} * 'é'\n" * (i % 5 + 1) for i in range(30)]
    (tmp_path / "docs.txt").write_text("\f".join(texts))
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet", row_group_size=7)
    writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
    for text in texts:
        writer.write(text.encode())
    writer.close()
    configs = {
        "text": data_config(tmp_path / "docs.txt", source="text", separator="\f"),
        "jsonl": data_config(write_jsonl(tmp_path / "docs.jsonl", texts)),
        "parquet": data_config(tmp_path / "docs.parquet", source="parquet"),
        "array_record": data_config(tmp_path / "docs.array_record", source="array_record"),
    }
    runs = {kind: take(make_pipeline(_with(config, fim_rate=0.5, eval_fraction=0.1, packing_buffer=16), seq_len=48,
                                     batch_size=2, seed=1, process_index=0, process_count=1), 6)
            for kind, config in configs.items()}
    for kind in ("text", "parquet", "array_record"):
        assert_same_batches(runs[kind], runs["jsonl"])


def test_hugging_face_tokenizer_with_fim_end_to_end(tmp_path):
    from jaxopd.data.tokenizer import load_tokenizer

    texts = [f"def f{i}(x):\n    return x * {i}  # é\n" * (i % 3 + 1) for i in range(40)]
    tokenizer = load_tokenizer(make_hf_tokenizer(tmp_path, texts))
    config = data_config(write_jsonl(tmp_path / "d.jsonl", texts), tokenizer=str(tmp_path), fim_rate=0.5,
                         packing="concat", num_epochs=1)
    iterator = make_pipeline(config, seq_len=40, batch_size=2, seed=0, process_index=0, process_count=1)
    documents = documents_in_order(list(iterator), tokenizer.eos_id)
    begin = tokenizer.fim_ids.begin
    fim = [document for document in documents if document[1] == begin]
    rebuilt = [undo_fim(d, tokenizer, "psm") if d[1] == begin else tokenizer.decode(d[1:-1]) for d in documents]
    assert sorted(rebuilt) == sorted(texts)
    assert len(fim) == iterator.stats["documents_fim"] and 10 < len(fim) < 30


def test_a_corpus_the_eval_split_empties_names_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", ["a single document"])
    with pytest.raises(ValueError, match=r"split='train' has 0 documents.*set data.eval_fraction=0 \(it holds out 1 "
                                         r"of the 1\)"):
        make_pipeline(data_config(path, eval_fraction=0.02), seq_len=8, batch_size=1, seed=0, process_index=0,
                      process_count=1)


def test_prompt_field_trains_on_the_completion_only(tmp_path, tokenizer):
    rows = [{"prompt": f"def f{i}(x):", "text": f"\n    return x + {i}\n"} for i in range(12)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = data_config(path, prompt_field="prompt", num_epochs=1, shuffle=False)
    batches = list(make_pipeline(config, seq_len=64, batch_size=4, seed=0, process_index=0, process_count=1))
    expected = {}
    for row in rows:
        prompt = [tokenizer.bos_id, *tokenizer.encode(row["prompt"])]
        expected[tuple(prompt)] = [*tokenizer.encode(row["text"]), tokenizer.eos_id]
    seen = {}
    for batch in batches:
        for tokens, targets, segment_ids, mask in zip(batch["tokens"], batch["targets"], batch["segment_ids"],
                                                     batch["loss_mask"]):
            for segment in range(1, segment_ids.max() + 1):
                where = segment_ids == segment
                document = [*tokens[where].tolist(), int(targets[where][-1])]
                prompt = next(p for p in expected if tuple(document[:len(p)]) == p)
                assert document[len(prompt):] == expected[prompt]
                seen[prompt] = targets[where][mask[where] == 1].tolist()
    assert seen == expected


def test_prompt_field_errors_name_the_setting(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"question": "a", "text": "b"}) + "\n")
    with pytest.raises(ValueError, match="data.prompt_field"):
        next(make_pipeline(data_config(path, prompt_field="prompt"), seq_len=16, batch_size=1, seed=0,
                           process_index=0, process_count=1))
    for overrides in ({"source": "text"}, {"fim_rate": 0.1}):
        with pytest.raises(ValueError, match="data.prompt_field='question' needs"):
            make_pipeline(data_config(path, prompt_field="question", **overrides), seq_len=16, batch_size=1, seed=0,
                          process_index=0, process_count=1)

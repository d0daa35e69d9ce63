"""The training data pipeline: documents -> shuffle -> host shard -> tokenize + FIM -> pack -> batch.

    it = make_pipeline(config.data, seq_len=2048, batch_size=8, seed=0)
    batch = next(it)               # the Batch contract, numpy arrays [batch_size, seq_len]
    state = it.get_state()         # JSON-serializable; it.set_state(state) resumes with exactly the next batch

Order of stages and why:
1. A fixed permutation (`split_seed`) holds out `eval_fraction` of the documents as the eval split.
2. The split is shuffled globally with `seed`, then cut into `process_count` strided shards of EQUAL size
   floor(n / process_count): every host reads a disjoint set and the same number of documents; the remainder
   (fewer than process_count documents) is left out and reported as `documents_dropped_by_sharding`.
3. Each host's shard is reshuffled every epoch and repeated (`num_epochs`; None repeats forever, so every host
   yields batches forever and the trainer decides when to stop).
4. Tokenization + FIM is a MapDataset map, run in `num_workers` processes (grain mp_prefetch). Its randomness is
   keyed on (seed, epoch, document index), and mp_prefetch interleaves worker outputs in order, so batches are the
   same for any number of workers.
5. Packing and batching run in the main process after the workers, so they see the same stream whatever
   `num_workers` is (packing is stateful; grain warns it must not be split over workers).
With data.retrieval_weight > 0 the train split's tokenized documents are interleaved, in that proportion, with
generated retrieval documents (data/retrieval.py, filler from the train split's text), before step 4's workers; the
eval split stays the corpus alone, so eval loss is comparable across mixes.
For a finite pass (eval, or `num_epochs` set) hosts pack different token counts and would yield different numbers of
batches, so `num_batches` fixes the count: a host that runs out yields all-padding batches (loss_mask 0), counted
in `stats["padding_batches"]`; one with more stops early. With several processes a finite pass requires it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import grain
from absl import flags as absl_flags
import ml_collections
import numpy as np

from jaxopd.bundled import resolve_path
from jaxopd.configdict import config_dict_of, from_config_dict
from jaxopd.data import sources
from jaxopd.data.fim import TokenizeDocument
from jaxopd.data.packing import BestFitPackDataset, ConcatThenSplitDataset
from jaxopd.data.retrieval import RetrievalDocuments
from jaxopd.data.tokenizer import DEFAULT_FIM_TOKENS, Tokenizer, load_tokenizer

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `config.data` block: the bundled Python-stdlib corpus with its 4096-piece tokenizer, 10% PSM FIM."""

    source: Literal["text", "jsonl", "array_record", "parquet"] = "jsonl"
    paths: str = "data/corpus/python_stdlib.jsonl.gz"  # comma-separated files or globs
    text_field: str = "text"  # jsonl / parquet: field or column holding the document
    # jsonl: a field holding a prompt that comes before text_field's string in the document and is not trained on
    # (loss on the completion only, as for SFT). None: the whole document is trained on.
    prompt_field: Optional[str] = None
    separator: Optional[str] = None  # text: None = one document per file, else the string between documents
    tokenizer: str = "data/tokenizer.model"  # sentencepiece .model, or tokenizer.json / HF checkpoint directory
    tokenizer_kind: Literal["auto", "sentencepiece", "hf"] = "auto"
    fim_tokens: str = ",".join(DEFAULT_FIM_TOKENS)  # begin,hole,end (DeepSeek: <｜fim▁begin｜>,...)
    add_bos: bool = True
    fim_rate: float = 0.1  # DeepSeek-V3 report, Section 4.1
    fim_mode: Literal["psm", "spm"] = "psm"
    packing: Literal["best_fit", "concat"] = "best_fit"  # "concat": concatenate-then-split, for comparison
    packing_buffer: int = 1024  # pieces (best_fit) held for Best-Fit-Decreasing
    shuffle: bool = True
    num_epochs: Optional[int] = None  # None: repeat forever
    num_workers: int = 0  # tokenization processes (grain mp_prefetch); 0 = in the main process
    read_threads: int = 2  # threads reading + tokenizing ahead in each process
    eval_fraction: float = 0.02  # documents held out for split="eval"
    eval_batches: Optional[int] = None  # batches per eval pass (required with several processes)
    split_seed: int = 0  # fixes the train/eval split independently of the training seed
    # Generated key/value retrieval documents (data/retrieval.py) mixed into the train split: this fraction of its
    # documents (not tokens), each of retrieval_min_tokens to seq_len tokens with 1 to retrieval_max_facts facts.
    retrieval_weight: float = 0.0
    retrieval_min_tokens: int = 128
    retrieval_max_facts: int = 3


def default_data_config() -> ml_collections.ConfigDict:
    """DataConfig's defaults as the ConfigDict a run config's `data` block starts from."""
    return config_dict_of(DataConfig)


def as_data_config(data_config: DataConfig | ml_collections.ConfigDict) -> DataConfig:
    """A DataConfig, checked, from a ConfigDict `data` block (tests, notebooks, `python -m jaxopd.data`)."""
    if isinstance(data_config, DataConfig):
        return data_config
    problems: list[str] = []
    result = from_config_dict(DataConfig, data_config, problems, where="data")
    if problems:
        raise ValueError("; ".join(problems))
    return result


def _resolve_paths(paths: str) -> list[str]:
    return [resolve_path(p) for p in paths.split(",") if p]


class DataIterator(grain.DatasetIterator):
    """Iterator over Batch-contract dicts, with checkpointable state and counts of what it has seen.

    A grain DatasetIterator, so orbax saves it with `grain.checkpoint.CheckpointSave(iterator)` (one JSON file per
    process). A state restores only into a pipeline built with the same config, process_count and num_workers.

    `stats` (counts since this iterator was created or restored, not saved in the state): documents_read,
    documents_empty, documents_invalid_utf8, documents_fim, tokens_read, padding_batches, and the constants
    documents_in_split, documents_per_host, documents_dropped_by_sharding; documents_retrieval and tokens_retrieval
    count the generated retrieval documents among documents_read and tokens_read. `packing_stats` (the packer's
    counts, saved in the state): documents, documents_skipped (under 2 tokens), documents_cut, pieces, rows,
    loss_tokens, padding_tokens.
    """

    def __init__(self, dataset: grain.IterDataset, stats: dict[str, int], packing_stats: dict[str, int], *,
                 tokenizer: Tokenizer, batch_size: int, seq_len: int, num_batches: int | None):
        self._iterator = iter(dataset)
        super().__init__(self._iterator)
        self.stats, self.packing_stats = stats, packing_stats
        self.tokenizer, self.batch_size, self.seq_len = tokenizer, batch_size, seq_len
        self.pad_id = tokenizer.pad_id
        self.num_batches, self._produced, self._exhausted = num_batches, 0, False

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._produced >= self.num_batches:
            raise StopIteration
        rows = None
        if not self._exhausted:
            try:
                rows = next(self._iterator)
            except StopIteration:
                self._exhausted = True
        if rows is None:
            if self.num_batches is None:
                raise StopIteration
            rows = {key: np.zeros([0, self.seq_len], np.float32 if key == "loss_mask" else np.int32)
                    for key in BATCH_KEYS}
            self.stats["padding_batches"] += 1
        self._produced += 1
        return self._pad_rows(rows)

    def _pad_rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The last batch of a finite pass may be short: fill it with padding rows (segment id 0, no loss)."""
        missing = self.batch_size - rows["tokens"].shape[0]
        if missing == 0:
            return rows
        padded = {}
        for key in BATCH_KEYS:
            fill = self.pad_id if key in ("tokens", "targets") else 0
            padded[key] = np.concatenate([rows[key], np.full([missing, self.seq_len], fill, rows[key].dtype)])
        return padded

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iterator.get_state(), "produced": self._produced, "exhausted": self._exhausted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state["grain"])
        self._produced, self._exhausted = state["produced"], state["exhausted"]


class _CountDocuments:
    """Counts the per-document flags in the main process (after the workers) and drops the flags."""

    def __init__(self, stats: dict[str, int]):
        self.stats = stats

    def __call__(self, document: dict[str, Any]) -> dict[str, np.ndarray]:
        self.stats["documents_read"] += 1
        self.stats["documents_empty"] += int(document["empty"])
        self.stats["documents_invalid_utf8"] += int(document["invalid_utf8"])
        self.stats["documents_fim"] += int(document["fim"])
        self.stats["tokens_read"] += len(document["tokens"])
        if document.get("retrieval", False):  # only RetrievalDocuments set the flag
            self.stats["documents_retrieval"] += 1
            self.stats["tokens_retrieval"] += len(document["tokens"])
        return {"tokens": document["tokens"], "prompt_tokens": document.get("prompt_tokens", 0)}


def _derived_seed(seed: int, stream: int) -> int:
    """Independent 32-bit seeds per use, so that runs with seeds s and s + 1 do not share permutations."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _split_documents(data_config, split: str) -> tuple[grain.MapDataset, int, int]:
    """(the split's raw documents as (document index, bytes), documents held out for eval, documents in all)."""
    source = sources.open_source(data_config.source, _resolve_paths(data_config.paths),
                                 text_field=data_config.text_field, separator=data_config.separator,
                                 prompt_field=data_config.prompt_field)
    documents = grain.MapDataset.source(source).map_with_index(lambda index, raw: (index, raw))
    num_eval = int(round(data_config.eval_fraction * len(documents)))
    if data_config.eval_fraction > 0 and num_eval == 0:
        num_eval = 1
    held_out = documents.shuffle(seed=data_config.split_seed)
    return (held_out[:num_eval] if split == "eval" else held_out[num_eval:]), num_eval, len(documents)


def _document_dataset(data_config, *, seed: int, process_index: int, process_count: int, split: str,
                      stats: dict[str, int]) -> grain.MapDataset:
    """Raw documents of this host's shard as (epoch, document index, bytes), shuffled and repeated."""
    documents, num_eval, num_documents = _split_documents(data_config, split)
    per_host = len(documents) // process_count
    stats.update(documents_in_split=len(documents), documents_per_host=per_host,
                 documents_dropped_by_sharding=len(documents) - per_host * process_count)
    if per_host == 0:
        fix = ("give more documents, or a larger data.eval_fraction" if split == "eval" else
               f"give more documents, or set data.eval_fraction=0 (it holds out {num_eval} of the {num_documents}) "
               "and eval_every=0")
        raise ValueError(f"split={split!r} has {len(documents)} documents, fewer than process_count={process_count}; "
                         f"{fix}")
    if data_config.shuffle and split == "train":
        documents = documents.shuffle(seed=_derived_seed(seed, 0))
    documents = documents[process_index:per_host * process_count:process_count]
    if data_config.shuffle and split == "train":
        # grain reshuffles this one in every epoch, with seed + epoch.
        documents = documents.shuffle(seed=_derived_seed(seed, 1))
    num_epochs = 1 if split == "eval" else data_config.num_epochs
    documents = documents.repeat(num_epochs)
    return documents.map_with_index(lambda position, document: (position // per_host, *document))


def _mix_retrieval(documents: grain.MapDataset, data_config: DataConfig, tokenizer: Tokenizer, *, seq_len: int,
                   seed: int, process_index: int) -> grain.MapDataset:
    """The tokenized train `documents` with generated retrieval documents interleaved at data.retrieval_weight (by
    document count; grain's mix takes them in a fixed, exact proportion). Each host draws its own stream."""
    weight = data_config.retrieval_weight
    corpus = _split_documents(data_config, "train")[0].map(lambda document: document[1])
    retrieval = grain.MapDataset.source(RetrievalDocuments(
        tokenizer, corpus, seq_len=seq_len, min_tokens=data_config.retrieval_min_tokens,
        max_facts=data_config.retrieval_max_facts, seed=_derived_seed(seed, 2), stream=process_index,
        add_bos=data_config.add_bos))
    return retrieval if weight == 1.0 else grain.MapDataset.mix([documents, retrieval], [1.0 - weight, weight])


def make_pipeline(data_config: DataConfig | ml_collections.ConfigDict, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None, split: str = "train",
                  num_batches: int | None = None) -> DataIterator:
    """This host's batches: dicts of numpy arrays [batch_size, seq_len] per the Batch contract.

    batch_size is per host (the global batch is batch_size * process_count). process_index / process_count
    default to jax.process_index() / jax.process_count(). num_batches fixes the number of batches of a finite pass
    (default: data.eval_batches for split="eval"); see the module docstring.
    """
    data_config = as_data_config(data_config)
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short: a row needs at least 2 tokens (one input, one target)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is not 'train' or 'eval'")
    if not 0.0 <= data_config.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={data_config.eval_fraction} must be in [0, 1)")
    if split == "eval" and data_config.eval_fraction == 0:
        raise ValueError("split='eval' needs data.eval_fraction > 0")
    if not 0.0 <= data_config.retrieval_weight <= 1.0:
        raise ValueError(f"data.retrieval_weight={data_config.retrieval_weight} must be in [0, 1] (the fraction of "
                         "training documents that are generated retrieval documents)")
    if data_config.prompt_field is not None and (data_config.source != "jsonl" or data_config.fim_rate > 0):
        raise ValueError(f"data.prompt_field={data_config.prompt_field!r} needs data.source='jsonl' (got "
                         f"{data_config.source!r}) and data.fim_rate=0 (got {data_config.fim_rate}): a prompted "
                         "document is not cut for FIM")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if split == "eval" and num_batches is None:
        num_batches = data_config.eval_batches
    finite = split == "eval" or data_config.num_epochs is not None
    if finite and process_count > 1 and num_batches is None:
        raise ValueError("a finite pass on several processes needs a fixed batch count so all hosts step together: "
                         "set data.eval_batches (eval) or pass num_batches (train with data.num_epochs)")

    tokenizer = load_tokenizer(resolve_path(data_config.tokenizer), tuple(data_config.fim_tokens.split(",")),
                               data_config.tokenizer_kind)
    tokenize = TokenizeDocument(tokenizer, seed=seed, fim_rate=data_config.fim_rate, fim_mode=data_config.fim_mode,
                                add_bos=data_config.add_bos)
    packing_stats: dict[str, int] = {}
    stats = dict.fromkeys(["documents_read", "documents_empty", "documents_invalid_utf8", "documents_fim",
                           "tokens_read", "documents_retrieval", "tokens_retrieval", "padding_batches"], 0)
    documents = _document_dataset(data_config, seed=seed, process_index=process_index, process_count=process_count,
                                  split=split, stats=stats).map(tokenize)
    if split == "train" and data_config.retrieval_weight > 0:
        documents = _mix_retrieval(documents, data_config, tokenizer, seq_len=seq_len, seed=seed,
                                   process_index=process_index)
    dataset = documents.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                                          prefetch_buffer_size=max(16, data_config.read_threads * 8)))
    if data_config.num_workers > 0:
        # grain's worker start reads absl flags; outside an absl app (pytest, notebooks) use their defaults.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    # Empty documents are counted, then dropped: they have no token to train on.
    dataset = dataset.map(_CountDocuments(stats)).filter(lambda document: len(document["tokens"]) > 0)
    if data_config.packing == "best_fit":
        # Best-fit emits a buffer's rows length-sorted; the packer reshuffles them with this seed.
        dataset = BestFitPackDataset(dataset, seq_len=seq_len, buffer_size=data_config.packing_buffer,
                                     pad_id=tokenizer.pad_id, shuffle_seed=seed if data_config.shuffle else None,
                                     stats=packing_stats)
    else:
        dataset = ConcatThenSplitDataset(dataset, seq_len=seq_len, pad_id=tokenizer.pad_id, stats=packing_stats)
    dataset = dataset.batch(batch_size)
    return DataIterator(dataset, stats, packing_stats, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len,
                        num_batches=num_batches)

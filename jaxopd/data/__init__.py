"""Data pipeline on grain: sources, tokenizers, Fill-in-the-Middle, packing, batches per the Batch contract."""

from jaxopd.data.fim import TokenizeDocument
from jaxopd.data.packing import BestFitPackDataset, ConcatThenSplitDataset, pack_best_fit
from jaxopd.data.pipeline import DataIterator, default_data_config, make_pipeline
from jaxopd.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

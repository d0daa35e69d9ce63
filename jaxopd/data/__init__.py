"""Data pipeline on grain: sources, tokenizers, Fill-in-the-Middle, packing, batches per the Batch contract."""

import importlib

# Imported on first use (PEP 562), so that `python -m jaxopd.data.tokenizer` does not find its own module already
# imported by the package.
_EXPORTS = {
    "TokenizeDocument": "fim",
    "BestFitPackDataset": "packing",
    "ConcatThenSplitDataset": "packing",
    "pack_best_fit": "packing",
    "DataIterator": "pipeline",
    "default_data_config": "pipeline",
    "make_pipeline": "pipeline",
    "HFTokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxopd.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxopd.data.{_EXPORTS[name]}"), name)


def __dir__():
    return __all__

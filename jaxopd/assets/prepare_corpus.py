"""Regenerates the bundled corpus and tokenizer from this machine's Python standard library.

    PYTHONPATH=. python data/prepare_corpus.py

Writes data/corpus/python_stdlib.jsonl.gz (one JSON object per source file: {"path", "text"}), the standard library's
license next to it (data/corpus/LICENSE-PSF.txt) and data/tokenizer.model
(sentencepiece BPE, 4096 pieces, trained on that corpus). Deterministic for a given Python version: files are taken in
sorted path order, gzip is written with mtime 0, and sentencepiece trains single-threaded.
"""

import argparse
import gzip
import json
import pathlib
import sys
import sysconfig

from jaxopd.data.tokenizer import train_sentencepiece

# Tests, vendored packages, GUI demos and the ~100 near-identical codec tables would skew a small code corpus.
EXCLUDED_DIRS = {
    "test", "tests", "idle_test", "site-packages", "idlelib", "lib2to3", "turtledemo", "ensurepip", "tkinter",
    "encodings", "pydoc_data", "__pycache__",
}
MAX_FILE_BYTES = 150_000


def stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
    return [
        path for path in sorted(root.rglob("*.py"))
        if not set(path.relative_to(root).parts[:-1]) & EXCLUDED_DIRS
        and not path.relative_to(root).parts[0].startswith("config-")
        and path.stat().st_size <= MAX_FILE_BYTES
    ]


def main() -> None:
    here = pathlib.Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(here / "corpus" / "python_stdlib.jsonl.gz"))
    parser.add_argument("--tokenizer", default=str(here / "tokenizer.model"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in stdlib_files(root):
        documents.append({"path": str(path.relative_to(root)), "text": path.read_text(encoding="utf-8")})
    pathlib.Path(args.corpus).parent.mkdir(parents=True, exist_ok=True)
    with open(args.corpus, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        for document in documents:
            f.write((json.dumps(document, ensure_ascii=False) + "\n").encode("utf-8"))
    # The PSF license asks that its text and copyright notice travel with redistributed sources.
    license_path = pathlib.Path(args.corpus).parent / "LICENSE-PSF.txt"
    license_path.write_bytes((root / "LICENSE.txt").read_bytes())
    tokenizer = train_sentencepiece((d["text"] for d in documents), args.tokenizer, args.vocab_size)
    chars = sum(len(d["text"]) for d in documents)
    print(f"Python {sys.version.split()[0]} stdlib at {root}: {len(documents)} files, {chars} characters "
          f"-> {args.corpus}; tokenizer vocab {tokenizer.vocab_size} -> {args.tokenizer}")


if __name__ == "__main__":
    main()

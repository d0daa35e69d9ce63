"""Long-context evaluation of a jaxopd run/checkpoint or a Hugging Face checkpoint.

    python -m jaxopd.evaluate niah --checkpoint=workdirs/run --lengths=1k,2k,4k --depths=0,0.25,0.5,0.75,1
    python -m jaxopd.evaluate perplexity --checkpoint=workdirs/run --lengths=256,512,1k,2k,4k,8k

niah hides "The secret key for <name> is <6 digits>." at each depth of filler text (the bundled Python corpus,
another --text, or --text=generated), asks for the key, generates greedily and scores the digits exactly; it writes
niah.json (every case and the depth x length score grid) and niah.png (x = context length, y = document depth,
colour = score). perplexity writes perplexity.json and perplexity.png: the loss of the tokens in each position bucket
[previous length, length), past the model's window too. Both go to --output_dir; the seed fixes every needle and
every offset into the text.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Sequence

from jaxopd.bundled import resolve_path
from jaxopd.distill.teacher import load_model
from jaxopd.evaluate import figures, niah, perplexity
from jaxopd.evaluate.inputs import GENERATED, checkpoint_tokenizer, parse_lengths, run_config, token_stream
from jaxopd.training import sharding
from jaxopd.training.config import MeshConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxopd.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    niah_parser = commands.add_parser("niah", help="needle-in-a-haystack retrieval over a length x depth grid")
    perplexity_parser = commands.add_parser("perplexity", help="loss by position bucket, past the trained window")
    for command in (niah_parser, perplexity_parser):
        command.add_argument("--checkpoint", required=True,
                             help="jaxopd run workdir or checkpoint directory, or a Hugging Face checkpoint")
        command.add_argument("--lengths", required=True, help="comma-separated token counts, k = 1024: 1k,2k,4k")
        command.add_argument("--tokenizer", default=None, help="default: the run's data.tokenizer (its config.json) "
                             "or the Hugging Face checkpoint's tokenizer.json")
        command.add_argument("--text", default="data/corpus/python_stdlib.jsonl.gz",
                             help=".jsonl(.gz) or text files, comma-separated" +
                             (f", or '{GENERATED}' for a repeated sentence" if command is niah_parser else ""))
        command.add_argument("--text_field", default="text", help="JSON Lines field holding a document")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--batch_size", type=int, default=8, help="rows per generation call or forward pass")
        command.add_argument("--output_dir", default="evaluation")
    niah_parser.add_argument("--depths", default=",".join(f"{i / 10:g}" for i in range(11)),
                             help="comma-separated fractions of the filler before the needle, in [0, 1]")
    niah_parser.add_argument("--samples", type=int, default=1, help="needles per (length, depth) cell")
    niah_parser.add_argument("--allow_beyond_window", action="store_true",
                             help="allow lengths past max_position_embeddings (to show retrieval failing there)")
    perplexity_parser.add_argument("--num_sequences", type=int, default=8, help="text windows scored")
    perplexity_parser.add_argument("--chunk_size", type=int, default=512, help="sequence chunk of the log-probs")
    return parser


def _parse_depths(text: str) -> list[float]:
    try:
        depths = [float(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--depths={text!r} must be comma-separated numbers in [0, 1]") from None
    if any(not 0.0 <= depth <= 1.0 for depth in depths):
        raise ValueError(f"--depths={text!r}: every depth must lie in [0, 1]")
    return depths


def _load(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(model, params, mesh): params FSDP-sharded over all devices; the tokenizer checked against the model."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
    model, params = load_model(args.checkpoint, mesh)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but {args.checkpoint} only "
                         f"{model.config.vocab_size}; pass the model's own --tokenizer")
    return model, params, mesh


def _write(output_dir: pathlib.Path, name: str, result: dict[str, Any]) -> pathlib.Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def run_niah_command(args: argparse.Namespace, lengths: list[int]) -> None:
    depths = _parse_depths(args.depths)
    if args.samples < 1 or args.batch_size < 1:
        raise ValueError(f"--samples={args.samples} and --batch_size={args.batch_size} must be >= 1")
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    filler = token_stream(tokenizer, args.text, max(lengths), args.text_field)
    cases = niah.make_cases(tokenizer, filler, lengths, depths, args.samples, args.seed)
    model, params, mesh = _load(args, tokenizer)
    niah.check_lengths(lengths, model.config.max_position_embeddings, args.allow_beyond_window)
    records = niah.run_niah(model, params, tokenizer, mesh, cases, batch_size=args.batch_size)
    scores = niah.score_grid(records, lengths, depths)
    result = {"checkpoint": str(args.checkpoint), "max_position_embeddings": model.config.max_position_embeddings,
              "text": args.text, "seed": args.seed, "samples": args.samples, "lengths": lengths, "depths": depths,
              "scores": scores, "cases": records}
    output_dir = pathlib.Path(args.output_dir)
    json_path = _write(output_dir, "niah", result)
    figures.niah_heatmap(scores, lengths, depths, output_dir / "niah.png", f"Needle in a haystack: {args.checkpoint}")
    by_length = {length: sum(row[column] for row in scores) / len(depths) for column, length in enumerate(lengths)}
    print(f"wrote {json_path} and niah.png; mean score by length: {by_length}")


def run_perplexity_command(args: argparse.Namespace, lengths: list[int]) -> None:
    perplexity.check_bucket_ends(lengths)
    if args.num_sequences < 1 or args.batch_size < 1:
        raise ValueError(f"--num_sequences={args.num_sequences} and --batch_size={args.batch_size} must be >= 1")
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    stream = token_stream(tokenizer, args.text, lengths[-1], args.text_field)
    windows = perplexity.sample_windows(stream, lengths[-1], args.num_sequences, args.seed)
    model, params, mesh = _load(args, tokenizer)
    losses = perplexity.token_losses(model, params, mesh, windows, batch_size=args.batch_size,
                                     chunk_size=args.chunk_size)
    buckets = perplexity.bucket_losses(losses, lengths)
    config = run_config(args.checkpoint)
    trained_seq_len = config["seq_len"] if config is not None else None
    result = {"checkpoint": str(args.checkpoint), "max_position_embeddings": model.config.max_position_embeddings,
              "trained_seq_len": trained_seq_len, "text": args.text, "seed": args.seed,
              "num_sequences": args.num_sequences, "buckets": buckets}
    output_dir = pathlib.Path(args.output_dir)
    json_path = _write(output_dir, "perplexity", result)
    figures.perplexity_curve(buckets, output_dir / "perplexity.png", f"Loss by position: {args.checkpoint}",
                             model.config.max_position_embeddings, trained_seq_len)
    print(f"wrote {json_path} and perplexity.png; perplexity by bucket end: "
          f"{ {bucket['end']: round(bucket['perplexity'], 3) for bucket in buckets} }")


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    args.checkpoint = resolve_path(args.checkpoint)  # data/... names a bundled checkpoint from any directory
    figures.pyplot()  # a missing matplotlib stops the command before any model loads
    command = run_niah_command if args.command == "niah" else run_perplexity_command
    try:
        command(args, parse_lengths(args.lengths))
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()

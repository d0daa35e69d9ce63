"""The student out as a Hugging Face checkpoint that transformers' `AutoModelForCausalLM.from_pretrained` loads:

    python -m jaxopd.export --checkpoint=<run workdir | its checkpoints/ | a step directory> --out=<dir> \
        [--step=N] [--dtype=bfloat16] [--tokenizer=<path>] [--overwrite]

writes config.json and safetensors (jaxopd.hf.save_hf, in the params' own dtype unless --dtype), LoRA adapters merged
into the weights, and the tokenizer files of the run's data.tokenizer (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, tokenizer.model: those present). A run with `export_hf=<dir>` does the
same when it finishes (jaxopd/training/loop.py calls `export_params`). A non-empty --out is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
from typing import Any, Optional, Sequence

from jaxopd.bundled import resolve_path
from jaxopd.model import ModelConfig, Transformer, lora
from jaxopd.training import checkpoint, sharding
from jaxopd.training.config import MeshConfig, model_config_dict, to_model_config
from jaxopd.training.state import abstract_params


def check_out(out: str | pathlib.Path, overwrite: bool, key: str = "--out",
              fix: str = "pass --overwrite to replace it") -> pathlib.Path:
    """`out` as a path, after refusing a non-empty directory (or a file) there unless `overwrite`."""
    out = pathlib.Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{key}={out} exists and is not empty; give a new directory, or {fix}")
    return out


def export_params(config: ModelConfig, params: Any, out: str | pathlib.Path, *, dtype: Optional[str] = None,
                  tokenizer: str = "", overwrite: bool = False) -> list[str]:
    """Writes `params` of the model `config` describes to `out` as a Hugging Face checkpoint (stored in `dtype`,
    default the params' own), with the tokenizer files found at `tokenizer` (a file or directory; "" = none).
    Returns the tokenizer files copied."""
    from jaxopd.hf import copy_tokenizer_files, save_hf

    out = check_out(out, overwrite)
    tokenizer_path = resolve_path(tokenizer) if tokenizer else ""
    if tokenizer and not pathlib.Path(tokenizer_path).exists():
        raise ValueError(f"the tokenizer {tokenizer} does not exist (from here); pass --tokenizer=<its path>")
    config, params = lora.merged(config, params)  # adapters folded into their weights; as is without LoRA
    if out.is_dir():  # only reached with overwrite, or empty
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    save_hf(Transformer(config), params, out, dtype=dtype)
    return copy_tokenizer_files(tokenizer_path, out) if tokenizer else []


def _step_directory(path: pathlib.Path, step: Optional[int]) -> tuple[pathlib.Path, Optional[int]]:
    """(checkpoint directory, step) for a run workdir / checkpoints/ directory, or for one step's directory."""
    if path.name.isdigit() and not (path / "checkpoints").is_dir():
        if step is not None and step != int(path.name):
            raise ValueError(f"--checkpoint={path} is step {path.name} but --step={step}; give one of them")
        return path.parent, int(path.name)
    return path, step


def export_checkpoint(path: str | pathlib.Path, out: str | pathlib.Path, *, step: Optional[int] = None,
                      dtype: Optional[str] = None, tokenizer: str = "", overwrite: bool = False
                      ) -> tuple[int, list[str]]:
    """Exports the student of a jaxopd checkpoint (a run workdir, its checkpoints/, or one step's directory; the
    newest step unless `step`) to `out`; the tokenizer files come from `tokenizer`, default the run's
    data.tokenizer. Returns (the step exported, the tokenizer files copied)."""
    check_out(out, overwrite)  # before anything is read
    directory, step = _step_directory(pathlib.Path(resolve_path(str(path))), step)
    step, run_config = checkpoint.read_run_config(directory, step)
    config = to_model_config(model_config_dict(run_config["model"]))
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))  # params sharded over this host's devices
    params = checkpoint.load_params(directory, abstract_params(Transformer(config), mesh), step)
    tokenizer = tokenizer or run_config.get("data", {}).get("tokenizer", "")
    return step, export_params(config, params, out, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxopd.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run workdir, its checkpoints/, or a step directory")
    parser.add_argument("--out", required=True, help="the Hugging Face checkpoint directory to write")
    parser.add_argument("--step", type=int, default=None, help="the step to export (default: the newest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="stored dtype (default: the params' own)")
    parser.add_argument("--tokenizer", default="", help="tokenizer file or directory (default: the run's "
                                                        "data.tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        step, copied = export_checkpoint(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                                         tokenizer=args.tokenizer, overwrite=args.overwrite)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    print(f"wrote {args.out}: step {step} of {args.checkpoint} as a Hugging Face checkpoint; tokenizer files: "
          f"{', '.join(copied) or 'none'}")


if __name__ == "__main__":
    main()

"""Files that ship inside the package, and the one rule that finds them from any working directory.

The package carries its run configs (`jaxopd/configs/`), model presets (`jaxopd/model/presets/`) and small data
(`jaxopd/assets/`: tokenizers, the Python corpus, the arithmetic task with its checkpoints). A checkout shows the same
files at the top level through links (`configs/`, `models/`, `data/`); an installed wheel has only the package.
`resolve_path` applies that table, so `data/tasks/arithmetic/teacher` or `configs/tiny_distill.py` name the same file
from a checkout's root, from any other directory, and in a pip-installed package.
"""

from __future__ import annotations

import ast
import glob
import os
import pathlib
from typing import Optional

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# Top-level name of the checkout's view -> the package directory holding those files.
VIEWS = {
    "configs": PACKAGE_DIR / "configs",
    "models": PACKAGE_DIR / "model" / "presets",
    "data": PACKAGE_DIR / "assets",
}


def resolve_path(path: str | os.PathLike) -> str:
    """`path` as given when it exists from the working directory (or is absolute); else the bundled file it names
    through VIEWS (`data/...`, `configs/...`, `models/...`); else `path` unchanged, for the caller's error to name."""
    path = os.path.expanduser(os.fspath(path))
    if not path or os.path.isabs(path) or os.path.exists(path) or (glob.has_magic(path) and glob.glob(path)):
        return path
    head, _, rest = path.replace(os.sep, "/").partition("/")
    if head in VIEWS and rest:
        candidate = str(VIEWS[head] / rest)
        if os.path.exists(candidate) or (glob.has_magic(candidate) and glob.glob(candidate)):
            return candidate
    return path


def bundled_run_configs() -> list[str]:
    """Names of the run configs that ship with the package (`--config=<name>`)."""
    return sorted(p.stem for p in VIEWS["configs"].glob("*.py") if not p.stem.startswith("_"))


def run_config_path(name_or_path: str) -> pathlib.Path:
    """A run config by bundled name (`tiny_distill`) or by path (`configs/tiny_distill.py`, `my_run.py`)."""
    if "/" not in name_or_path and not name_or_path.endswith((".py", ".json")):
        path = VIEWS["configs"] / f"{name_or_path}.py"
        if not path.is_file():
            raise ValueError(f"no bundled run config named {name_or_path!r}; bundled: {bundled_run_configs()}, "
                             "or give the path of a config file")
        return path
    path = pathlib.Path(resolve_path(name_or_path))
    if not path.is_file():
        raise ValueError(f"config file {name_or_path} does not exist; bundled configs by name: "
                         f"{bundled_run_configs()}")
    return path


def run_config_summary(name: str) -> str:
    """The first paragraph of a bundled run config's docstring, on one line (read, not executed)."""
    docstring = ast.get_docstring(ast.parse(run_config_path(name).read_text())) or ""
    return " ".join(docstring.split("\n\n")[0].split())


def split_variant(name_or_path: str) -> tuple[str, Optional[str]]:
    """("opd_qwen3", "gpu8") for "opd_qwen3:gpu8": a config file's variant, passed to its `get_config(variant)` (the
    `path:argument` convention of ml_collections' config flags); (name, None) without one."""
    name, colon, variant = name_or_path.rpartition(":")
    return (name, variant) if colon and name else (name_or_path, None)


def resolve_config_flag(argv: list[str]) -> list[str]:
    """`argv` with `--config=<name or path>[:variant]` replaced by the config file's path and the same variant (for
    absl's config_flags, which only read paths)."""
    def resolved(value: str) -> str:
        name, variant = split_variant(value)
        return str(run_config_path(name)) + (f":{variant}" if variant is not None else "")
    return [f"--config={resolved(arg.split('=', 1)[1])}" if arg.startswith("--config=") else arg for arg in argv]

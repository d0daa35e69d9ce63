"""The two figures as PNG files. matplotlib is imported only here, on first use, and is not a dependency of the
package (`pip install 'jaxopd[eval]'` brings it)."""

from __future__ import annotations

import pathlib
from typing import Any, Optional, Sequence

from jaxopd.evaluate.inputs import format_length


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; ImportError with the install line when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the evaluation figures need matplotlib: pip install matplotlib (or 'jaxopd[eval]')"
                          ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def niah_heatmap(scores: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float],
                 path: str | pathlib.Path, title: str) -> None:
    """The DeepSeek-V3 report's needle-in-a-haystack layout: x = context length, y = document depth (0 % at the
    top), colour = score (red 0 to green 1). scores `[len(depths)][len(lengths)]`."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(lengths) + 2.5), max(3.0, 0.35 * len(depths) + 1.5)))
    image = axes.imshow(scores, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(lengths)), [format_length(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{100 * depth:g}" for depth in depths])
    axes.set_xlabel("Context length (tokens)")
    axes.set_ylabel("Document depth (%)")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="Score")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def perplexity_curve(buckets: Sequence[dict[str, float]], path: str | pathlib.Path, title: str,
                     max_position_embeddings: int, trained_seq_len: Optional[int] = None) -> None:
    """Perplexity of each position bucket against the bucket's end, with the model's window (and the run's trained
    sequence length, when known) marked."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.0, 4.0))
    ends = [bucket["end"] for bucket in buckets]
    axes.plot(ends, [bucket["perplexity"] for bucket in buckets], marker="o")
    axes.set_xscale("log", base=2)
    axes.set_xticks(ends, [format_length(end) for end in ends])
    axes.minorticks_off()
    axes.set_yscale("log")
    axes.axvline(max_position_embeddings, color="grey", linestyle="--",
                 label=f"max_position_embeddings = {max_position_embeddings}")
    if trained_seq_len is not None and trained_seq_len != max_position_embeddings:
        axes.axvline(trained_seq_len, color="grey", linestyle=":", label=f"trained seq_len = {trained_seq_len}")
    axes.set_xlabel("Token position (bucket end)")
    axes.set_ylabel("Perplexity")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

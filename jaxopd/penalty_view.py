"""The per-token teacher penalty of a student completion as an HTML page (the seed's figure of OPD's dense signal).

    python -m jaxopd.penalty_view --student=DIR --teacher=DIR --tokenizer=data/tasks/arithmetic/tokenizer.json \
        --prompt "347+85=" --completion "422" --out page.html

Each completion token is shaded by log pi_student(x_t) - log pi_teacher(x_t), the sampled reverse KL that OPD
penalizes: red where the teacher finds the token less likely than the student does (a penalty), blue where more
likely. Hovering a token shows both log-probs. DIR is a jaxopd checkpoint directory (a run's `checkpoints/`, or an
exported one) or a Hugging Face checkpoint, whose tokenizer files are used when --tokenizer is not given.
"""

from __future__ import annotations

import argparse
import html
import math
import pathlib
from typing import Sequence

import numpy as np

ARITHMETIC_TOKENIZER = "data/tasks/arithmetic/tokenizer.json"


def render_html(prompt_tokens: Sequence[str], completion_tokens: Sequence[str], student_logprobs: Sequence[float],
                teacher_logprobs: Sequence[float], *, title: str = "Teacher penalty per token") -> str:
    """A standalone HTML page: the prompt in grey, then each completion token shaded by its penalty
    student_logprobs[i] - teacher_logprobs[i] (red positive, blue negative; full colour at the largest |penalty|)."""
    if not len(completion_tokens) == len(student_logprobs) == len(teacher_logprobs):
        raise ValueError(f"{len(completion_tokens)} completion tokens but {len(student_logprobs)} student and "
                         f"{len(teacher_logprobs)} teacher log-probs: give one of each per token")
    penalties = np.asarray(student_logprobs, np.float64) - np.asarray(teacher_logprobs, np.float64)
    scale = max(float(np.abs(penalties).max()) if len(penalties) else 0.0, 1e-9)
    spans = [f'<span class="prompt">{html.escape(token)}</span>' for token in prompt_tokens]
    for token, penalty, student, teacher in zip(completion_tokens, penalties, student_logprobs, teacher_logprobs):
        alpha = min(abs(penalty) / scale, 1.0)
        colour = f"rgba(220,40,40,{alpha:.3f})" if penalty > 0 else f"rgba(40,90,220,{alpha:.3f})"
        tip = (f"penalty {penalty:+.4f} = log p_student {student:.4f} - log p_teacher {teacher:.4f} "
               f"(p_student {math.exp(student):.3f}, p_teacher {math.exp(teacher):.3f})")
        spans.append(f'<span class="token" style="background:{colour}" title="{html.escape(tip)}" '
                     f'data-penalty="{penalty:.6f}">{html.escape(token)}</span>')
    total = float(penalties.sum())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.text {{ font-family: monospace; font-size: 1.6em; white-space: pre-wrap; line-height: 1.8; }}
.prompt {{ color: #888; }}
.token {{ padding: 0.1em 0.05em; border-radius: 0.2em; }}
</style></head>
<body>
<h2>{html.escape(title)}</h2>
<p>Shading: log &pi;<sub>student</sub>(x<sub>t</sub>) &minus; log &pi;<sub>teacher</sub>(x<sub>t</sub>), red where the
teacher penalizes the token, blue where it prefers it; full colour at |penalty| = {scale:.3f}. Hover for values.
Sum over the completion: {total:+.4f} nats.</p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="student checkpoint directory (jaxopd or Hugging Face)")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory (same tokenizer)")
    parser.add_argument("--tokenizer", default="", help="tokenizer file or directory (default: the student's "
                        f"directory when it holds tokenizer.json, else {ARITHMETIC_TOKENIZER})")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--completion", required=True, help="the student's completion text")
    parser.add_argument("--no-bos", action="store_true", help="do not start the prompt with the BOS token")
    parser.add_argument("--out", default="penalty.html")
    args = parser.parse_args(argv)

    from jaxopd.bundled import resolve_path
    from jaxopd.data.tokenizer import load_tokenizer
    from jaxopd.distill.teacher import load_model, score_texts

    student_tokenizer = pathlib.Path(resolve_path(args.student)) / "tokenizer.json"
    tokenizer = load_tokenizer(resolve_path(args.tokenizer or (str(student_tokenizer.parent) if
                                                               student_tokenizer.is_file() else ARITHMETIC_TOKENIZER)))
    prompt_ids = ([] if args.no_bos or tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(args.prompt)
    completion_ids = tokenizer.encode(args.completion)
    if not completion_ids:
        raise SystemExit("error: --completion encodes to no tokens")
    logprobs = {}
    for role, path in (("student", args.student), ("teacher", args.teacher)):
        model, params = load_model(resolve_path(path))
        logprobs[role] = score_texts(model, params, prompt_ids, completion_ids)
    page = render_html([tokenizer.id_to_token(i) for i in prompt_ids], [tokenizer.id_to_token(i) for i in completion_ids],
                       logprobs["student"].tolist(), logprobs["teacher"].tolist(),
                       title=f"Teacher penalty: {args.prompt}{args.completion}")
    with open(args.out, "w") as f:
        f.write(page)
    penalties = logprobs["student"] - logprobs["teacher"]
    print(f"wrote {args.out}: per-token penalties {np.round(penalties, 4).tolist()}")


if __name__ == "__main__":
    main()

"""Multi-host distillation: two processes (4 CPU devices each) run the same distillation steps as one process with 8
devices. Each samples its half of every step's prompts; the rows are assembled into global arrays in process order,
so the same global rng draws the same tokens, and rewards, FLOPs and eval metrics are summed over the processes.
The prompt position being global, a run started on two processes resumes on one (here also from continuous batching to
the static sampler)."""

import json
import pathlib

import numpy as np
import pytest

from jaxopd import train
from jaxopd.training import config as config_lib

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny_distill.py"
# 8 prompts x 4 samples a step in two microbatches of 16 rows (process 0's rows are the first microbatch in both
# layouts); eval on 16 held-out prompts before, after step 1 (the first launch's end), 2 and 3.
OVERRIDES = {"loss": "reverse_kl", "steps": 3, "batch_size": 32, "microbatch_size": 16,
             "distill.eval_prompts_count": 16, "eval_every": 2, "checkpoint_every": 1, "log_every": 1,
             "progress_bar": False}
# Functions of the sampled tokens alone: equal when both layouts sample the same tokens.
TOKEN_METRICS = ("reward", "completion_length", "flops/sampling", "flops/teacher_scoring", "flops/total",
                 "eval/accuracy", "eval/teacher_accuracy")
# Float32 results of cross-device reductions, whose order differs between the layouts.
FLOAT_METRICS = ("loss", "reverse_kl", "grad_norm", "eval/reverse_kl")


def _metrics(workdir):
    """{(step, name): value} over metrics.jsonl."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {(row["step"], name): value for row in rows for name, value in row.items()
            if name in TOKEN_METRICS + FLOAT_METRICS}


@pytest.mark.slow
def test_two_processes_distill_like_one_process_and_resume(tmp_path, run_processes):
    # Two processes run step 1, save and stop; relaunched, they resume from the checkpoint and run step 2; then this
    # one process (8 devices) resumes their checkpoint and runs step 3.
    # The two processes sample through continuous batching (8 slots split 4 + 4, every process taking the same refill
    # decisions), the one process through the static sampler: the tokens are the same either way.
    for steps in (1, 2):
        run_processes(CONFIG, tmp_path / "multi", {**OVERRIDES, "steps": steps, "distill.decode_slots": 8})
    data = {path.name: json.loads(path.read_text())
            for path in (tmp_path / "multi" / "checkpoints" / "2" / "data").glob("process_*.json")}
    train.train(config_lib.load_config_file(CONFIG, {"workdir": str(tmp_path / "multi"), **OVERRIDES}))
    train.train(config_lib.load_config_file(CONFIG, {"workdir": str(tmp_path / "single"), **OVERRIDES}))

    # Each step ran once in "multi": the relaunches resumed instead of starting over.
    rows = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    single, multi = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
    assert {(3, "eval/accuracy"), (3, "loss"), (0, "eval/teacher_accuracy")} <= set(single) <= set(multi)
    for key, value in single.items():
        if key[1] in TOKEN_METRICS:
            assert multi[key] == pytest.approx(value, rel=1e-12), key
        else:
            # The loss itself is ~1e-7 (on-policy, the batch-mean KL baseline centres the advantages): rounding only.
            np.testing.assert_allclose(multi[key], value, rtol=1e-4, atol=1e-5, err_msg=str(key))
    # Each process saved its own prompt-stream state: the global position, as the one process did.
    assert sorted(data) == ["process_0-of-2.json", "process_1-of-2.json"]
    expected = json.loads((tmp_path / "single" / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text())
    assert expected["source"] == {"next_index": 16} and all(state == expected for state in data.values())


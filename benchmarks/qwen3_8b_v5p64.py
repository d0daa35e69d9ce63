"""Qwen3-8B pretraining on a v5p-64 slice (`pretrain_v5p64.py` says the run), for `python -m jaxopd.plan`:

    python -m jaxopd.plan --config=benchmarks/qwen3_8b_v5p64.py --topology=v5p:2x4x4
"""

from benchmarks.pretrain_v5p64 import pretrain_config


def get_config():
    return pretrain_config("qwen3_8b")

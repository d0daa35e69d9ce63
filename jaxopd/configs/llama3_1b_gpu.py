"""A 1B-class dense model (Llama 3.2 1B shape, models/llama3_1b.py) pretrained on one GPU: bf16 compute with
fp32 params, layers rematerialized except their matmul outputs, 16 x 2048-token sequences per step as 4 accumulated
microbatches of 4.

It runs as is on the bundled corpus and tokenizer (vocab 4096 instead of Llama's 128256: ~0.97B params);
for real runs point data.paths at the corpus and data.tokenizer at the Llama 3 tokenizer and drop the vocab override.

    python -m jaxopd.train --config=configs/llama3_1b_gpu.py --config.workdir=/tmp/llama1b
"""

from jaxopd.training.config import base_config, load_model_preset


def get_config():
    config = base_config()
    config.workdir = "workdirs/llama3_1b_gpu"
    # Each layer keeps its weight matmuls' bf16 outputs (q/k/v/o, gate/up: ~43 KB per token) for the backward pass:
    # ~5.6 GB for a 4 x 2048-token microbatch over 16 layers, beside ~20 GB of fp32 params, grads and Adam moments.
    # It recomputes only attention and the elementwise work (~1/8 of a forward pass at 2048 tokens) where "full"
    # recomputes the whole forward pass; "dots_saveable" would also keep the float32 attention logits (2 GB a layer).
    # On a GPU under 40 GB use remat="full".
    config.model = load_model_preset("llama3_1b", vocab_size=4096, dtype="bfloat16",
                                     remat="dots_with_no_batch_dims_saveable")
    config.seq_len = 2048
    config.batch_size = 16
    config.microbatch_size = 4
    config.steps = 20000
    config.loss_chunk_size = 512
    config.mtp_weight = 0.0
    config.moe_balance_weight = 0.0
    config.moe_bias_rate = 0.0
    config.optimizer.update(b1=0.9, b2=0.95, weight_decay=0.1, grad_clip_norm=1.0)
    config.optimizer.schedule.update(kind="warmup_cosine", peak_lr=3e-4, warmup_steps=1000, decay_end=20000,
                                     end_lr=3e-5)
    config.log_every = 10
    config.eval_every = 500
    config.checkpoint_every = 1000
    config.data.eval_batches = 16
    config.data.num_workers = 4
    config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
    return config

"""Training: the typed run config, the sharded state, the one jitted train step and its objectives, the one loop,
optimizer and schedules, checkpoints, sharding, metrics and FLOP counts.

- config.py: RunConfig and its groups (frozen), base_config() / load_config_file() / to_run_config().
- state.py: mesh, model, sharded state created in place, the jitted train/eval steps (`build`).
- step.py: the train step (gradient accumulation, AdamW, MoE bias update) over an `Objective`.
- objectives.py: the `Objective` contract and next-token cross-entropy (+ MTP, z-loss, MoE balance).
- loop.py: the one loop every run goes through, fed by a `BatchSource` and an `Evaluator`; guard.py: when a run has
  gone wrong (non-finite, diverging) and which checkpoint predates it; workdir_lock.py: one run per workdir.
- pretraining.py: the batch source and evaluator of pretraining (the grain pipeline).
- checkpoint.py (restore tells damaged from incompatible), optimizer.py, sharding.py, metrics.py, flops.py.
"""

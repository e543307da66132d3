"""The generic training core: a `Task` (what a system trains, see `task.py`) driven by one loop
(`loop.train`) that knows nothing of any system: mesh and sharding, jit with the state donated,
gradient accumulation, clipping, AdamW, EMA, the non-finite guard, Orbax checkpoints with the
data-iterator state, TensorBoard, progress bar and MFU (`leffa_jax/observe.py`).

    from leffa_jax.training import loop
    result = loop.train(task, config, workdir)
"""

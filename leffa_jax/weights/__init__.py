"""Weights between PyTorch (official Leffa files, diffusers folders) and Flax, both ways.

The only package that knows PyTorch names and NCHW layouts; torch is imported lazily, only to
read or write `.pth`/`.bin`. Modules, from the bottom up:
    tensor_io   TensorSource (safetensors, .pth weights_only, .bin, sharded index; streamed),
                LazyTensor, write_safetensors, write_torch, CheckpointError
    leaf_rules  torch key + tensor <-> Flax path + array (the diffusers rules)
    modules     NNX module <-> flat {flax path: array}, strict key/shape checks
    outputs     output checks made before any work (never inside a source, folders new or empty
                or replaced as a whole) and atomic folder writes
    folder      the leffa_jax checkpoint folder (leffa_jax.json, config/, params.safetensors)
    base_configs  the bundled base-model configs by name ("sd15-inpainting", "sdxl-inpainting")
                and where the official weights come from (Hugging Face franciszzj/Leffa)
    plans       official layouts checked into Plans; conversions both ways
Which module a component kind builds and which leaf rules it uses is `leffa_jax.components`.
Conversion streams tensor by tensor, so peak memory stays near one copy of the largest tensor.
"""

from leffa_jax.weights.tensor_io import CheckpointError, CheckpointNotFoundError

__all__ = ["CheckpointError", "CheckpointNotFoundError"]

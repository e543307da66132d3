"""Helpers that build the PyTorch side (diffusers) of parity tests, inside the tests."""

from __future__ import annotations

import numpy as np

torch = __import__("pytest").importorskip("torch")
diffusers = __import__("pytest").importorskip("diffusers")


class IdentityProcessor:
    """The official Leffa 'removed' cross-attention: returns its input."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


def perturb_(module, scale: float = 0.05, seed: int = 0) -> None:
    """Move every parameter off its init (zero/unit norms included), as the fixtures do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw(x) -> np.ndarray:
    """NHWC (jax/numpy) -> NCHW numpy."""
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)

"""Guidance combinators: plain functions over the noise predictions of conditioning branches.

A system evaluates all guidance branches of a step in ONE model call: the branches sit on the
batch axis, sample-major (`repeat_branches` / `interleave_branches` build the (B * n, ...) input,
each sample's n branches adjacent so that they stay on one device when the batch is sharded), and
`split_branches` gives the n predictions (B, ...) back. The combinators then mix them:

- `classifier_free_guidance`: eps_u + s (eps_c - eps_u), optionally `rescale_noise_cfg` (phi);
- `nested_guidance`: N conditions switched on one after the other, a scale each, the branch
  order as data: eps = e(none) + sum_k s_k [e(c_1..c_k) - e(c_1..c_{k-1})] (InstructPix2Pix,
  Magic Clothing's joint garment/text guidance with branches [neg|0, neg|g, pos|g]);
- `saliency_fusion`: two guided predictors mixed per pixel by whose guidance delta is more
  salient (Face-diffuser's SNF), and `two_model_fusion`, which adds its step ranges (predictor A
  alone, both fused, B alone) as `loop.Stages`, so only the predictors a step needs run.

Arrays are NHWC (B, h, w, C) float32; scales may be traced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from leffa_jax.sampling.loop import Stages

__all__ = [
    "repeat_branches",
    "interleave_branches",
    "split_branches",
    "rescale_noise_cfg",
    "guidance_delta",
    "classifier_free_guidance",
    "chain_branches",
    "nested_guidance",
    "guidance_saliency",
    "saliency_mask",
    "saliency_fusion",
    "two_model_fusion",
]

# (x_t, t, conditions) -> (guided eps, guidance delta), both (B, h, w, C)
GuidedPredictor = Callable[[jax.Array, jax.Array, object], tuple[jax.Array, jax.Array]]


# --------------------------------------------------------------------------------------------
# Branches on the batch axis
# --------------------------------------------------------------------------------------------


def repeat_branches(x: jax.Array, num_branches: int) -> jax.Array:
    """(B, ...) -> (B * n, ...): the same array for each of n branches, sample-major."""
    return jnp.repeat(x, num_branches, axis=0)


def interleave_branches(*branches: jax.Array) -> jax.Array:
    """n arrays (B_k, ...) -> (B * n, ...) sample-major [b0_0, b1_0, ..., b0_1, ...]. A branch
    with batch 1 is broadcast to B (e.g. an unconditional input shared by every sample)."""
    batch = max(b.shape[0] for b in branches)
    full = [jnp.broadcast_to(b, (batch,) + b.shape[1:]) for b in branches]
    stacked = jnp.stack(full, axis=1)
    return stacked.reshape((batch * len(branches),) + stacked.shape[2:])


def split_branches(eps: jax.Array, num_branches: int) -> tuple[jax.Array, ...]:
    """(B * n, ...) sample-major model output -> n arrays (B, ...), one per branch."""
    grouped = eps.reshape((eps.shape[0] // num_branches, num_branches) + eps.shape[1:])
    return tuple(grouped[:, k] for k in range(num_branches))


# --------------------------------------------------------------------------------------------
# Classifier-free and nested guidance
# --------------------------------------------------------------------------------------------


def rescale_noise_cfg(eps: jax.Array, eps_cond: jax.Array, phi) -> jax.Array:
    """diffusers' `rescale_noise_cfg` (arXiv 2305.08891 sec. 3.4): phi * eps * std(eps_c) /
    std(eps) + (1 - phi) * eps, std unbiased (ddof=1) over all non-batch axes, per sample."""
    axes = tuple(range(1, eps.ndim))
    std_cond = jnp.std(eps_cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(eps, axis=axes, keepdims=True, ddof=1)
    return phi * (eps * (std_cond / std_guided)) + (1 - phi) * eps


def guidance_delta(eps_uncond: jax.Array, eps_cond: jax.Array, scale) -> jax.Array:
    """s (eps_c - eps_u): what guidance adds to the unconditional prediction."""
    return scale * (eps_cond - eps_uncond)


def classifier_free_guidance(
    eps_uncond: jax.Array, eps_cond: jax.Array, scale, rescale=None
) -> jax.Array:
    """eps_u + s (eps_c - eps_u), then `rescale_noise_cfg(., eps_c, rescale)` unless `rescale`
    is None (phi; the official Leffa pipeline passes phi = s)."""
    eps = eps_uncond + guidance_delta(eps_uncond, eps_cond, scale)
    if rescale is not None:
        eps = rescale_noise_cfg(eps, eps_cond, rescale)
    return eps


def chain_branches(num_conditions: int) -> tuple[tuple[bool, ...], ...]:
    """The default branch order for `nested_guidance`: branch k has conditions 1..k on
    (k = 0..N), e.g. N = 2: ((F, F), (T, F), (T, T))."""
    n = num_conditions
    return tuple(tuple(j < k for j in range(n)) for k in range(n + 1))


def nested_guidance(
    branch_eps: Sequence[jax.Array],
    scales: Sequence,
    active: Sequence[Sequence[bool]] | None = None,
) -> jax.Array:
    """Nested guidance over N conditions c_1..c_N (in nesting order), one scale each:

        eps = e(none) + sum_k s_k [e(c_1..c_k) - e(c_1..c_{k-1})]

    branch_eps: one prediction (B, ...) per branch, in the order the system ran them;
    active[b][k]: whether branch b has condition k on (default `chain_branches(N)`). Each prefix
    set {c_1..c_k} must be one of the branches; other branches are ignored. Magic Clothing
    (garment first, then text): branches [neg|0, neg|g, pos|g] are active ((F, F), (T, F),
    (T, T)) with scales (s_garment, s_text). N = 1 is classifier-free guidance. The terms are
    added from k = N down to 1, the order of the official expressions.
    """
    n = len(scales)
    active = chain_branches(n) if active is None else tuple(tuple(map(bool, a)) for a in active)
    if len(active) != len(branch_eps) or any(len(a) != n for a in active):
        raise ValueError(
            f"nested_guidance: {len(branch_eps)} branches, {n} scales: `active` must hold one "
            f"row of {n} flags per branch, got {active}"
        )
    index = []
    for k in range(n + 1):
        prefix = tuple(j < k for j in range(n))
        if prefix not in active:
            raise ValueError(
                f"nested_guidance: no branch has exactly conditions 1..{k} on {prefix}; "
                f"branches: {active}"
            )
        index.append(active.index(prefix))
    eps = branch_eps[index[0]]
    for k in range(n, 0, -1):
        eps = eps + scales[k - 1] * (branch_eps[index[k]] - branch_eps[index[k - 1]])
    return eps


# --------------------------------------------------------------------------------------------
# Per-pixel fusion of two guided predictors (Face-diffuser's saliency-adaptive noise fusion)
# --------------------------------------------------------------------------------------------


def guidance_saliency(delta: jax.Array) -> jax.Array:
    """(B, h, w, C) guidance delta -> (B, h, w, 1) saliency before the softmax: |delta| average
    pooled (4x4 window, stride 1, zero padding 1 counted: (h - 1, w - 1)), resized back to
    (h, w) bilinearly (half-pixel centres), then the channel mean."""
    b, h, w, c = delta.shape
    pooled = jax.lax.reduce_window(
        jnp.abs(delta), 0.0, jax.lax.add, (1, 4, 4, 1), (1, 1, 1, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    ) / 16.0
    resized = jax.image.resize(pooled, (b, h, w, c), "linear")
    return jnp.mean(resized, axis=-1, keepdims=True)


def saliency_mask(delta_a: jax.Array, delta_b: jax.Array) -> jax.Array:
    """(B, h, w, 1) bool, True where predictor b wins: each saliency map goes through a softmax
    over the h * w positions of its own sample, then argmax over [a, b] (a tie goes to a)."""

    def softmax_positions(s):
        flat = s.reshape(s.shape[0], -1)
        return jax.nn.softmax(flat, axis=-1).reshape(s.shape)

    return softmax_positions(guidance_saliency(delta_b)) > softmax_positions(
        guidance_saliency(delta_a)
    )


def saliency_fusion(
    eps_a: jax.Array, delta_a: jax.Array, eps_b: jax.Array, delta_b: jax.Array
) -> jax.Array:
    """Per-pixel choice between two guided predictions (B, h, w, C): b's where its guidance
    delta is the more salient (`saliency_mask`, the same for every channel), else a's."""
    return jnp.where(saliency_mask(delta_a, delta_b), eps_b, eps_a)


def two_model_fusion(
    predict_a: GuidedPredictor, predict_b: GuidedPredictor, a_only_until: int, fused_until: int
) -> Stages:
    """Face-diffuser's three stages as a noise function for `loop.denoise`: loop steps
    i <= a_only_until run predictor A alone, a_only_until < i <= fused_until run both and fuse
    them (`saliency_fusion`), later steps run B alone (start_merge_step s1, final_step s2).
    predict_*(x_t, t, conditions) -> (guided eps, guidance delta); both get the same
    conditions (e.g. a tuple, each taking its part)."""
    if not 0 <= a_only_until <= fused_until:
        raise ValueError(
            f"two_model_fusion: need 0 <= a_only_until <= fused_until, got {a_only_until}, "
            f"{fused_until}"
        )

    def a_only(x_t, t, conditions):
        return predict_a(x_t, t, conditions)[0]

    def fused(x_t, t, conditions):
        return saliency_fusion(*predict_a(x_t, t, conditions), *predict_b(x_t, t, conditions))

    def b_only(x_t, t, conditions):
        return predict_b(x_t, t, conditions)[0]

    return Stages((0, a_only_until + 1, fused_until + 1), (a_only, fused, b_only))

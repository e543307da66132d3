"""Guidance combinators against independent references.

- diffusers' own `rescale_noise_cfg` (PyTorch) and torch re-computations of the official CFG;
- Magic Clothing's recorded official runs: per-branch predictions and the guided prediction the
  official `OmsDiffusionPipeline` computed (eps_u + sT (eps_t - eps_c) + sG (eps_c - eps_u));
- Face-diffuser's recorded official run: the SNF saliency, mask and fused prediction computed
  from the recorded TDM/SDM outputs at its stage-2 steps (fixtures/face_diffuser);
- closed forms for N = 3 nesting and for the branch layout on the batch axis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path

from leffa_jax.sampling import guidance as G
from leffa_jax.sampling.loop import Stages

torch = pytest.importorskip("torch")


def nhwc(x):
    """(..., B, C, h, w) -> (..., B, h, w, C)."""
    return np.moveaxis(np.asarray(x), -3, -1)


def test_branch_layout_round_trip():
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((3, 2, 4, 3, 5)).astype(np.float32)
    both = np.asarray(G.interleave_branches(a, b, c))
    np.testing.assert_array_equal(both, np.stack([a, b, c], axis=1).reshape(6, 4, 3, 5))
    for got, want in zip(G.split_branches(both, 3), (a, b, c), strict=True):
        np.testing.assert_array_equal(got, want)
    shared = np.asarray(G.interleave_branches(a[:1], b))  # batch-1 branch broadcast
    np.testing.assert_array_equal(shared[0::2], np.broadcast_to(a[:1], b.shape))
    np.testing.assert_array_equal(G.repeat_branches(a, 2), np.repeat(a, 2, axis=0))


def test_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    rng = np.random.default_rng(0)
    eps, cond = rng.standard_normal((2, 3, 5, 4, 4)).astype(np.float32)
    for phi in (2.5, 0.7, 0.0):
        want = rescale_noise_cfg(torch.from_numpy(eps), torch.from_numpy(cond), phi).numpy()
        np.testing.assert_allclose(G.rescale_noise_cfg(eps, cond, phi), want, rtol=1e-5,
                                   atol=1e-6)


def test_classifier_free_guidance_matches_official_leffa():
    """The official Leffa step: g = u + s (c - u); rescale_noise_cfg(g, c, phi)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    rng = np.random.default_rng(1)
    u, c = (torch.from_numpy(a) for a in rng.standard_normal((2, 2, 8, 6, 4)).astype(np.float32))
    for scale, phi in ((2.5, 2.5), (3.0, None), (1.0, 0.7)):
        g = u + scale * (c - u)
        want = g if phi is None else rescale_noise_cfg(g, c, phi)
        got = G.classifier_free_guidance(u.numpy(), c.numpy(), scale, phi)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("run", ["joint_default", "joint_sg1", "joint_ddim", "standard_512mode"])
def test_nested_guidance_matches_magic_clothing(run):
    """Official joint garment/text CFG, branches [neg|0, neg|g, pos|g], recorded per step."""
    d = np.load(shared_path("fixtures", "magic_clothing", f"{run}.npz"))
    names = [str(n) for n in d["branch_names"]]
    branches = [nhwc(d[f"noise_pred_{n}"]) for n in names]
    want = nhwc(d["noise_pred_guided"])
    if names == ["uncond", "cloth", "text"]:
        scales = (float(d["guidance_scale_cloth"]), float(d["guidance_scale_text"]))
        active = ((False, False), (True, False), (True, True))  # conditions: garment, text
    else:  # 512-weights mode: garment and text dropped together, one condition
        scales, active = (float(d["guidance_scale_text"]),), ((False,), (True,))
    got = np.asarray(G.nested_guidance(branches, scales, active))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-6 * scale, run
    # the branch order is data: permuting the branches and their rows changes nothing
    perm = list(reversed(range(len(branches))))
    got_perm = G.nested_guidance([branches[i] for i in perm], scales, [active[i] for i in perm])
    np.testing.assert_allclose(got_perm, got, rtol=1e-6, atol=1e-6 * scale)


def test_nested_guidance_three_conditions_closed_form():
    rng = np.random.default_rng(2)
    e = rng.standard_normal((4, 2, 3, 3, 4))  # float64: e(none), e(1), e(1,2), e(1,2,3)
    s = (1.5, 4.0, 0.5)
    want = e[0] + s[0] * (e[1] - e[0]) + s[1] * (e[2] - e[1]) + s[2] * (e[3] - e[2])
    got = G.nested_guidance(list(e.astype(np.float32)), s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # an extra branch (condition 3 alone) is ignored; a missing prefix is an error
    extra = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    rows = G.chain_branches(3) + ((False, False, True),)
    got2 = G.nested_guidance(list(e.astype(np.float32)) + [extra], s, rows)
    np.testing.assert_allclose(got2, got, rtol=1e-6)
    with pytest.raises(ValueError, match="no branch has exactly conditions 1..2"):
        G.nested_guidance(list(e[:2]) + [extra, e[3]], s, rows[:2] + rows[4:] + rows[3:4])


@pytest.fixture(scope="module")
def face_diffuser():
    d = np.load(shared_path("fixtures", "face_diffuser", "sampler_pndm.npz"))
    return {k: d[k] for k in d.files}


def snf_inputs(d, j):
    """Recorded TDM/SDM outputs at stage-2 step snf_iters[j] -> guided eps and deltas (NHWC)."""
    i = int(d["snf_iters"][j])
    w = float(d["guidance_scale"])
    null, text = nhwc(d["tdm_out"][list(d["tdm_iters"]).index(i)])[:, None]
    s_text, s_aug = nhwc(d["sdm_out"][list(d["sdm_iters"]).index(i)])[:, None]
    delta_t, delta_s = G.guidance_delta(null, text, w), G.guidance_delta(s_text, s_aug, w)
    return i, (null + delta_t, delta_t), (s_text + delta_s, delta_s)


def test_saliency_fusion_matches_face_diffuser(face_diffuser):
    """SNF at every stage-2 step: saliency (pre-softmax), mask (exact) and fused eps."""
    d = face_diffuser
    for j in range(len(d["snf_iters"])):
        i, (eps_t, delta_t), (eps_s, delta_s) = snf_inputs(d, j)
        for k, delta in enumerate((delta_t, delta_s)):
            want = nhwc(d["snf_saliency"][j, k])[..., :1]
            np.testing.assert_allclose(G.guidance_saliency(delta), want, rtol=1e-5, atol=1e-7)
        mask = np.asarray(G.saliency_mask(delta_t, delta_s))
        want_mask = nhwc(d["snf_mask"][j])
        assert np.all(want_mask == want_mask[..., :1])  # one choice for every channel
        mismatched = int((mask[..., 0] != want_mask[..., 0].astype(bool)).sum())
        assert mismatched == 0, f"step {i}: {mismatched} of {mask.size} pixels differ"
        assert 0.2 < mask.mean() < 0.8  # both models contribute
        fused = np.asarray(G.saliency_fusion(eps_t, delta_t, eps_s, delta_s))
        np.testing.assert_allclose(fused, nhwc(d["noise_pred"][i]), rtol=1e-5, atol=1e-5)


def test_saliency_mask_ties_go_to_first():
    delta = np.random.default_rng(3).standard_normal((1, 8, 6, 4)).astype(np.float32)
    assert not np.asarray(G.saliency_mask(delta, delta)).any()


def test_two_model_fusion_stages_run_only_what_they_need():
    """Steps <= 1: A alone; 2..3: fused; later: B alone. Each predictor reports when it runs."""
    ran = []

    def predictor(name, value):
        def predict(x_t, t, conditions):
            jax.debug.callback(lambda: ran.append(name))
            eps = x_t * 0 + value + jnp.arange(x_t.shape[1], dtype=x_t.dtype)[None, :, None, None]
            return eps, eps * (1.0 if name == "a" else 2.0) + conditions
        return predict

    stages = G.two_model_fusion(predictor("a", 1.0), predictor("b", -1.0), 1, 3)
    assert isinstance(stages, Stages) and stages.starts == (0, 2, 4)
    call = jax.jit(lambda x, step: stages(x, jnp.int32(500), 0.0, step))
    x = jnp.zeros((1, 4, 4, 2))
    for step in range(6):
        ran.clear()
        eps = np.asarray(call(x, jnp.int32(step)))
        jax.effects_barrier()
        if step <= 1:
            assert ran == ["a"] and np.all(eps == 1.0 + np.arange(4)[None, :, None, None])
        elif step <= 3:
            assert sorted(ran) == ["a", "b"]
            want = G.saliency_fusion(*predictor("a", 1.0)(x, 0, 0.0), *predictor("b", -1.0)(x, 0, 0.0))
            np.testing.assert_array_equal(eps, want)
        else:
            assert ran == ["b"] and np.all(eps == -1.0 + np.arange(4)[None, :, None, None])
    with pytest.raises(ValueError, match="a_only_until <= fused_until"):
        G.two_model_fusion(predictor("a", 1.0), predictor("b", 1.0), 3, 2)

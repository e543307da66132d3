"""leffa_jax.flow against torch (interpolate, grid_sample), closed forms, and the official
Leffa loss fixture (sd15_tiny/loss_fixture.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leffa_jax import flow as fl

torch = pytest.importorskip("torch")
F = torch.nn.functional

RNG = np.random.default_rng(1234)


def _nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


# ------------------------------------------------------------------ coordinate map, layers


def test_coordinate_map_closed_form():
    h, w = 3, 4
    c = np.asarray(fl.coordinate_map(h, w))
    assert c.shape == (12, 2)
    xs = [-1.0, -1.0 / 3, 1.0 / 3, 1.0]
    ys = [-1.0, 0.0, 1.0]
    expect = np.array([[x, y] for y in ys for x in xs], np.float32)
    np.testing.assert_allclose(c, expect, atol=1e-7)
    assert tuple(c[0]) == (-1.0, -1.0) and tuple(c[-1]) == (1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(fl.coordinate_map(1, 1)), [[-1.0, -1.0]])


def test_select_layers_sd15_1024x768():
    # SD1.5 self-attention layers in call order at a 128x96 latent (image 1024x768)
    shapes = [(128, 96)] * 2 + [(64, 48)] * 2 + [(32, 24)] * 2  # down 0-2
    shapes += [(16, 12)]  # mid
    shapes += [(32, 24)] * 3 + [(64, 48)] * 3 + [(128, 96)] * 3  # up 1-3
    sel = fl.select_layers(shapes, (1024, 768))
    assert len(shapes) == 16
    assert sel == tuple(i for i in range(16) if i != 6)
    assert len(sel) == 15
    # a 16x12 map against a 512x384 image is exactly 1/32: included (inclusive bound)
    assert fl.select_layers(shapes, (512, 384)) == tuple(range(16))
    assert fl.select_layers([(31, 24), (32, 23)], (1024, 768)) == ()


def test_layer_hw():
    assert fl.layer_hw(128 * 96, (128, 96)) == (128, 96)
    assert fl.layer_hw(16 * 12, (128, 96)) == (16, 12)
    assert fl.layer_hw(3 * 2, (9, 5)) == (3, 2)
    with pytest.raises(ValueError, match="tokens"):
        fl.layer_hw(100, (128, 96))


# ------------------------------------------------------------------ attention flow


def _qk(b, nh, n, d, m=None, scale=1.0):
    m = n if m is None else m
    q = (scale * RNG.normal(size=(b, nh, n, d))).astype(np.float32)
    k = (scale * RNG.normal(size=(b, nh, m, d))).astype(np.float32)
    return q, k


def test_attention_map_matches_numpy():
    q, k = _qk(2, 3, 20, 8)
    tau = 2.0
    s = np.einsum("bhnd,bhmd->bhnm", q.astype(np.float64), k) / (tau * np.sqrt(8))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = p.mean(1)
    np.testing.assert_allclose(np.asarray(fl.attention_map(q, k, tau)), a, atol=1e-6)
    f = np.asarray(fl.flow_from_attention(jnp.asarray(a, jnp.float32), 5, 4))
    np.testing.assert_allclose(
        f, (a @ np.asarray(fl.coordinate_map(5, 4))).reshape(2, 5, 4, 2), atol=1e-6
    )


@pytest.mark.parametrize("chunk", [None, 7, 32, 10_000])
def test_fused_flow_matches_materialised(chunk):
    b, nh, h, w, d, tau = 2, 3, 12, 10, 16, 2.0
    q, k = _qk(b, nh, h * w, d, scale=2.0)
    ct = RNG.normal(size=(b, h, w, 2)).astype(np.float32)

    def mat(q, k):
        return jnp.sum(jnp.sin(3 * fl.flow_from_attention(fl.attention_map(q, k, tau), h, w)) * ct)

    def fused(q, k):
        return jnp.sum(jnp.sin(3 * fl.flow_from_qk(q, k, h, w, tau, chunk_size=chunk)) * ct)

    fm = fl.flow_from_attention(fl.attention_map(q, k, tau), h, w)
    ff = jax.jit(lambda q, k: fl.flow_from_qk(q, k, h, w, tau, chunk_size=chunk))(q, k)
    np.testing.assert_allclose(np.asarray(ff), np.asarray(fm), atol=1e-6)
    gm = jax.grad(mat, (0, 1))(q, k)
    gf = jax.jit(jax.grad(fused, (0, 1)))(q, k)
    for a, bb in zip(gf, gm, strict=True):
        assert a.shape == bb.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(bb), atol=1e-5)


def test_fused_flow_bf16_inputs():
    h, w = 8, 6
    q, k = _qk(1, 2, h * w, 8)
    qb, kb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    ff = fl.flow_from_qk(qb, kb, h, w)
    assert ff.dtype == jnp.float32
    ref = fl.flow_from_attention(fl.attention_map(qb, kb), h, w)
    np.testing.assert_allclose(np.asarray(ff), np.asarray(ref), atol=1e-6)
    gq, gk = jax.grad(lambda a, c: fl.flow_from_qk(a, c, h, w).sum(), (0, 1))(qb, kb)
    assert gq.dtype == jnp.bfloat16 and gk.dtype == jnp.bfloat16


def test_flow_shape_errors():
    q, k = _qk(1, 2, 12, 4)
    with pytest.raises(ValueError, match="h\\*w"):
        fl.flow_from_qk(q, k, 3, 5)
    with pytest.raises(ValueError, match="k_ref"):
        fl.flow_from_qk(q, k[:, :1], 3, 4)
    with pytest.raises(ValueError, match="q must be"):
        fl.attention_map(q[0], k)


# ------------------------------------------------------------------ resampling vs torch


@pytest.mark.parametrize(
    "shape,size",
    [
        ((2, 5, 7, 3), (13, 9)),
        ((1, 4, 3, 2), (32, 24)),
        ((2, 6, 6, 1), (4, 3)),
        ((1, 3, 3, 2), (3, 3)),
    ],
)
def test_upsample_bilinear_matches_torch(shape, size):
    x = RNG.normal(size=shape).astype(np.float32)
    xt = torch.tensor(_nchw(x), requires_grad=True)
    yt = F.interpolate(xt, size=size, mode="bilinear", align_corners=False)
    ct = RNG.normal(size=yt.shape).astype(np.float32)
    (yt * torch.tensor(ct)).sum().backward()
    y, vjp = jax.vjp(lambda a: fl.upsample_bilinear(a, *size), x)
    np.testing.assert_allclose(np.asarray(y), _nhwc(yt.detach().numpy()), atol=1e-5)
    (g,) = vjp(jnp.asarray(_nhwc(ct)))
    np.testing.assert_allclose(np.asarray(g), _nhwc(xt.grad.numpy()), atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("img_hw,out_hw", [((6, 5), (4, 7)), ((9, 4), (9, 4)), ((3, 8), (10, 2))])
def test_grid_sample_matches_torch(align_corners, img_hw, out_hw):
    b, c = 2, 3
    img = RNG.normal(size=(b, *img_hw, c)).astype(np.float32)
    # many coordinates outside [-1, 1], some exactly on pixel centres / edges
    grid = RNG.uniform(-1.5, 1.5, size=(b, *out_hw, 2)).astype(np.float32)
    grid[0, 0, 0] = [-1.0, -1.0]
    grid[0, 0, 1] = [1.0, 1.0]
    grid[1, 0, 0] = [0.0, 0.0]
    it = torch.tensor(_nchw(img), requires_grad=True)
    gt = torch.tensor(grid, requires_grad=True)
    yt = F.grid_sample(it, gt, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    ct = RNG.normal(size=yt.shape).astype(np.float32)
    (yt * torch.tensor(ct)).sum().backward()
    y, vjp = jax.vjp(lambda a, g: fl.grid_sample(a, g, align_corners=align_corners), img, grid)
    np.testing.assert_allclose(np.asarray(y), _nhwc(yt.detach().numpy()), atol=1e-5)
    gi, gg = vjp(jnp.asarray(_nhwc(ct)))
    np.testing.assert_allclose(np.asarray(gi), _nhwc(it.grad.numpy()), atol=1e-5)
    np.testing.assert_allclose(np.asarray(gg), gt.grad.numpy(), atol=2e-5, rtol=1e-5)


def test_grid_sample_identity_align_corners():
    img = RNG.normal(size=(1, 5, 4, 2)).astype(np.float32)
    for ac in (False, True):
        if ac:
            ys, xs = np.linspace(-1, 1, 5), np.linspace(-1, 1, 4)
        else:
            ys, xs = (np.arange(5) * 2 + 1) / 5 - 1, (np.arange(4) * 2 + 1) / 4 - 1
        grid = np.stack(np.meshgrid(xs, ys), -1)[None].astype(np.float32)
        np.testing.assert_allclose(np.asarray(fl.grid_sample(img, grid, ac)), img, atol=1e-6)


def test_grid_sample_errors():
    with pytest.raises(ValueError, match="grid must be"):
        fl.grid_sample(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="image must be"):
        fl.grid_sample(np.zeros((4, 4, 3)), np.zeros((1, 4, 4, 2)))


def test_layer_loss_closed_form():
    w = np.zeros((1, 2, 2, 1), np.float32)
    t = np.array([0.5, 3.0, -2.0, 9.0], np.float32).reshape(1, 2, 2, 1)
    m = np.array([1, 1, 1, 0], np.float32).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(fl.layer_loss(w, t, m), [(0.125 + 2.5 + 1.5) / 4], rtol=1e-6)
    np.testing.assert_allclose(fl.layer_loss(w, t, m, "l2"), [(0.25 + 9 + 4) / 4], rtol=1e-6)


# ------------------------------------------------------------------ official loss fixture


@pytest.fixture(scope="module")
def loss_fx():
    from conftest import shared_path

    return dict(np.load(shared_path("fixtures", "leffa_official", "sd15_tiny", "loss_fixture.npz")))


def _fixture_layers(fx):
    h0, w0 = fx["ref_latent"].shape[2:]
    out = []
    for i in range(len(fx["layer_names"])):
        q, k = fx[f"q_{i:02d}"], fx[f"k_{i:02d}"]
        h, w = fl.layer_hw(q.shape[2] // 2, (h0, w0))
        out.append((q, k, h, w))
    return out


def _flow_from_concatenated(q, k, h, w, tau=2.0, *, fused=True, chunk_size=None):
    """The fixture's q, k are the generative self-attention's (B, heads, 2N, d) over tokens
    [generated | reference]: queries of the generated half against keys of the reference half."""
    n = h * w
    q_gen, k_ref = q[:, :, :n], k[:, :, n:]
    if fused:
        return fl.flow_from_qk(q_gen, k_ref, h, w, tau, chunk_size=chunk_size)
    return fl.flow_from_attention(fl.attention_map(q_gen, k_ref, tau), h, w)


def test_loss_fixture_flows_and_layer_losses(loss_fx):
    fx = loss_fx
    tau = float(fx["tau"])
    img, ref, mask = (_nhwc(fx[k]) for k in ("image", "ref_image", "mask"))
    hh, ww = img.shape[1:3]
    layers = _fixture_layers(fx)
    # the tiny UNet: 16x12 for down 0 / up 1, 8x6 for the mid block
    assert [(h, w) for _, _, h, w in layers] == [(16, 12), (8, 6), (16, 12), (16, 12)]
    for i, (q, k, h, w) in enumerate(layers):
        for fused in (True, False):
            f = _flow_from_concatenated(q, k, h, w, tau, fused=fused, chunk_size=64)
            grid = fl.flow_to_image_size(f, hh, ww)
            np.testing.assert_allclose(np.asarray(grid), fx[f"flow_{i:02d}"], atol=1e-4)
        ll = fl.layer_loss(fl.warp(ref, grid), img, mask, "smooth_l1")
        np.testing.assert_allclose(np.asarray(ll), fx[f"layer_loss_{i:02d}"], rtol=1e-4, atol=1e-7)


def test_loss_fixture_totals(loss_fx):
    fx = loss_fx
    tau, lam, thr = float(fx["tau"]), float(fx["lam"]), int(fx["t_thr"])
    img, ref, mask = (_nhwc(fx[k]) for k in ("image", "ref_image", "mask"))
    ts = fx["timesteps"]

    layers = _fixture_layers(fx)

    @jax.jit
    def total_smooth_l1(qks):
        flows = [
            _flow_from_concatenated(q, k, h, w, tau)
            for (q, k), (_, _, h, w) in zip(qks, layers, strict=True)
        ]
        return fl.leffa_loss(flows, ref, img, mask, ts, lam=lam, t_threshold=thr, kind="smooth_l1")

    @jax.jit
    def total_l2(qks):
        flows = [
            _flow_from_concatenated(q, k, h, w, tau)
            for (q, k), (_, _, h, w) in zip(qks, layers, strict=True)
        ]
        return fl.leffa_loss(flows, ref, img, mask, ts, lam=lam, t_threshold=thr, kind="l2")

    qks = [(q, k) for q, k, _, _ in layers]
    np.testing.assert_allclose(float(total_smooth_l1(qks)), float(fx["leffa_loss"]), rtol=1e-4)
    np.testing.assert_allclose(float(total_l2(qks)), float(fx["leffa_loss_mse"]), rtol=1e-4)
    # image-size (already clipped) fixture flows pass through unchanged
    flows = [fx[f"flow_{i:02d}"] for i in range(len(layers))]
    got = fl.leffa_loss(flows, ref, img, mask, ts, lam=lam, t_threshold=thr)
    np.testing.assert_allclose(float(got), float(fx["leffa_loss"]), rtol=1e-4)
    # the gate: only sample 0 (t=200) counts, divided by the full batch of 2
    per_layer = np.stack([fx[f"layer_loss_{i:02d}"] for i in range(len(layers))])
    assert list(ts) == [200, 700]
    np.testing.assert_allclose(float(fx["leffa_loss"]), lam * per_layer.mean(0)[0] / 2, rtol=1e-5)


def test_leffa_loss_gradients_flow_to_qk(loss_fx):
    fx = loss_fx
    img, ref, mask = (_nhwc(fx[k]) for k in ("image", "ref_image", "mask"))
    q, k, h, w = _fixture_layers(fx)[0]
    ts = np.array([100, 100])

    def loss(q, k, fused):
        f = _flow_from_concatenated(q, k, h, w, 2.0, fused=fused)
        return fl.leffa_loss([f], ref, img, mask, ts)

    gf = jax.grad(loss, (0, 1))(q, k, True)
    gm = jax.grad(loss, (0, 1))(q, k, False)
    for a, b in zip(gf, gm, strict=True):
        assert float(jnp.abs(a).max()) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9, rtol=1e-4)
    # a fully gated batch gives zero loss and zero gradient
    z = jax.grad(
        lambda q: fl.leffa_loss(
            [fl.flow_from_qk(q[:, :, : h * w], k[:, :, h * w :], h, w)],
            ref,
            img,
            mask,
            np.array([600, 900]),
        )
    )(q)
    assert float(jnp.abs(z).max()) == 0.0

"""Attention extension points vs PyTorch/diffusers computed here: decoupled image-prompt
cross-attention (diffusers `IPAdapterAttnProcessor2_0`), LoRA (diffusers `LoRACompatibleLinear` +
`LoRALinearLayer`, and the plain torch formula), SDXL's text_time added conditioning, the
cross-attention probes and the key-range attention-mass probe (numpy softmax)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from torch_reference import diffusers, nchw, nhwc, perturb_, state_dict_numpy, torch

from leffa_jax.convert import torch_to_flax_leaf
from leffa_jax.nn import lora
from leffa_jax.nn.attention import Attention
from leffa_jax.nn.config import UNetConfig
from leffa_jax.nn.unet import UNet
from leffa_jax.objectives import attention_probability_probe, key_group_mass, key_mass_probe

_processors = pytest.importorskip("diffusers.models.attention_processor")
_diffusers_lora = pytest.importorskip("diffusers.models.lora")
IPAdapterProcessor = _processors.IPAdapterAttnProcessor2_0
TorchAttention = _processors.Attention
LoRACompatibleLinear = _diffusers_lora.LoRACompatibleLinear
LoRALinearLayer = _diffusers_lora.LoRALinearLayer

TEXT_EMBED_DIM, TIME_DIM, CONTEXT_DIM = 12, 8, 16
SDXL_TINY = dict(  # SDXL topology in miniature: text_time, linear projections, 2-layer blocks
    block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1,
    transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], norm_num_groups=8,
    cross_attention_dim=CONTEXT_DIM, in_channels=4, out_channels=4, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=TEXT_EMBED_DIM + 6 * TIME_DIM)
IP_TOKENS, IP_SCALE, RANK, ALPHA = 3, 0.7, 2, 4.0
IP_GROUPS = ((0, 1), (1, None))  # "background" token, "character" tokens


def _lora_linear(base: torch.nn.Linear) -> LoRACompatibleLinear:
    lin = LoRACompatibleLinear(base.in_features, base.out_features, bias=base.bias is not None)
    lin.load_state_dict(base.state_dict())
    lin.set_lora_layer(LoRALinearLayer(base.in_features, base.out_features, RANK, ALPHA))
    return lin


def _torch_storymaker_like_unet():
    """diffusers UNet; every attn2 an IP-Adapter processor; LoRA on q/k/v/out of attn1 and attn2."""
    torch.manual_seed(0)
    tu = diffusers.UNet2DConditionModel(**SDXL_TINY).eval()
    for name, m in tu.named_modules():
        if not isinstance(m, TorchAttention):
            continue
        if name.endswith("attn2"):
            m.set_processor(IPAdapterProcessor(m.to_q.out_features, m.to_k.in_features,
                                               num_tokens=(IP_TOKENS,), scale=IP_SCALE))
        m.to_q, m.to_k, m.to_v = _lora_linear(m.to_q), _lora_linear(m.to_k), _lora_linear(m.to_v)
        m.to_out[0] = _lora_linear(m.to_out[0])
    perturb_(tu)  # LoRA `up` and everything else off its init
    return tu


def _load_flat(module, flat):
    graphdef, state = nnx.split(module)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
    assert paths == set(flat), (sorted(paths - set(flat))[:5], sorted(set(flat) - paths)[:5])
    nested = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = [int(p) if p.isdigit() else p for p in key.split(".")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    nnx.replace_by_pure_dict(state, nested)
    nnx.update(module, state)


@pytest.fixture(scope="module")
def storymaker_like(tmp_path_factory):
    tu = _torch_storymaker_like_unet()
    folder = tmp_path_factory.mktemp("sdxl_tiny")
    (folder / "config.json").write_text(json.dumps(SDXL_TINY))
    cfg = UNetConfig.from_json(folder, image_prompt_dim=CONTEXT_DIM)

    def build():  # abstract (eval_shape): every parameter comes from the torch model
        unet = UNet(cfg, rngs=nnx.Rngs(0))
        paths = lora.apply_lora(unet, lora.ATTENTION_PROJECTIONS, RANK, alpha=ALPHA,
                                rngs=nnx.Rngs(1))
        assert len(paths) == 4 * 2 * unet.num_transformer_layers
        return unet

    fu = nnx.eval_shape(build)
    flat = dict(torch_to_flax_leaf(k.replace("processor.to_k_ip.0.", "to_k_ip.")
                                   .replace("processor.to_v_ip.0.", "to_v_ip."), v)
                for k, v in state_dict_numpy(tu).items())
    _load_flat(fu, flat)
    rng = np.random.default_rng(1)
    inputs = dict(
        x=rng.standard_normal((2, 4, 8, 6)).astype(np.float32), t=np.array([10, 700]),
        text=rng.standard_normal((2, 5, CONTEXT_DIM)).astype(np.float32),
        ip=rng.standard_normal((2, IP_TOKENS, CONTEXT_DIM)).astype(np.float32),
        text_embeds=rng.standard_normal((2, TEXT_EMBED_DIM)).astype(np.float32),
        time_ids=np.array([[64, 48, 0, 0, 64, 48], [60, 40, 2, 4, 64, 48]], np.float32))
    return tu, fu, inputs


def _torch_forward(tu, inputs, capture=None):
    """eps (NCHW numpy); `capture` collects (attn2 module, its query input) in call order."""
    hooks = []
    if capture is not None:
        for m in tu.modules():
            if isinstance(m, TorchAttention) and isinstance(m.processor, IPAdapterProcessor):
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, args, kwargs: capture.append((mod, args[0])), with_kwargs=True))
    ctx = torch.from_numpy(np.concatenate([inputs["text"], inputs["ip"]], axis=1))
    try:
        with torch.no_grad():
            return tu(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["t"]),
                      encoder_hidden_states=ctx,
                      added_cond_kwargs={"text_embeds": torch.from_numpy(inputs["text_embeds"]),
                                         "time_ids": torch.from_numpy(inputs["time_ids"])}
                      ).sample.numpy()
    finally:
        for h in hooks:
            h.remove()


def _flax_forward(fu, inputs, **kwargs):
    return fu(jnp.asarray(nhwc(inputs["x"])), jnp.asarray(inputs["t"]), jnp.asarray(inputs["text"]),
              image_prompt_tokens=jnp.asarray(inputs["ip"]), image_prompt_scale=IP_SCALE,
              text_embeds=jnp.asarray(inputs["text_embeds"]),
              time_ids=jnp.asarray(inputs["time_ids"]), **kwargs)


def _set_torch_lora(tu, enabled: bool, saved: dict):
    for m in tu.modules():
        if isinstance(m, LoRACompatibleLinear):
            if enabled:
                m.lora_layer = saved.pop(m)
            else:
                saved[m], m.lora_layer = m.lora_layer, None


def test_image_prompt_and_text_time_match_diffusers(storymaker_like):
    """IP-Adapter processors + SDXL add_embedding, LoRA off (scale 0) on both sides."""
    tu, fu, inputs = storymaker_like
    saved = {}
    _set_torch_lora(tu, False, saved)
    try:
        want = _torch_forward(tu, inputs)
    finally:
        _set_torch_lora(tu, True, saved)
    lora.set_lora_scale(fu, 0.0)
    try:
        got = _flax_forward(fu, inputs).sample
    finally:
        lora.set_lora_scale(fu, 1.0, alpha=ALPHA)
    err = np.abs(nchw(got) - want).max()
    assert err <= 1e-4, f"image prompt + text_time: max abs error {err}"
    without_ip = fu(jnp.asarray(nhwc(inputs["x"])), jnp.asarray(inputs["t"]),
                    jnp.asarray(inputs["text"]), text_embeds=jnp.asarray(inputs["text_embeds"]),
                    time_ids=jnp.asarray(inputs["time_ids"])).sample
    assert np.abs(np.asarray(without_ip) - np.asarray(got)).max() > 1e-3  # the IP branch matters


def test_lora_unet_and_probes_match_torch(storymaker_like):
    """LoRA everywhere + IP + text_time vs diffusers, and the text / image-prompt probes vs the
    softmax of torch's own projections of the captured attn2 inputs."""
    tu, fu, inputs = storymaker_like
    captured = []
    want = _torch_forward(tu, inputs, capture=captured)
    text_probe = attention_probability_probe(branch="text")
    mass_probe = key_mass_probe(IP_GROUPS, branch="image_prompt", chunk_size=16)

    def probe(site, q, k, hw):
        out = text_probe(site, q, k, hw)
        return out if out is not None else mass_probe(site, q, k, hw)

    out = _flax_forward(fu, inputs, attention_probe=probe)
    err = np.abs(nchw(out.sample) - want).max()
    assert err <= 1e-4, f"LoRA + image prompt: max abs error {err}"
    assert len(captured) == fu.num_transformer_layers
    text, ip = torch.from_numpy(inputs["text"]), torch.from_numpy(inputs["ip"])
    resolutions = fu.layer_resolutions((8, 6))
    worst = 0.0
    for layer, (m, hidden) in enumerate(captured):
        with torch.no_grad():
            q = m.to_q(hidden)
            keys = {"text": m.to_k(text), "image_prompt": m.processor.to_k_ip[0](ip)}
        for branch, k in keys.items():
            b, n, c = q.shape
            qh = q.numpy().astype(np.float64).reshape(b, n, m.heads, -1).transpose(0, 2, 1, 3)
            kh = k.numpy().astype(np.float64).reshape(b, k.shape[1], m.heads, -1).transpose(0, 2, 1, 3)
            logits = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(qh.shape[-1])
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs = (probs / probs.sum(-1, keepdims=True)).mean(1)  # (B, N, M)
            if branch == "text":
                ref, got = probs, np.asarray(out.attention_probes[layer, "text"])
            else:
                ref = np.stack([probs[..., slice(*g)].sum(-1) for g in IP_GROUPS], -1)
                ref = ref.reshape(b, *resolutions[layer], len(IP_GROUPS))
                got = np.asarray(out.attention_probes[layer, "image_prompt"])
            assert got.shape == ref.shape
            worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= 1e-5, f"probe max abs error {worst}"


def test_decoupled_attention_matches_diffusers_ip_processor():
    """Attention(x, ip_tokens=r): self-attention + scale * attention over to_k_ip/to_v_ip(r),
    the IP-Adapter processor with encoder_hidden_states = [x; r] (Magic Clothing "stable")."""
    dim, heads, m_tokens = 8, 2, 6
    torch.manual_seed(0)
    ta = TorchAttention(dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True)
    ta.set_processor(IPAdapterProcessor(dim, dim, num_tokens=(m_tokens,), scale=0.6))
    perturb_(ta)
    fa = Attention(dim, heads, ip_dim=dim, rngs=nnx.Rngs(0))
    flat = {k.replace("processor.", "").replace("_ip.0.", "_ip."): v
            for k, v in state_dict_numpy(ta).items()}
    _load_flat(fa, dict(torch_to_flax_leaf(k, v) for k, v in flat.items()))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, dim)).astype(np.float32)
    r = rng.standard_normal((2, m_tokens, dim)).astype(np.float32)
    with torch.no_grad():
        want = ta(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(
            np.concatenate([x, r], axis=1))).numpy()
    got = fa(jnp.asarray(x), ip_tokens=jnp.asarray(r), ip_scale=0.6)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5


def test_lora_linear_matches_torch_merge_unmerge_and_trainable_filter():
    fa = Attention(6, 2, 5, rngs=nnx.Rngs(0))
    paths = lora.apply_lora(fa, r"^(to_q|to_out\.0)$", 3, lora_scale=0.8, alpha=1.5,
                            rngs=nnx.Rngs(1))
    assert paths == ["to_out.0", "to_q"]
    with pytest.raises(ValueError, match="already has a LoRA"):
        lora.apply_lora(fa, "to_q", 3, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="no Linear"):
        lora.apply_lora(fa, "nothing_here", 3, rngs=nnx.Rngs(1))
    linear = fa.to_out[0]
    rng = np.random.default_rng(0)
    for _, layer in lora.lora_layers(fa):  # `up` starts at zero; move it
        layer.up.kernel[...] = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    got = np.asarray(linear(jnp.asarray(x)))

    ref = LoRACompatibleLinear(6, 6)
    ref.set_lora_layer(LoRALinearLayer(6, 6, 3, network_alpha=1.5))
    with torch.no_grad():
        for dst, src in ((ref.weight, linear.kernel), (ref.lora_layer.down.weight,
                         linear.lora_layer.down.kernel), (ref.lora_layer.up.weight,
                         linear.lora_layer.up.kernel)):
            dst.copy_(torch.from_numpy(np.array(src[...]).T))
        ref.bias.copy_(torch.from_numpy(np.array(linear.bias[...])))
        tx = torch.from_numpy(x)
        want_diffusers = ref(tx, scale=0.8).numpy()
        plain = torch.nn.functional.linear(tx, ref.weight, ref.bias)
        want_formula = (plain + 0.8 * (1.5 / 3) * ref.lora_layer.up(ref.lora_layer.down(tx))).numpy()
    assert np.abs(got - want_diffusers).max() <= 1e-5
    assert np.abs(got - want_formula).max() <= 1e-5

    original = np.asarray(linear.kernel[...]).copy()
    assert lora.merge_lora(fa) == 2 and linear.lora_layer.merged
    assert np.abs(np.asarray(linear(jnp.asarray(x))) - got).max() <= 1e-5
    assert lora.unmerge_lora(fa) == 2 and not linear.lora_layer.merged
    assert np.array_equal(np.asarray(linear.kernel[...]), original)  # exact restore
    assert np.array_equal(np.asarray(linear(jnp.asarray(x))), got)

    trainable, _ = nnx.state(fa, lora.LoRAParam, ...)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert names == {f"{p}.lora_layer.{f}.kernel" for p in paths for f in ("down", "up")}
    params = nnx.to_pure_dict(nnx.state(fa, nnx.Param))
    tx = optax.masked(optax.sgd(1.0), lora.lora_mask(params))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    changed = {k for k, v in _flat(updates).items() if np.any(np.asarray(v) != 1.0)}
    assert changed == names  # masked-out leaves pass through optax.masked untouched

    opt = nnx.Optimizer(fa, optax.sgd(0.1), wrt=lora.LoRAParam)
    before = _flat(nnx.to_pure_dict(nnx.state(fa, nnx.Param)))
    inputs = (jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32),
              jnp.asarray(rng.standard_normal((2, 4, 5)), jnp.float32))
    grads = nnx.grad(lambda model: jnp.sum(model(*inputs) ** 2),
                     argnums=nnx.DiffState(0, lora.LoRAParam))(fa)
    opt.update(fa, grads)
    after = _flat(nnx.to_pure_dict(nnx.state(fa, nnx.Param)))
    assert {k for k in after if not np.array_equal(after[k], before[k])} == names


def _flat(tree) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(str(getattr(p, "key", p)) for p in path): np.asarray(v) for path, v in leaves}


def test_key_group_mass_matches_numpy_softmax():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 37, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, 50, 8)).astype(np.float32)
    groups = ((0, 20), (20, 45), (45, None), (-5, None))
    logits = np.einsum("bhnd,bhmd->bhnm", q.astype(np.float64), k) / (2.0 * np.sqrt(8))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.stack([probs[..., slice(*g)].sum(-1) for g in groups], -1).mean(1)
    got = key_group_mass(jnp.asarray(q), jnp.asarray(k), groups, tau=2.0, chunk_size=8)
    assert got.shape == (2, 37, 4)
    assert np.abs(np.asarray(got) - want).max() <= 1e-6

    weights = jnp.asarray(rng.standard_normal((2, 37, 4)), jnp.float32)

    def materialised(q, k):
        p = jax.nn.softmax(jnp.einsum("bhnd,bhmd->bhnm", q, k) / (2.0 * np.sqrt(8)), axis=-1)
        mass = jnp.stack([p[..., slice(*g)].sum(-1) for g in groups], -1).mean(1)
        return jnp.sum(mass * weights)

    chunked = lambda q, k: jnp.sum(key_group_mass(q, k, groups, 2.0, chunk_size=8) * weights)
    g_want = jax.grad(materialised, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(k))
    g_got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(jnp.asarray(q), jnp.asarray(k))
    for a, b in zip(g_got, g_want, strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
    with pytest.raises(ValueError, match="empty"):
        key_group_mass(jnp.asarray(q), jnp.asarray(k), ((50, None),))


def _random_unet(cfg: UNetConfig) -> UNet:
    """A UNet with N(0, 0.1) parameters, built without running the initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), state)
    return nnx.merge(graphdef, state)


def test_reference_probes_and_decoupled_reference(storymaker_like):
    """Appended reference tokens: the self-attention site reports them and the flow probe sees
    exactly their keys; decoupled reference attention with scale 0 is plain self-attention."""
    _, unet, inputs = storymaker_like
    x = jnp.asarray(nhwc(inputs["x"]))
    feats = unet(x, 3, collect_features=True).features
    seen = {}

    def flow(index, q, k_ref, hw):
        seen[index, "flow"] = k_ref.shape
        return None

    def sites(site, q, k, hw):
        seen[site.layer_index, site.branch] = (site.num_extra_keys, k.shape[2], hw)
        return None

    unet(x, 5, reference_features=feats, probe=flow, attention_probe=sites)
    for i, f in enumerate(feats):
        n = f.shape[1]
        assert seen[i, "self"][:2] == (n, 2 * n) and seen[i, "flow"][2] == n

    cfg = dataclasses.replace(unet.config, image_prompt_dim=None, decoupled_reference=True)
    decoupled = _random_unet(cfg)
    assert decoupled.mid_block.attentions[0].transformer_blocks[0].attn1.to_k_ip is not None
    plain = decoupled(x, 5).sample
    off = decoupled(x, 5, reference_features=feats, reference_scale=0.0, probe=flow).sample
    on = decoupled(x, 5, reference_features=feats, reference_scale=1.0).sample
    assert np.array_equal(np.asarray(off), np.asarray(plain))
    assert np.abs(np.asarray(on) - np.asarray(plain)).max() > 1e-4
    with pytest.raises(ValueError, match="image_prompt_dim"):
        decoupled(x, 5, jnp.ones((2, 2, 16)), image_prompt_tokens=jnp.ones((2, 2, 16)))
    with pytest.raises(ValueError, match="need a text context"):
        unet(x, 5, image_prompt_tokens=jnp.ones((2, 2, 16)))
    with pytest.raises(ValueError, match="both text_embeds and time_ids"):
        unet(x, 5, text_embeds=jnp.ones((2, TEXT_EMBED_DIM)))


@pytest.mark.parametrize("nq", [2048, 1031])  # 4 blocks of 512; a prime: one block
def test_chunked_kernel_matches_torch_sdpa(nq):
    """The "chunked" kernel (query blocks in a lax.map) against torch's
    scaled_dot_product_attention: outputs and gradients w.r.t. q, k, v."""
    import torch

    from leffa_jax.nn.attention import multihead_attention, query_chunk

    assert query_chunk(2048) == 512 and query_chunk(1031) == 1
    rng = np.random.default_rng(0)
    b, nk, heads, d = 2, 300, 4, 8
    q, k, v = (rng.normal(size=(b, n, heads * d)).astype(np.float32) for n in (nq, nk, nk))
    g = rng.normal(size=(b, nq, heads * d)).astype(np.float32)

    def loss(q, k, v):
        return jnp.sum(multihead_attention(q, k, v, heads, "chunked") * g)

    out = multihead_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), heads, "chunked")
    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))

    def heads_first(x):
        return x.reshape(b, -1, heads, d).transpose(1, 2)

    ref = torch.nn.functional.scaled_dot_product_attention(heads_first(tq), heads_first(tk),
                                                           heads_first(tv))
    ref = ref.transpose(1, 2).reshape(b, nq, heads * d)
    (ref * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=2e-6)
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad), strict=True):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-5, rtol=1e-5)

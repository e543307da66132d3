"""CLIP text / vision encoders vs transformers computed in the test (random, perturbed weights).

Tiny configs to <= 1e-5; the real sizes of SD1.5 / SDXL / IP-Adapter encoders once each (slow)
to <= 1e-4; the official Magic Clothing text embeddings; config strictness; weights both ways.
"""

import gc
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from flax import nnx
from safetensors.numpy import load_file

from leffa_jax.nn import clip
from leffa_jax.nn.clip_config import CLIPTextConfig, CLIPVisionConfig
from leffa_jax.nn.config import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4}


def _perturb(model, seed, scale=0.05, only_vectors=False):
    """Add scale * N(0, 1) to every parameter (or only to biases / norms: cheap at full size)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not only_vectors or p.ndim == 1:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def _to_jax(torch_model, jax_cls, config):
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return clip.clip_from_params(jax_cls, config, clip.clip_params_from_torch(state, jax_cls))


def _forward(model, *args, **kwargs):
    """model(*args, **kwargs) under one jit (one compile instead of an eager compile per op)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


def _max_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want.detach().numpy()).max())


def _summary(errs):
    hidden = max(v for k, v in errs.items() if k.startswith("hidden_states"))
    return {**{k: f"{v:.2e}" for k, v in errs.items() if "[" not in k}, "hidden_states": f"{hidden:.2e}"}


def _check_text(ours, ref, tol):
    errs = {"last_hidden_state": _max_err(ours.last_hidden_state, ref.last_hidden_state)}
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states, strict=True)):
        errs[f"hidden_states[{i}]"] = _max_err(a, b)
    if getattr(ref, "pooler_output", None) is not None:
        errs["pooler_output"] = _max_err(ours.pooler_output, ref.pooler_output)
    if getattr(ref, "text_embeds", None) is not None:
        errs["text_embeds"] = _max_err(ours.text_embeds, ref.text_embeds)
    assert max(errs.values()) <= tol, errs
    return errs


def _check_vision(ours, ref, tol):
    errs = {"last_hidden_state": _max_err(ours.last_hidden_state, ref.last_hidden_state)}
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states, strict=True)):
        errs[f"hidden_states[{i}]"] = _max_err(a, b)
    if getattr(ref, "pooler_output", None) is not None:
        errs["pooler_output"] = _max_err(ours.pooler_output, ref.pooler_output)
    if getattr(ref, "image_embeds", None) is not None:
        errs["image_embeds"] = _max_err(ours.image_embeds, ref.image_embeds)
    assert max(errs.values()) <= tol, errs
    return errs


# ----------------------------------------------------------------------------- tiny text

TEXT_CASES = {
    # legacy pooling (eos_token_id == 2: argmax of the ids), quick_gelu, SD1.5-like padding
    "legacy_quick_gelu": ({"hidden_act": "quick_gelu", "eos_token_id": 2}, "CLIPTextModel",
                          [[97, 5, 7, 98, 98, 98, 98], [97, 11, 3, 40, 9, 98, 98]]),
    # modern pooling (first eos), gelu, projection, SDXL-like "!" (id 0) padding after eos
    "modern_gelu_proj": ({"hidden_act": "gelu", "eos_token_id": 98, "projection_dim": 8},
                         "CLIPTextModelWithProjection",
                         [[97, 5, 7, 98, 0, 0, 0], [97, 98, 3, 4, 98, 0, 0]]),
    "modern_quick_gelu": ({"hidden_act": "quick_gelu", "eos_token_id": 98, "num_attention_heads": 2,
                           "hidden_size": 24, "layer_norm_eps": 1e-6}, "CLIPTextModel",
                          [[97, 98, 98, 98, 98, 98, 98], [97, 1, 2, 3, 4, 5, 98]]),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_tiny_text_matches_transformers(case):
    overrides, cls_name, ids = TEXT_CASES[case]
    hf_config = transformers.CLIPTextConfig(**{**TINY, "vocab_size": 99, "max_position_embeddings": 12,
                                               "bos_token_id": 97, "pad_token_id": 0, **overrides})
    torch_model = _perturb(getattr(transformers, cls_name)(hf_config), seed=len(case))
    ours = _to_jax(torch_model, clip.CLIP_MODELS[cls_name], CLIPTextConfig.from_dict(hf_config.to_dict()))
    ids = np.array(ids)
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), output_hidden_states=True)
    _check_text(_forward(ours, jnp.asarray(ids), output_hidden_states=True), ref, 1e-5)
    mask = (np.arange(ids.shape[1])[None] < np.array([[5], [6]])).astype(np.int64)
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    _check_text(_forward(ours, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True),
                ref, 1e-5)


def test_text_jit_and_saved_folder(tmp_path):
    """A folder written by transformers' save_pretrained (v5 drops `text_model.` for
    CLIPTextModel); jitted forward; bfloat16 compute runs."""
    hf_config = transformers.CLIPTextConfig(**TINY, vocab_size=99, max_position_embeddings=8,
                                            eos_token_id=98, bos_token_id=97, pad_token_id=0)
    torch_model = _perturb(transformers.CLIPTextModel(hf_config), seed=3)
    torch_model.save_pretrained(tmp_path)
    config = CLIPTextConfig.from_json(tmp_path)
    params = clip.clip_params_from_torch(load_file(tmp_path / "model.safetensors"), clip.CLIPTextModel)
    ours = clip.clip_from_params(clip.CLIPTextModel, config, params)
    ids = np.array([[97, 4, 5, 6, 98, 98]])
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids))
    assert _max_err(_forward(ours, jnp.asarray(ids)).pooler_output, ref.pooler_output) <= 1e-5
    low = _forward(ours, jnp.asarray(ids), dtype=jnp.bfloat16).last_hidden_state
    assert low.dtype == jnp.bfloat16
    assert _max_err(low, ref.last_hidden_state) <= 0.1


def test_nested_clip_config_and_round_trip():
    """A full CLIPConfig (text_config / vision_config) builds both towers; weights go back to
    the original names, shapes and values bit-exactly (float16 kept)."""
    full = transformers.CLIPConfig(text_config={**TINY, "vocab_size": 50, "max_position_embeddings": 9},
                                   vision_config={**TINY, "image_size": 28, "patch_size": 7},
                                   projection_dim=6).to_dict()
    text, vision = CLIPTextConfig.from_dict(full), CLIPVisionConfig.from_dict(full)
    assert (text.vocab_size, text.max_position_embeddings, vision.image_size) == (50, 9, 28)
    torch_model = _perturb(transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**TINY, image_size=28, patch_size=7, projection_dim=6)), seed=4)
    state = {k: v.detach().numpy().astype(np.float16) for k, v in torch_model.state_dict().items()}
    ours = clip.clip_from_params(clip.CLIPVisionModelWithProjection, vision,
                                 clip.clip_params_from_torch(state, clip.CLIPVisionModelWithProjection))
    back = clip.clip_params_to_torch(ours)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == np.float16 and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


# ----------------------------------------------------------------------------- tiny vision

VISION_CASES = {
    "quick_gelu": ({"hidden_act": "quick_gelu", "image_size": 30, "patch_size": 10}, "CLIPVisionModel"),
    "gelu_proj": ({"hidden_act": "gelu", "image_size": 28, "patch_size": 7, "projection_dim": 8},
                  "CLIPVisionModelWithProjection"),
    "wide_patch": ({"hidden_act": "gelu", "image_size": 32, "patch_size": 16, "layer_norm_eps": 1e-6,
                    "num_channels": 4}, "CLIPVisionModel"),
}


@pytest.mark.parametrize("case", sorted(VISION_CASES))
def test_tiny_vision_matches_transformers(case):
    overrides, cls_name = VISION_CASES[case]
    hf_config = transformers.CLIPVisionConfig(**{**TINY, **overrides})
    torch_model = _perturb(getattr(transformers, cls_name)(hf_config), seed=len(case))
    ours = _to_jax(torch_model, clip.CLIP_MODELS[cls_name], CLIPVisionConfig.from_dict(hf_config.to_dict()))
    size, channels = hf_config.image_size, hf_config.num_channels
    pixels = np.random.default_rng(0).normal(size=(2, channels, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.tensor(pixels), output_hidden_states=True)
    _check_vision(_forward(ours, jnp.asarray(pixels.transpose(0, 2, 3, 1)), output_hidden_states=True),
                  ref, 1e-5)
    with pytest.raises(ValueError, match="NHWC"):
        ours(jnp.asarray(pixels))  # NCHW is refused


# ----------------------------------------------------------------------------- strictness

@pytest.mark.parametrize("patch, match", [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"architectures": ["BertModel"]}, "architectures"),
    ({"model_type": "bert"}, "model_type"),
    ({"eos_token_id": [2, 3]}, "eos_token_id"),
    ({"hidden_size": 30}, "num_attention_heads"),
])
def test_text_config_is_strict(patch, match):
    with pytest.raises(ConfigError, match=match):
        CLIPTextConfig.from_dict({**TINY, "model_type": "clip_text_model", **patch})


def test_vision_config_and_params_are_strict():
    with pytest.raises(ConfigError, match="image_size"):
        CLIPVisionConfig.from_dict({"image_size": 30, "patch_size": 7})
    with pytest.raises(ConfigError, match="image_size"):
        CLIPVisionConfig.from_dict({"image_size": [224, 224]})
    with pytest.raises(ConfigError, match="model_type"):
        CLIPVisionConfig.from_dict({"model_type": "clip_text_model"})
    config = CLIPTextConfig(**TINY, vocab_size=10, max_position_embeddings=4)
    abstract = nnx.eval_shape(lambda: clip.CLIPTextModel(config, rngs=nnx.Rngs(0)))
    flat = {".".join(map(str, path)): np.zeros(v.shape, np.float32)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    flat.pop("text_model.final_layer_norm.bias")
    flat["text_model.extra.kernel"] = np.zeros((2, 2), np.float32)
    flat["text_model.embeddings.token_embedding.embedding"] = np.zeros((11, 32), np.float32)
    with pytest.raises(ConfigError, match="final_layer_norm.bias.*extra.kernel.*token_embedding"):
        clip.clip_from_params(clip.CLIPTextModel, config, flat)


# ----------------------------------------------------------------------------- official fixture

def test_magic_clothing_text_embeddings():
    """Our tokenizer + text encoder on the official Magic Clothing run (transformers 4.31)."""
    from leffa_jax.text import CLIPTokenizer

    model_dir = shared_path("fixtures", "magic_clothing", "model")
    run = np.load(shared_path("fixtures", "magic_clothing", "joint_default.npz"))
    config = CLIPTextConfig.from_json(model_dir / "text_encoder")
    params = clip.clip_params_from_torch(load_file(model_dir / "text_encoder" / "model.safetensors"),
                                         clip.CLIPTextModel)
    encoder = clip.clip_from_params(clip.CLIPTextModel, config, params)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    prompts = [*run["prompts"], "", str(run["negative_prompt"])]
    got = np.asarray(_forward(encoder, jnp.asarray(tokenizer(prompts)["input_ids"])).last_hidden_state)
    want = np.concatenate([run["cond_prompt_embeds"], run["null_prompt_embeds"],
                           run["negative_prompt_embeds"][:1]])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- real sizes

REAL_TEXT = {
    # SD1.5 / SDXL text_encoder: CLIP ViT-L/14 text, legacy eos_token_id 2 as in their configs
    "sd15_text_encoder": ({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "hidden_act": "quick_gelu", "eos_token_id": 2,
                           "bos_token_id": 0, "pad_token_id": 1}, "CLIPTextModel", "<|endoftext|>"),
    # SDXL text_encoder_2: OpenCLIP bigG text, projection 1280, "!" padding
    "sdxl_text_encoder_2": ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                             "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280,
                             "eos_token_id": 49407}, "CLIPTextModelWithProjection", "!"),
}
REAL_VISION = {
    "ip_adapter_vit_h14": ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                            "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 1024}),
    "clip_vit_l14": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "hidden_act": "quick_gelu", "projection_dim": 768}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REAL_TEXT))
def test_real_size_text(case, tmp_path):
    from leffa_jax.text import CLIPTokenizer

    overrides, cls_name, pad = REAL_TEXT[case]
    folder = shared_path("fixtures", "magic_clothing", "model", "tokenizer")
    config_json = json.loads((folder / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config_json, "pad_token": pad}))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    ids = CLIPTokenizer.from_pretrained(tmp_path)(["a photo of a cat in a park, best quality"])["input_ids"]
    hf_config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **overrides)
    torch.manual_seed(0)
    torch_model = _perturb(getattr(transformers, cls_name)(hf_config), seed=1, scale=0.02,
                           only_vectors=True)
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), output_hidden_states=True)
    ours = _to_jax(torch_model, clip.CLIP_MODELS[cls_name], CLIPTextConfig.from_dict(hf_config.to_dict()))
    del torch_model
    gc.collect()
    errs = _check_text(_forward(ours, jnp.asarray(ids), output_hidden_states=True), ref, 1e-4)
    print(case, _summary(errs))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REAL_VISION))
def test_real_size_vision(case):
    hf_config = transformers.CLIPVisionConfig(image_size=224, patch_size=14, **REAL_VISION[case])
    torch.manual_seed(0)
    torch_model = _perturb(transformers.CLIPVisionModelWithProjection(hf_config), seed=2, scale=0.02,
                           only_vectors=True)
    pixels = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.tensor(pixels), output_hidden_states=True)
    ours = _to_jax(torch_model, clip.CLIPVisionModelWithProjection,
                   CLIPVisionConfig.from_dict(hf_config.to_dict()))
    del torch_model
    gc.collect()
    errs = _check_vision(_forward(ours, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                                  output_hidden_states=True), ref, 1e-4)
    print(case, _summary(errs))

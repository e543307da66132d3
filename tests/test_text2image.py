"""Text-to-image (SD1.5 / SDXL): parity with diffusers' pipelines built here from tiny random
models (weights perturbed off their init), conversion of whole diffusers / transformers folders
both ways, the official Magic Clothing prompt embeddings, and the CLI.

Parity runs replay the initial noise (diffusers' `latents=` NCHW, ours NHWC) and compare the
latents after every step (diffusers' `callback_on_step_end`), the decoded image and uint8.
"""

import json
import shutil

import numpy as np
import pytest
from conftest import shared_path

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from leffa_jax.systems import text2image as t2i  # noqa: E402

STEPS = 4
SIZE = 64  # image; latent 8x8 (VAE factor 8)
PROMPTS = ["a photo of a cat", "a red dress, studio lighting"]
NEGATIVE = ["blurry", "low quality"]
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "clip_sample": False, "trained_betas": None}
SDXL_SCHEDULER = {**SD15_SCHEDULER, "_class_name": "EulerDiscreteScheduler",
                  "timestep_spacing": "leading", "use_karras_sigmas": False}
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "unipc": "UniPCMultistepScheduler",
                        "pndm": "PNDMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def _perturb(module, seed, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return module.eval()


def _text_encoder(cls, seed, **overrides):
    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=49408, max_position_embeddings=77, projection_dim=32, **overrides)
    torch.manual_seed(seed)
    return _perturb(cls(config), seed)


def _vae(seed):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE)
    return _perturb(vae, seed)


def _unet(seed, sdxl):
    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True,
                 transformer_layers_per_block=(1, 2), cross_attention_dim=64) if sdxl else dict(
        cross_attention_dim=32)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 8, in_channels=4,
        out_channels=4, norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **extra)
    return _perturb(unet, seed)


def _tokenizer_2(folder):
    """SDXL's tokenizer_2: the same vocabulary, padded with "!"."""
    src = shared_path("fixtures", "magic_clothing", "model", "tokenizer")
    shutil.copytree(src, folder)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))
    special = json.loads((src / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    return transformers.CLIPTokenizer.from_pretrained(folder)


def _tokenizer():
    src = shared_path("fixtures", "magic_clothing", "model", "tokenizer")
    return transformers.CLIPTokenizer.from_pretrained(src)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """(diffusers pipeline, its saved folder, our system loaded from the folder)."""
    folder = tmp_path_factory.mktemp("sd15") / "model"
    scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(1), text_encoder=_text_encoder(transformers.CLIPTextModel, 2, eos_token_id=2),
        tokenizer=_tokenizer(), unet=_unet(3, sdxl=False), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    _save(pipe, folder, SD15_SCHEDULER)
    return pipe, folder, t2i.load_text2image(folder)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    folder = root / "model"
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(4), text_encoder=_text_encoder(transformers.CLIPTextModel, 5),
        text_encoder_2=_text_encoder(transformers.CLIPTextModelWithProjection, 6,
                                     hidden_act="gelu"),
        tokenizer=_tokenizer(), tokenizer_2=_tokenizer_2(root / "tok2"), unet=_unet(7, sdxl=True),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        add_watermarker=False)
    _save(pipe, folder, SDXL_SCHEDULER)
    return pipe, folder, t2i.load_text2image(folder)


def _save(pipe, folder, scheduler_config):
    """Save the pipeline with the scheduler config as given (as old diffusers wrote it: keys
    left out take each scheduler class's own default, e.g. UniPC's "linspace" spacing)."""
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))


def _diffusers_run(pipe, scheduler, init_noise, **kwargs):
    """diffusers with replayed NHWC noise -> (latents per step (K,B,h,w,4), decoded (B,H,W,3),
    images in [0, 1] (B,H,W,3))."""
    base = SDXL_SCHEDULER if "text_encoder_2" in pipe.components else SD15_SCHEDULER
    pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(base)
    steps = []

    def record(_pipe, _i, _t, tensors):
        steps.append(tensors["latents"].permute(0, 2, 3, 1).numpy().copy())
        return tensors

    latents = torch.from_numpy(init_noise.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = pipe(latents=latents, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                   output_type="np", callback_on_step_end=record, **kwargs)
        final = torch.from_numpy(steps[-1].transpose(0, 3, 1, 2).copy())
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor).sample
    return np.stack(steps), decoded.permute(0, 2, 3, 1).numpy(), out.images


def _check_parity(ours, theirs):
    latents, decoded, images = theirs
    assert ours.latents.shape == latents.shape
    scale = float(np.abs(latents).max())  # the random tiny UNets drive |x| to ~20-80
    np.testing.assert_allclose(ours.latents, latents, atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours.decoded, decoded, atol=1e-3, rtol=0)
    want = (images * 255).round().astype(np.int16)
    levels = np.abs(ours.images.astype(np.int16) - want).max()
    print(f"latents max |diff| {np.abs(ours.latents - latents).max():.2e} (max |x| {scale:.1f}), "
          f"decoded {np.abs(ours.decoded - decoded).max():.2e}, uint8 {levels} level(s)")
    assert levels <= 1


def _noise(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, SIZE // 8, SIZE // 8, 4)).astype(
        np.float32)


# per stepper, a different use (each stepper compiles its own loop anyway): (diffusers keyword
# arguments, ours); prompts and the guidance scale are added by the tests.
SD15_CASES = {
    "ddim": ({"negative_prompt": NEGATIVE}, {"negative_prompt": NEGATIVE}),
    "dpmpp_2m": ({}, {}),  # no negative prompt: ""
    "pndm": ({"negative_prompt": NEGATIVE, "guidance_rescale": 0.7},
             {"negative_prompt": NEGATIVE, "guidance_rescale": 0.7}),
    "unipc": ({"num_images_per_prompt": 2}, {"num_images_per_prompt": 2}),  # one prompt x 2
}
MICRO = {"original_size": (48, 80), "crops_coords_top_left": (4, 8)}
SDXL_CASES = {
    "ddim": (MICRO, {"micro_conditioning": MICRO}),  # zero negatives (force_zeros_for_empty_prompt)
    "dpmpp_2m": ({"guidance_scale": 1.0}, {"guidance": 1.0}),  # guidance off: one branch
    "pndm": ({"target_size": (32, 96)}, {"micro_conditioning": {"target_size": (32, 96)}}),
    "unipc": ({"negative_prompt": NEGATIVE, "prompt_2": PROMPTS[::-1],
               "negative_prompt_2": ["grainy", ""]},
              {"negative_prompt": NEGATIVE, "prompt_2": PROMPTS[::-1],
               "negative_prompt_2": ["grainy", ""]}),
}


def _parity(system_fixture, cases, scheduler, guidance, seed):
    pipe, _, system = system_fixture
    theirs_kwargs, ours_kwargs = cases[scheduler]
    prompts = PROMPTS[:1] if "num_images_per_prompt" in ours_kwargs else PROMPTS
    noise = _noise(2, seed)
    theirs = _diffusers_run(pipe, scheduler, noise, prompt=prompts,
                            **{"guidance_scale": guidance, **theirs_kwargs})
    ours = t2i.generate(system, prompts, steps=STEPS, height=SIZE, width=SIZE,
                        scheduler=scheduler, init_noise=noise, return_latents=True,
                        **{"guidance": guidance, **ours_kwargs})
    _check_parity(ours, theirs)


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_sd15_matches_diffusers(sd15, scheduler):
    _parity(sd15, SD15_CASES, scheduler, 7.5, 0)


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_sdxl_matches_diffusers(sdxl, scheduler):
    """Pooled embeddings, time ids, both encoders' prompts, zero or encoded negatives."""
    _parity(sdxl, SDXL_CASES, scheduler, 5.0, 1)


def test_batch_sharded_over_devices(sd15):
    """8 samples sharded over the 8 host devices give what 2 unsharded samples give (each
    sample's two guidance branches stay on one device)."""
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
    _, _, system = sd15
    noise = _noise(2)
    kwargs = dict(steps=STEPS, guidance=7.5, height=SIZE, width=SIZE, scheduler="ddim")
    single = t2i.generate(system, PROMPTS, negative_prompt=NEGATIVE, init_noise=noise, **kwargs)
    sharded = t2i.generate(system, PROMPTS * 4, negative_prompt=NEGATIVE * 4,
                           init_noise=np.tile(noise, (4, 1, 1, 1)), **kwargs)
    for k in range(4):
        np.testing.assert_allclose(sharded.decoded[2 * k:2 * k + 2], single.decoded, atol=1e-4)


# ----------------------------------------------------------------------------- conversion

def _canonical(key, tower):
    """transformers 5 saves a plain CLIPTextModel / CLIPVisionModel without its tower prefix;
    conversion writes the 4.x / diffusers names."""
    return key if key.startswith((tower, "text_projection", "visual_projection")) else tower + key


def _assert_same_tensors(original, back, tower=None):
    from leffa_jax.weights.tensor_io import TensorSource

    src, out = TensorSource(original), TensorSource(back)
    keys = [k for k in src.keys() if not k.endswith("position_ids")]
    names = {(_canonical(k, tower) if tower else k): k for k in keys}
    assert sorted(out.keys()) == sorted(names)
    for name, key in names.items():
        a, b = src[key], out[name]
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key


def _assert_same_module(want, got):
    """The library loaded every parameter of the written folder: state dicts bit-equal."""
    want, got = want.state_dict(), got.state_dict()
    assert sorted(want) == sorted(got)
    for key, value in want.items():
        assert torch.equal(value, got[key]), key


def _weights(folder):
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "diffusion_pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    raise AssertionError(f"no weights in {folder}")


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_convert_diffusers_folder_both_ways(which, request, tmp_path):
    """`convert to-flax --diffusers` then `to-diffusers`: every tensor back bit-exact under its
    original name, shape and dtype; configs, tokenizers and scheduler copied; diffusers loads the
    result and its text encoders give the original outputs; our loader reads the checkpoint."""
    from leffa_jax import convert

    pipe, folder, system = request.getfixturevalue(which)
    assert convert.main(["to-flax", "--diffusers", str(folder), "--out", str(tmp_path / "f")]) == 0
    assert convert.main(["to-diffusers", "--flax", str(tmp_path / "f"),
                         "--out", str(tmp_path / "back")]) == 0
    back = tmp_path / "back"
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if which == "sdxl" else [])
    for part in parts:
        tower = "text_model." if part.startswith("text") else None
        _assert_same_tensors(_weights(folder / part), _weights(back / part), tower)
        assert (back / part / "config.json").read_text() == (folder / part / "config.json").read_text()
    for extra in ["tokenizer", "scheduler"] + (["tokenizer_2"] if which == "sdxl" else []):
        for file in (folder / extra).iterdir():
            assert (back / extra / file.name).read_bytes() == file.read_bytes()
    again = type(pipe).from_pretrained(back)
    for name in parts:
        _assert_same_module(getattr(pipe, name), getattr(again, name))
    loaded = t2i.load_text2image(tmp_path / "f")
    assert loaded.sdxl == system.sdxl and sorted(loaded.tokenizers) == sorted(system.tokenizers)
    assert loaded.force_zeros_for_empty_prompt == system.force_zeros_for_empty_prompt


def test_old_layout_fp16_bin_with_buffers(sd15, tmp_path):
    """A text encoder as transformers 4.x wrote it (`text_model.` keys, fp16, .bin, with the
    position_ids buffer): converts (buffer dropped) and comes back with its names and dtypes."""
    from leffa_jax.weights.pipeline_folders import flax_to_folder, folder_to_flax

    _, folder, _ = sd15
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    src = _weights(old / "text_encoder")
    from safetensors.torch import load_file

    state = {_canonical(k, "text_model."): v.half() for k, v in load_file(src).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    src.unlink()
    torch.save(state, old / "text_encoder" / "pytorch_model.bin")
    folder_to_flax(str(old), str(tmp_path / "f"))
    flax_to_folder(str(tmp_path / "f"), str(tmp_path / "back"))
    _assert_same_tensors(old / "text_encoder" / "pytorch_model.bin",
                         tmp_path / "back" / "text_encoder" / "model.safetensors")


CLIP_CLASSES = ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
                "CLIPVisionModelWithProjection"]


@pytest.mark.parametrize("class_name", CLIP_CLASSES)
def test_transformers_clip_folder_both_ways(class_name, tmp_path):
    """A plain transformers folder (as transformers 5 saves it, tokenizer files beside) converts,
    comes back bit-exact (with the 4.x tower prefix) and transformers loads it back."""
    from leffa_jax import convert

    cls = getattr(transformers, class_name)
    kwargs = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=16)
    if "Text" in class_name:
        config = transformers.CLIPTextConfig(vocab_size=99, bos_token_id=0, eos_token_id=2,
                                             pad_token_id=1, **kwargs)
        tower = "text_model."
    else:
        config = transformers.CLIPVisionConfig(image_size=28, patch_size=14, **kwargs)
        tower = "vision_model."
    torch.manual_seed(0)
    model = _perturb(cls(config), 0)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "preprocessor_config.json").write_text("{}")
    assert convert.main(["to-flax", "--diffusers", str(tmp_path / "src"),
                         "--out", str(tmp_path / "f")]) == 0
    assert convert.main(["to-diffusers", "--flax", str(tmp_path / "f"),
                         "--out", str(tmp_path / "back")]) == 0
    _assert_same_tensors(tmp_path / "src" / "model.safetensors",
                         tmp_path / "back" / "model.safetensors", tower)
    assert (tmp_path / "back" / "preprocessor_config.json").read_text() == "{}"
    _assert_same_module(model, cls.from_pretrained(tmp_path / "back"))
    # as an image encoder (StoryMaker, Face-diffuser): text models and, where the projection is
    # needed, vision models without it are refused naming the fix
    from leffa_jax.weights.pipeline_folders import load_image_encoder
    from leffa_jax.weights.tensor_io import CheckpointError

    src = str(tmp_path / "src")
    if "Text" in class_name:
        with pytest.raises(CheckpointError, match="text model"):
            load_image_encoder(src)
    elif "Projection" not in class_name:
        load_image_encoder(src)
        with pytest.raises(CheckpointError, match="without the visual projection"):
            load_image_encoder(src, projection=True)
    else:
        encoder = load_image_encoder(src, projection=True)
        assert encoder.visual_projection.kernel.shape == (32, 16)


def test_conversion_errors_name_the_keys(tmp_path):
    from leffa_jax.weights.pipeline_folders import folder_to_flax
    from leffa_jax.weights.tensor_io import CheckpointError, write_safetensors

    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=1, num_attention_heads=4)
    transformers.CLIPTextModel(config).save_pretrained(tmp_path / "src")
    from safetensors.numpy import load_file

    state = load_file(tmp_path / "src" / "model.safetensors")
    del state["final_layer_norm.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["embeddings.token_embedding.weight"] = np.zeros((98, 32), np.float32)
    write_safetensors(str(tmp_path / "src" / "model.safetensors"), state.items())
    with pytest.raises(CheckpointError) as info:
        folder_to_flax(str(tmp_path / "src"), str(tmp_path / "f"))
    message = str(info.value)
    for part in ("1 missing", "text_model.final_layer_norm.bias", "1 unexpected",
                 "text_model.extra.weight", "wrong shape",
                 "text_model.embeddings.token_embedding.weight: (98, 32) vs (99, 32)"):
        assert part in message
    assert not (tmp_path / "f").exists()
    clip = tmp_path / "clip"
    transformers.CLIPModel(transformers.CLIPConfig(
        text_config=config.to_dict(), vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            image_size=28, patch_size=14))).save_pretrained(clip)
    with pytest.raises(CheckpointError, match="full CLIPModel"):
        folder_to_flax(str(clip), str(tmp_path / "g"))


# ----------------------------------------------------------------------------- official fixture

def test_magic_clothing_prompt_embeddings():
    """The official Magic Clothing run's prompts: our loader, tokenizer and SD1.5 text encoding
    give its token ids and text embeddings (transformers 4.31)."""
    system = t2i.load_text2image(shared_path("fixtures", "magic_clothing", "model"))
    run = np.load(shared_path("fixtures", "magic_clothing", "joint_default.npz"))
    prompts = [*run["prompts"], str(run["negative_prompt"]), ""]
    ids = t2i._token_ids(system, prompts, prompts, 1)["text_encoder"]
    np.testing.assert_array_equal(ids[:2], run["cond_input_ids"])
    np.testing.assert_array_equal(ids[2:3], run["negative_input_ids"][:1])
    np.testing.assert_array_equal(ids[3:], run["null_input_ids"])
    context, pooled = t2i.encode_text(system.model, {"text_encoder": ids})
    assert pooled is None
    want = np.concatenate([run["cond_prompt_embeds"], run["negative_prompt_embeds"][:1],
                           run["null_prompt_embeds"]])
    np.testing.assert_allclose(np.asarray(context), want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- CLI

def _sample_cli(*args):
    from leffa_jax import sample

    return sample.main(["--task", "text2image", *map(str, args)])


def test_cli_writes_images_and_grid(sd15, tmp_path):
    """Same shapes and stepper as the ddim parity run, so the compiled programs are reused."""
    from PIL import Image

    _, folder, _ = sd15
    out = tmp_path / "out"
    assert _sample_cli("--model", folder, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                       "--batch-size", 2, "--steps", STEPS, "--height", SIZE, "--width", SIZE,
                       "--scheduler", "ddim", "--guidance", 7.5, "--out", out,
                       "--no-progress") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_a_photo_of_a_cat.png", "001_a_photo_of_a_cat.png",
                     "002_a_red_dress_studio_lighting.png", "003_a_red_dress_studio_lighting.png",
                     "grid.png"]
    assert np.asarray(Image.open(out / names[0])).shape == (SIZE, SIZE, 3)
    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * (SIZE + 2) + 2,
                                                              2 * (SIZE + 2) + 2, 3)


def test_cli_errors_name_problem_and_fix(sd15, tmp_path, capsys):
    _, folder, _ = sd15
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folder, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", folder, "--height", 500], "--height 500 is not a multiple of 8",
         "use --height 496 or 504"),
        (["--model", tmp_path / "nope"], "does not exist", "give a diffusers"),
        (["--model", tmp_path / "empty"], "neither a diffusers pipeline folder", "unet/"),
        (["--model", no_tokenizer], "missing tokenizer for text_encoder", "copy the model's "
         "tokenizer/ folder"),
        (["--model", folder, "--steps", 0], "--steps and --batch-size must be >= 1", ""),
    ]
    for args, problem, fix in cases:
        assert _sample_cli(*args, "--prompt", "x", "--out", tmp_path / "o") == 2
        err = capsys.readouterr().err
        assert problem in err and fix in err, err
    assert not (tmp_path / "o").exists()

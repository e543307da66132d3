"""Face-diffuser training pieces: the FastComposer caption/token preparation against the official
recording, the synthetic subjects set, and a short SDM run on the 8 host devices that is
stopped, resumed and exported (the loss values are checked in test_face_diffuser.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import persistent_compilation_cache, shared_path


@pytest.fixture(scope="module")
def train_fixture():
    return dict(np.load(shared_path("fixtures", "face_diffuser", "train_step.npz")))


@pytest.fixture(scope="module")
def tokenizer():
    from leffa_jax.systems.text2image_model import load_tokenizer

    return load_tokenizer(str(shared_path("fixtures", "face_diffuser", "config", "base_sd15",
                                          "tokenizer")))


def test_captions_tokens_match_official(train_fixture, tokenizer):
    """`<|image|>` inserted after each kept segment's end, then the clean ids and token mask:
    equal to the official dataset's for both recorded samples."""
    from leffa_jax.data.fastcomposer import caption_with_tokens
    from leffa_jax.systems.face_diffuser import add_image_token, mask_image_tokens, token_index

    t = train_fixture
    image_tokenizer, token_id = add_image_token(tokenizer)
    assert token_id == int(t["image_token_id"])
    for k in (0, 1):
        info = json.loads(str(t[f"sample{k}_info_json"]))
        persons = [s for s in info["segments"] if s["coco_label"] == "person"]
        caption = caption_with_tokens(info["caption"], persons)
        assert caption == str(t[f"sample{k}_caption_with_image_tokens"])
        raw = image_tokenizer.encode(caption)
        np.testing.assert_array_equal(raw, t[f"sample{k}_raw_ids_with_image_tokens"])
        ids, mask = mask_image_tokens(raw, token_id, image_tokenizer.pad_token_id)
        np.testing.assert_array_equal(ids, t["batch_input_ids"][k])
        np.testing.assert_array_equal(mask, t["batch_image_token_mask"][k])
        idx, valid = token_index(mask, 4)
        np.testing.assert_array_equal(idx, t["batch_image_token_idx"][k])
        np.testing.assert_array_equal(valid, t["batch_image_token_idx_mask"][k])


def test_synthetic_subjects_layout(tmp_path, tokenizer):
    """The synthetic set is a FastComposer layout; prepared samples have the batch shapes."""
    import ml_collections

    from leffa_jax.data import fastcomposer

    root = fastcomposer.make_synthetic_subjects(str(tmp_path / "subjects"), 3, 64)
    ids = fastcomposer.read_ids(root)
    image, segmap, info = fastcomposer.read_sample(root, ids[0])
    assert segmap.shape == image.shape[:2] and info["segments"]
    for s in info["segments"]:
        assert info["caption"][:s["end"]].endswith(s["word"])
    cfg = ml_collections.ConfigDict(dict(fastcomposer.default_config()))
    cfg.resolution, cfg.object_resolution, cfg.uncondition_prob = 64, 32, 0.0
    cfg.object_appear_prob = 1.0
    ex = fastcomposer.prepare_sample(image, segmap, info, tokenizer, cfg,
                                     np.random.default_rng(0))
    assert ex["image"].shape == (64, 64, 3) and ex["objects"].shape == (4, 32, 32, 3)
    assert ex["segmaps"].shape == (4, 64, 64)
    n = len(info["segments"])
    assert int(ex["image_token_valid"].sum()) == n
    assert ex["segmaps"][:n].reshape(n, -1).max(1).min() == 1.0


@pytest.fixture(scope="module")
def sdm_run(tmp_path_factory):
    """Tiny SDM on the synthetic set, batch 8 over the 8 host devices: 2 steps, stop, resume
    to 3. -> (config, workdir, [the 3 losses])."""
    from leffa_jax.configs import face_diffuser_tiny
    from leffa_jax.train import train

    tmp_path = tmp_path_factory.mktemp("fd_sdm")
    c = face_diffuser_tiny.get_config()
    c.train.steps = 3
    c.train.batch_size = 8
    c.checkpoint.every = 2
    c.data.num_synthetic = 8
    c.data.root = str(tmp_path / "data")
    c.log.progress_bar = False
    workdir = str(tmp_path / "run")
    with persistent_compilation_cache(tmp_path / "xla_cache"):
        first = train(c, workdir, max_steps=2)
        assert first.step == 2
        resumed = train(c, workdir)
    assert resumed.step == 3
    return c, workdir, [float(m["loss"]) for m in first.metrics + resumed.metrics]


@pytest.mark.slow  # the sharded train step's CPU compile (UNet + CLIP vision + grads): minutes
def test_sdm_train_resume_export(sdm_run):
    """Finite losses over the stop and resume, the export loads as an SDM; the vision tower's
    first layer stays frozen while its last layer trains."""
    from leffa_jax.systems.face_diffuser import load_model
    from leffa_jax.systems.face_diffuser_train import config_folder, random_model

    c, workdir, losses = sdm_run
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    exported = load_model(os.path.join(workdir, "export"), layout="sdm")
    start = random_model(config_folder(c.model, "sdm"), "sdm", c.train.seed)
    layers = exported.image_encoder.vision_model.encoder.layers
    start_layers = start.image_encoder.vision_model.encoder.layers
    np.testing.assert_array_equal(np.asarray(layers[0].mlp.fc1.kernel[...]),
                                  np.asarray(start_layers[0].mlp.fc1.kernel[...]))
    assert not np.array_equal(np.asarray(layers[-1].mlp.fc1.kernel[...]),
                              np.asarray(start_layers[-1].mlp.fc1.kernel[...]))


@pytest.mark.slow  # a second train-step compile (TDM) and the SNF loop's
def test_tiny_config_trains_the_tdm_and_samples_with_both(sdm_run, tmp_path, capsys):
    """The tiny config's documented job end to end: the TDM trained with
    `--config.task=face_diffuser_tdm`, then `sample --task subject2image` from the two exports
    (base folder: the fixture's SD1.5 configs + its base VAE) writes images and fusion masks."""
    from safetensors.numpy import load_file, save_file

    from leffa_jax import sample
    from leffa_jax.train import train

    c, sdm_dir, _ = sdm_run
    t = c.copy_and_resolve_references()
    t.task = "face_diffuser_tdm"
    t.train.steps = 1
    tdm_dir = str(tmp_path / "tdm")
    assert train(t, tdm_dir).step == 1
    fixture = shared_path("fixtures", "face_diffuser")
    base = tmp_path / "base"
    shutil.copytree(fixture / "config" / "base_sd15", base)
    weights = load_file(str(fixture / "weights.safetensors"))
    save_file({k[len("base_vae."):]: v for k, v in weights.items() if k.startswith("base_vae.")},
              str(base / "vae" / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "out"
    argv = ["--task", "subject2image", "--sdm", os.path.join(sdm_dir, "export"),
            "--tdm", os.path.join(tdm_dir, "export"), "--base", str(base),
            "--prompt", "a man <|image|> at the beach", "--subject",
            str(fixture / "refs" / "0" / "0.png"), "--steps", "4", "--merge-start", "1",
            "--merge-end", "3", "--height", "64", "--width", "64", "--object-resolution", "32",
            "--save-masks", "--no-progress", "--out", str(out)]
    assert sample.main(argv) == 0, capsys.readouterr().err
    names = sorted(os.listdir(out))
    assert "grid.png" in names and any(n.startswith("000_") for n in names)
    assert os.listdir(out / "masks")

"""`python -m leffa_jax.evaluate --metrics clip_i,clip_t`: CLIP-I / CLIP-T of image folders equal
transformers (`CLIPImageProcessor` + `CLIPTokenizer` + `CLIPModel`, run here on the same files)
for a tiny random CLIP saved as a transformers folder (weights, preprocessor, a byte-level
tokenizer); the GT is Lanczos-resized to the predictions' height as for SSIM/LPIPS."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require_module

torch = require_module("torch")
transformers = require_module("transformers")

from PIL import Image  # noqa: E402

from leffa_jax import evaluate  # noqa: E402
from leffa_jax.text.tokenizer import bytes_to_unicode  # noqa: E402

TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
IDS = ["01234_00", "01235_00", "01236_00"]
CAPTIONS = {"x01234_00.png": "a red shirt with long sleeves", "x01235_00": "blue jeans",
            "x01236_00.png": "a green dress, summer, studio photo of a model"}  # > 14 tokens: cut


def _images(folder, names, size_hw, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for n in names:
        base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize(size_hw[::-1], Image.BICUBIC)
        arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 12, (*size_hw, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{n}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalclip")
    clip_dir = root / "clip"
    vocab = [*bytes_to_unicode().values()]
    vocab = vocab + [c + "</w>" for c in vocab] + ["<|startoftext|>", "<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config={**TINY, "vocab_size": len(vocab), "max_position_embeddings": 16,
                     "bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1,
                     "pad_token_id": len(vocab) - 1},
        vision_config={**TINY, "image_size": 32, "patch_size": 8}, projection_dim=24)
    torch.manual_seed(1)  # CLIP-T cosines of both signs: clamp checked
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(clip_dir)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(clip_dir)
    (clip_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n")
    (clip_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    _images(root / "gt", IDS + ["99999_00"], (64, 48), 7)  # taller GT: resized to 40
    _images(root / "pred", [f"x{i}" for i in IDS], (40, 30), 8)
    (root / "captions.json").write_text(json.dumps(CAPTIONS))
    return root, model


def test_cli_clip_i_clip_t_match_transformers(setup, capsys):
    root, model = setup
    out = root / "res.json"
    rc = evaluate.main(["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--paired",
                        "--metrics", "clip_i,clip_t", "--clip", str(root / "clip"),
                        "--captions", str(root / "captions.json"), "--json", str(out),
                        "--batch-size", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "CLIP-I" in printed and "CLIP-T" in printed
    res = json.loads(out.read_text())
    assert res["counts"]["clip_i_pairs"] == 3 and res["counts"]["clip_t_images"] == 3

    proc = transformers.CLIPImageProcessor.from_pretrained(root / "clip")
    tok = transformers.CLIPTokenizer.from_pretrained(root / "clip")
    preds = [Image.open(root / "pred" / f"x{i}.png") for i in IDS]
    gts = []
    for i in IDS:  # VtonEval's copy_resize_gt: Lanczos to the predictions' height
        g = Image.open(root / "gt" / f"{i}.png")
        gts.append(g.resize((int(g.width * 40 / g.height), 40), Image.LANCZOS))
    texts = [CAPTIONS.get(f"x{i}.png", CAPTIONS.get(f"x{i}")) for i in IDS]
    t = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        a = model(pixel_values=proc(preds, return_tensors="pt")["pixel_values"], **t)
        b = model(pixel_values=proc(gts, return_tensors="pt")["pixel_values"], **t)
    want_i = (a.image_embeds * b.image_embeds).sum(-1).mean().item()
    cos_t = (a.image_embeds * a.text_embeds).sum(-1)
    want_t = (100 * cos_t.clamp(min=0)).mean().item()
    assert abs(res["metrics"]["clip_i"] - want_i) <= 1e-5
    assert abs(res["metrics"]["clip_t"] - want_t) <= 1e-5 * 100  # CLIP score scale: cos x 100
    assert abs(res["metrics"]["clip_t_cosine"] - cos_t.mean().item()) <= 1e-5
    print(f"clip_i err {abs(res['metrics']['clip_i'] - want_i):.2e}, clip_t err "
          f"{abs(res['metrics']['clip_t'] - want_t):.2e} (x100 scale), cosine err "
          f"{abs(res['metrics']['clip_t_cosine'] - cos_t.mean().item()):.2e}")


def test_cli_clip_bad_inputs(setup, tmp_path, capsys):
    root, _ = setup
    base = ["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--paired", "--no-progress"]
    assert evaluate.main(base + ["--metrics", "clip_i"]) == 2
    assert "needs --clip DIR" in capsys.readouterr().err
    assert evaluate.main(base + ["--metrics", "clip_i", "--clip", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--clip" in err and "model.safetensors" in err
    partial = tmp_path / "captions.txt"
    partial.write_text("x01234_00.png\ta red shirt\n")
    assert evaluate.main(base + ["--metrics", "clip_t", "--clip", str(root / "clip"),
                                 "--captions", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "no caption for 2 of 3" in err and "x01235_00.png" in err

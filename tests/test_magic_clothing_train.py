"""Magic Clothing training: the Task trains the extractor only, sharded over the 8 host devices,
resumes from its checkpoint, and exports a released-layout extractor file; the captions reader
and the condition dropout split."""

import numpy as np
import pytest
from conftest import shared_path

from leffa_jax.data.garment_text import read_captions


def _config(tmp_path):
    from leffa_jax.configs import magic_clothing_tiny

    c = magic_clothing_tiny.get_config()
    c.model.base = str(shared_path("fixtures", "magic_clothing", "model"))
    c.model.train_denoiser = False
    c.train.steps = 2
    c.train.batch_size = 8
    c.train.garment_drop_prob = c.train.text_drop_prob = c.train.both_drop_prob = 0.25
    c.checkpoint.every = 1
    c.checkpoint.use_async = False
    c.log.every = 1
    c.log.image_every = 0
    c.log.progress_bar = False
    c.data.synthetic.num_train, c.data.synthetic.num_test = 16, 2
    c.data.synthetic.seed = 3
    c.data.root = str(tmp_path / "data")
    return c


@pytest.mark.slow  # one sharded train-step compile (the resumed run reuses it from the cache)
def test_train_resume_export(tmp_path, compilation_cache):
    from leffa_jax.systems import make_task
    from leffa_jax.training.loop import train
    from leffa_jax.weights.tensor_io import TensorSource

    config = _config(tmp_path)
    work = str(tmp_path / "work")
    first = train(make_task(config), config, work, max_steps=1)
    assert first.step == 1
    task = make_task(config)
    second = train(task, config, work)  # resumes at step 1
    assert second.step == 2
    rows = first.metrics + second.metrics
    assert len(rows) == 2
    for row in rows:
        assert np.isfinite(row["loss"]) and np.isfinite(row["mse"]) and row["finite"]
    export = TensorSource(tmp_path / "work" / "export" / "garment_extractor.safetensors")
    assert len(export.keys()) == 324
    # the extractor moved away from its initial value (the denoiser); the denoiser is frozen
    base = TensorSource(shared_path("fixtures", "magic_clothing", "model", "unet",
                                    "diffusion_pytorch_model.safetensors"))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    assert not np.array_equal(export[key], base[key])
    np.testing.assert_array_equal(
        np.asarray(task.mc.model.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                   .attn1.to_k.kernel[...]).T, base[key])


def test_captions_formats(tmp_path):
    (tmp_path / "a.json").write_text('{"00001_00.jpg": "a woman in a red top"}')
    (tmp_path / "b.txt").write_text("# c\n00001_00.jpg\ta woman\n00002_00.jpg,a man, smiling\n")
    (tmp_path / "c.jsonl").write_text('{"file_name": "x.jpg", "text": "t"}\n')
    assert read_captions(str(tmp_path / "a.json")) == {"00001_00.jpg": "a woman in a red top"}
    assert read_captions(str(tmp_path / "b.txt")) == {"00001_00.jpg": "a woman",
                                                      "00002_00.jpg": "a man, smiling"}
    assert read_captions(str(tmp_path / "c.jsonl")) == {"x.jpg": "t"}
    (tmp_path / "bad.txt").write_text("only_a_name\n")
    with pytest.raises(ValueError, match="line 1"):
        read_captions(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError):
        read_captions(str(tmp_path / "missing.txt"))

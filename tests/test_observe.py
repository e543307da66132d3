"""Observability: TensorBoard scalars (read back from the event file) and the PNG grid."""

import glob
import io
import os
import struct

import jax
import numpy as np
from PIL import Image

from leffa_jax import observe
from leffa_jax.configs import synthetic_tiny
from leffa_jax.systems import make_task


def read_events(logdir: str) -> list:
    """Parse TFRecord-framed tensorboard events (u64 length, u32 crc, payload, u32 crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            events.append(ev)
            pos += 12 + n + 4
    return events


def _config(batch=2):
    c = synthetic_tiny.get_config()
    c.train.batch_size = c.data.batch_size = batch
    c.data.synthetic.num_train = 4
    c.data.flip_prob = 0.0
    c.log.every = 10
    c.log.progress_bar = False
    c.log.print_every_log = False
    c.log.sample_steps = 1
    return c


def test_scalars_written_with_consistent_rates(tmp_path):
    c = _config()
    flops = 3.0e9
    log = observe.Logger(str(tmp_path), c, flops=flops, start=0, total=20)
    log.peak = 1.0e12  # CPU has no entry in PEAK_FLOPS; pin one to check the MFU formula
    for step in range(20):
        log.log({"step": step, "loss": 1.0 / (step + 1), "mse": 0.5, "leffa": 0.25,
                 "grad_norm": 2.0, "lr": 1e-5})
    log.close()
    values: dict[str, dict[int, float]] = {}
    for ev in read_events(str(tmp_path / "tb")):
        for v in ev.summary.value:
            values.setdefault(v.tag, {})[ev.step] = v.simple_value
    assert sorted(values["loss/total"]) == [10, 20]
    np.testing.assert_allclose(values["loss/total"][10], 0.1, rtol=1e-6)
    np.testing.assert_allclose(values["loss/total"][20], 0.05, rtol=1e-6)
    assert values["loss/mse"][20] == 0.5 and values["loss/leffa"][20] == 0.25
    assert values["train/grad_norm"][20] == 2.0
    np.testing.assert_allclose(values["train/lr"][20], 1e-5, rtol=1e-6)
    n = jax.device_count()
    for s in (10, 20):
        sps = values["perf/steps_per_sec"][s]
        assert sps > 0
        np.testing.assert_allclose(values["perf/images_per_sec_per_device"][s],
                                   sps * c.train.batch_size / n, rtol=1e-5)
        np.testing.assert_allclose(values["perf/tflops_per_sec"][s], flops * sps / 1e12,
                                   rtol=1e-5)
        np.testing.assert_allclose(values["perf/mfu"][s], flops * sps / (1e12 * n), rtol=1e-5)


def test_image_grid_png_and_event(tmp_path):
    from leffa_jax.data import pipeline as dp

    c = _config()
    task = make_task(c)
    model = task.init_model()
    params, frozen = task.prepare(model)
    batch = next(iter(dp.make_dataset(c.data, "train", process_index=0, process_count=1)))
    h, w = c.data.height, c.data.width
    log = observe.Logger(str(tmp_path), c, flops=None, start=0, total=10)
    ema = observe.host_params(params)
    log.images(10, task.image_row(model, ema, observe.host_params(frozen), batch))
    log.close()

    png = np.asarray(Image.open(tmp_path / "images" / "step_0000010.png"))
    pad = 2
    assert png.shape == (h + 2 * pad, 6 * (w + pad) + pad, 3), png.shape

    def panel(j):
        x = pad + j * (w + pad)
        return png[pad:pad + h, x:x + w]

    person = np.asarray(batch["person"][0], np.float64)
    garment = np.asarray(batch["garment"][0], np.float64)
    expect = lambda a: np.round(np.clip(a / 2 + 0.5, 0, 1) * 255)  # noqa: E731
    np.testing.assert_array_equal(panel(0), expect(person))
    np.testing.assert_array_equal(panel(1), expect(garment))
    mask = np.asarray(batch["mask"][0, ..., 0])
    np.testing.assert_array_equal(panel(2), np.repeat(mask[..., None] * 255, 3, -1))
    # sample, flow and warped panels: real pictures, not padding or a copy of an input
    for j in (3, 4, 5):
        assert panel(j).std() > 1.0, j
        assert not np.array_equal(panel(j), panel(0)), j

    images = [v for ev in read_events(str(tmp_path / "tb")) for v in ev.summary.value
              if v.tag == "samples"]
    assert len(images) == 1
    decoded = np.asarray(Image.open(io.BytesIO(images[0].image.encoded_image_string)))
    np.testing.assert_array_equal(decoded[..., :3], png)



def test_metric_names_come_from_the_metrics(tmp_path):
    """No fixed metric list: a task's own terms become `loss/<name>`, bookkeeping is skipped."""
    c = _config()
    log = observe.Logger(str(tmp_path), c, flops=None, start=0, total=10)
    log.log({"step": 9, "loss": 0.75, "kl": 0.5, "recon": 0.25, "grad_norm": 1.5, "lr": 1e-4,
             "finite": True})
    log.close()
    tags = {v.tag: v.simple_value for ev in read_events(str(tmp_path / "tb"))
            for v in ev.summary.value}
    assert tags["loss/total"] == 0.75 and tags["loss/kl"] == 0.5 and tags["loss/recon"] == 0.25
    assert tags["train/grad_norm"] == 1.5
    assert not {"loss/mse", "loss/leffa", "loss/finite", "loss/step"} & set(tags)

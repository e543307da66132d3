"""StoryMaker's optional face path: `face_from_onnx` against insightface's own `ArcFaceONNX`
computation (its calls reproduced here: BGR photo, `norm_crop`, `cv2.dnn.blobFromImages(...,
swapRB=True)`, the mxnet-model normalisation rule) on small recognition ONNX models written by
the test (onnx.helper), run through onnxruntime."""

import numpy as np
import pytest
from conftest import require_module  # noqa: E402

onnx = require_module("onnx")
onnxruntime = require_module("onnxruntime")
cv2 = require_module("cv2")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from leffa_jax.systems.storymaker_inputs import (  # noqa: E402
    arcface_normalisation,
    face_from_onnx,
    norm_crop,
)

KPS = np.array([[52.0, 60.0], [91.0, 58.0], [71.0, 82.0], [56.0, 104.0], [88.0, 103.0]],
               np.float32)


def write_recognition_model(path, *, mxnet: bool, seed: int = 0, zero: bool = False) -> None:
    """1x3x112x112 -> 1x512: (mxnet: Sub 127.5, Mul 1/128 first) Conv 8x8/8 -> global average
    pool -> Gemm. Random weights: channel order and scaling change the output."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "b"),
             numpy_helper.from_array(np.zeros((8, 512), np.float32) if zero else
                                     rng.normal(size=(8, 512)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
             numpy_helper.from_array(np.array(1 / 128, np.float32), "scale")]
    nodes, x = [], "data" if mxnet else "input.1"
    if mxnet:
        nodes += [helper.make_node("Sub", [x, "mean"], ["centred"], name="_minus0"),
                  helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0")]
        x = "scaled"
    nodes += [helper.make_node("Conv", [x, "w", "b"], ["conv"], kernel_shape=[8, 8],
                               strides=[8, 8], name="conv0"),
              helper.make_node("GlobalAveragePool", ["conv"], ["pool"], name="pool0"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flat0"),
              helper.make_node("MatMul", ["flat", "fc"], ["fc1"], name="fc0")]
    graph = helper.make_graph(
        nodes, "arcface_tiny",
        [helper.make_tensor_value_info("data" if mxnet else "input.1", TensorProto.FLOAT,
                                       [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def insightface_embedding(model_path, photo_rgb, kps, mean, std):
    """insightface ArcFaceONNX.get on the BGR photo FaceAnalysis is given, normed."""
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    bgr = cv2.cvtColor(photo_rgb, cv2.COLOR_RGB2BGR)
    aimg = norm_crop(bgr, kps, 112)
    blob = cv2.dnn.blobFromImages([aimg], 1.0 / std, (112, 112), (mean, mean, mean),
                                  swapRB=True)
    out = session.run(None, {session.get_inputs()[0].name: blob})[0].reshape(-1)
    return out / np.linalg.norm(out)


@pytest.mark.parametrize("mxnet", [False, True], ids=["insightface_pack", "mxnet_export"])
def test_face_from_onnx_matches_insightface(tmp_path, mxnet):
    path = tmp_path / "recognition.onnx"
    write_recognition_model(path, mxnet=mxnet)
    assert arcface_normalisation(str(path)) == ((0.0, 1.0) if mxnet else (127.5, 127.5))
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (160, 144, 3), np.uint8)
    photo[..., 0] = np.linspace(0, 255, 144, dtype=np.uint8)  # channels differ: order matters
    face = face_from_onnx(photo, KPS, str(path))
    mean, std = arcface_normalisation(str(path))
    want = insightface_embedding(path, photo, KPS, mean, std)
    np.testing.assert_allclose(face.normed_embedding, want, atol=1e-6)
    assert abs(np.linalg.norm(face.normed_embedding) - 1) < 1e-6
    np.testing.assert_array_equal(face.kps, KPS)
    swapped = insightface_embedding(path, photo[..., ::-1].copy(), KPS, mean, std)
    assert np.abs(swapped - want).max() > 1e-3  # the test would see a channel-order error


def test_face_from_onnx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="w600k_r50"):
        face_from_onnx(np.zeros((64, 64, 3), np.uint8), KPS, str(tmp_path / "missing.onnx"))
    path = tmp_path / "zero.onnx"  # not an ArcFace model: its output is all zeros
    write_recognition_model(path, mxnet=False, zero=True)
    with pytest.raises(ValueError, match="zero or non-finite embedding"):
        face_from_onnx(np.zeros((128, 128, 3), np.uint8), KPS, str(path))

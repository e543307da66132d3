"""Reference side of the metric tests: the authors' packages (pytorch-fid, clean-fid, torchmetrics)
made importable beside the CPU torch wheel (`torchvision_shim`), random but well-conditioned
network weights written as the users' files would be, and clean-fid's TorchScript Inception.

clean-fid loads NVIDIA's `inception-2015-12-05.pt` (a TorchScript archive we cannot ship).
`CleanFidInception` re-declares its module tree (names as in that archive, cf. stylegan3's
`metrics/frechet_inception_distance.py` port: `layers.conv`, `layers.mixed_*.tower*`, BatchNorm
with `beta/mean/var` and no scale, eps 1e-3); it is scripted and saved, and clean-fid's own
`InceptionV3W` loads it. Its weights come from the pytorch-fid state through the name table, and
`test_clean_fid_layout_is_pytorch_fid_network` checks that both torch networks agree.
VtonEval's helper functions are copied from `franciszzj/VtonEval` `eval.py` below (it is a script,
not a package).
"""

from __future__ import annotations

import collections
import os

import numpy as np
import torch
import torchvision_shim

torchvision_shim.install()  # pytorch-fid imports torchvision at import time ...
import pytorch_fid.inception as pfid_inception  # noqa: E402
from PIL import Image  # noqa: E402

torchvision_shim.uninstall()  # ... the test modules' fixtures install it while they run


def _seq(*named):
    return torch.nn.Sequential(collections.OrderedDict(named))


class Conv2dLayer(torch.nn.Module):
    def __init__(self, cin, cout, kh, kw=None, stride=1, padding=0):
        super().__init__()
        kw = kh if kw is None else kw
        self.stride, self.padding = stride, padding
        self.weight = torch.nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta = torch.nn.Parameter(torch.zeros(cout))
        self.mean = torch.nn.Parameter(torch.zeros(cout))
        self.var = torch.nn.Parameter(torch.ones(cout))

    def forward(self, x):
        x = torch.nn.functional.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = torch.nn.functional.batch_norm(x, self.mean, self.var, bias=self.beta, eps=1e-3)
        return torch.nn.functional.relu(x)


class _A(torch.nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1)
        self.tower = _seq(("conv", Conv2dLayer(cin, 48, 1)), ("conv_1", Conv2dLayer(48, 64, 5, padding=2)))
        self.tower_1 = _seq(("conv", Conv2dLayer(cin, 64, 1)), ("conv_1", Conv2dLayer(64, 96, 3, padding=1)),
                            ("conv_2", Conv2dLayer(96, 96, 3, padding=1)))
        self.tower_2 = _seq(("pool", torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
                            ("conv", Conv2dLayer(cin, pool, 1)))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class _B(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, stride=2)
        self.tower = _seq(("conv", Conv2dLayer(cin, 64, 1)), ("conv_1", Conv2dLayer(64, 96, 3, padding=1)),
                          ("conv_2", Conv2dLayer(96, 96, 3, stride=2)))
        self.pool = torch.nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class _C(torch.nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.conv = Conv2dLayer(cin, 192, 1)
        self.tower = _seq(("conv", Conv2dLayer(cin, c7, 1)),
                          ("conv_1", Conv2dLayer(c7, c7, 1, 7, padding=[0, 3])),
                          ("conv_2", Conv2dLayer(c7, 192, 7, 1, padding=[3, 0])))
        self.tower_1 = _seq(("conv", Conv2dLayer(cin, c7, 1)),
                            ("conv_1", Conv2dLayer(c7, c7, 7, 1, padding=[3, 0])),
                            ("conv_2", Conv2dLayer(c7, c7, 1, 7, padding=[0, 3])),
                            ("conv_3", Conv2dLayer(c7, c7, 7, 1, padding=[3, 0])),
                            ("conv_4", Conv2dLayer(c7, 192, 1, 7, padding=[0, 3])))
        self.tower_2 = _seq(("pool", torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
                            ("conv", Conv2dLayer(cin, 192, 1)))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class _D(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.tower = _seq(("conv", Conv2dLayer(cin, 192, 1)), ("conv_1", Conv2dLayer(192, 320, 3, stride=2)))
        self.tower_1 = _seq(("conv", Conv2dLayer(cin, 192, 1)),
                            ("conv_1", Conv2dLayer(192, 192, 1, 7, padding=[0, 3])),
                            ("conv_2", Conv2dLayer(192, 192, 7, 1, padding=[3, 0])),
                            ("conv_3", Conv2dLayer(192, 192, 3, stride=2)))
        self.pool = torch.nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class _E(torch.nn.Module):
    def __init__(self, cin, avg):
        super().__init__()
        self.conv = Conv2dLayer(cin, 320, 1)
        self.tower_conv = Conv2dLayer(cin, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, 1, 3, padding=[0, 1])
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, 3, 1, padding=[1, 0])
        self.tower_1_conv = Conv2dLayer(cin, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, 1, 3, padding=[0, 1])
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, 3, 1, padding=[1, 0])
        self.tower_2_pool = (torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False) if avg
                             else torch.nn.MaxPool2d(3, 1, 1))
        self.tower_2_conv = Conv2dLayer(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class CleanFidInception(torch.nn.Module):
    """NVIDIA's TorchScript Inception module tree; `layers(x)` -> (B, 2048, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.layers = _seq(
            ("conv", Conv2dLayer(3, 32, 3, stride=2)), ("conv_1", Conv2dLayer(32, 32, 3)),
            ("conv_2", Conv2dLayer(32, 64, 3, padding=1)), ("pool0", torch.nn.MaxPool2d(3, 2)),
            ("conv_3", Conv2dLayer(64, 80, 1)), ("conv_4", Conv2dLayer(80, 192, 3)),
            ("pool1", torch.nn.MaxPool2d(3, 2)),
            ("mixed", _A(192, 32)), ("mixed_1", _A(256, 64)), ("mixed_2", _A(288, 64)),
            ("mixed_3", _B(288)), ("mixed_4", _C(768, 128)), ("mixed_5", _C(768, 160)),
            ("mixed_6", _C(768, 160)), ("mixed_7", _C(768, 192)), ("mixed_8", _D(768)),
            ("mixed_9", _E(1280, True)), ("mixed_10", _E(2048, False)),
            ("pool2", torch.nn.AvgPool2d(8)))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        return self.layers(x)


def random_inception_state(seed: int = 0, calibration=None) -> dict[str, torch.Tensor]:
    """A pytorch-fid `pt_inception` state dict with random He-scaled convolutions and BatchNorm
    statistics measured on `calibration` images (B,3,H,W in [0,1]) so activations stay O(1),
    then perturbed; BN scales stay 1 as in TensorFlow's graph (clean-fid's file has none)."""
    g = torch.Generator().manual_seed(seed)
    skeleton = pfid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    state = {}
    for k, v in skeleton.state_dict().items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            state[k] = torch.ones(v.shape)
        elif k.endswith("bn.bias"):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            state[k] = torch.ones(v.shape)
        elif v.is_floating_point():
            state[k] = 0.01 * torch.randn(v.shape, generator=g)
        else:
            state[k] = v
    if calibration is not None:  # BN running stats := batch statistics, layer by layer
        model = build_pytorch_fid(state, output_block=3)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.momentum = None
            bn.reset_running_stats()
        model.train()
        with torch.no_grad():
            model(calibration)
        inner = model._inception_for_test
        state = {k: v.clone() for k, v in inner.state_dict().items()}
        for k in list(state):
            if k.endswith("running_var"):
                state[k] = state[k] * (1 + 0.1 * torch.rand(state[k].shape, generator=g))
            elif k.endswith("running_mean"):
                state[k] = state[k] + 0.05 * torch.randn(state[k].shape, generator=g)
    return state


def build_pytorch_fid(state, output_block: int = 3):
    """pytorch-fid's own `InceptionV3([block])`, its weight download replaced by `state`."""
    captured = {}
    orig_load, orig_build = pfid_inception.load_state_dict_from_url, pfid_inception.fid_inception_v3

    def build():
        m = orig_build()
        captured["inception"] = m
        return m

    pfid_inception.load_state_dict_from_url = lambda url, progress=True: state
    pfid_inception.fid_inception_v3 = build
    try:
        model = pfid_inception.InceptionV3([output_block]).eval()
    finally:
        pfid_inception.load_state_dict_from_url = orig_load
        pfid_inception.fid_inception_v3 = orig_build
    model._inception_for_test = captured["inception"]
    return model


def clean_fid_torchscript(state, path: str) -> str:
    """Script and save a CleanFidInception holding the pytorch-fid `state`; returns the path."""
    from leffa_jax.metrics.weights import CLEAN_FID_NAMES

    module = CleanFidInception()
    sd = module.state_dict()
    for prefix, ours in CLEAN_FID_NAMES.items():
        sd[f"{prefix}.weight"] = state[f"{ours}.conv.weight"]
        sd[f"{prefix}.beta"] = state[f"{ours}.bn.bias"]
        sd[f"{prefix}.mean"] = state[f"{ours}.bn.running_mean"]
        sd[f"{prefix}.var"] = state[f"{ours}.bn.running_var"]
    sd["output.weight"], sd["output.bias"] = state["fc.weight"], state["fc.bias"]
    module.load_state_dict(sd)
    torch.jit.script(module.eval()).save(path)
    return path


def random_squeezenet_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """torchvision squeezenet1_1 state dict, He-scaled random convolutions, small biases."""
    g = torch.Generator().manual_seed(seed)
    net = torchvision_shim.squeezenet1_1()
    out = {}
    for k, v in net.state_dict().items():
        if k.endswith("weight"):
            out[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        else:
            out[k] = 0.05 * torch.randn(v.shape, generator=g)
    return out


def torchmetrics_squeeze_keys(state):
    """torchvision `features.{i}.*` -> torchmetrics SqueezeNet `slices.{s}.{i}.*`."""
    slice_of = {i: s for s, r in enumerate([range(2), range(2, 5), range(5, 8), range(8, 10),
                                             range(10, 11), range(11, 12), range(12, 13)])
                for i in r}
    out = {}
    for k, v in state.items():
        if k.startswith("features."):
            _, i, rest = k.split(".", 2)
            out[f"slices.{slice_of[int(i)]}.{i}.{rest}"] = v
    return out


def perturbed_lpips_lins(seed: int = 2) -> dict[str, torch.Tensor]:
    """torchmetrics' shipped squeeze.pth linear layers, each weight perturbed by +-10 %."""
    import torchmetrics.functional.image.lpips as tm

    path = os.path.join(os.path.dirname(tm.__file__), "lpips_models", "squeeze.pth")
    g = torch.Generator().manual_seed(seed)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v * (1 + 0.1 * (2 * torch.rand(v.shape, generator=g) - 1)) for k, v in state.items()}


def write_images(folder: str, names, size_hw, seed: int, ext: str = ".png") -> list[str]:
    """Smooth random RGB images (low-frequency colour fields + noise) saved as files."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size_hw
    paths = []
    for name in names:
        base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.float32)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        p = os.path.join(folder, name + ext)
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


# ---- franciszzj/VtonEval eval.py (copied: EvalDataset.resize / copy_resize_gt / pairing) ----

def vton_extract_id(filename):
    start_i = None
    for i, c in enumerate(filename):
        if c.isdigit():
            start_i = i
            break
    return filename[start_i:start_i + 8]


def vton_copy_resize_gt(gt_folder, height):
    new_folder = f"{gt_folder}_{height}"
    if not os.path.exists(new_folder):
        os.makedirs(new_folder, exist_ok=True)
    for file in os.listdir(gt_folder):
        if os.path.exists(os.path.join(new_folder, file)):
            continue
        img = Image.open(os.path.join(gt_folder, file))
        w, h = img.size
        new_w = int(w * height / h)
        img = img.resize((new_w, height), Image.LANCZOS)
        img.save(os.path.join(new_folder, file))
    return new_folder


def vton_resize(img, height):
    w, h = img.size
    new_w = int(w * height / h)
    return img.resize((new_w, height), Image.LANCZOS)

"""Evaluation the way the papers report it: `python -m leffa_jax.evaluate`.

    # paired (reconstruction) setting: FID, KID x1000, SSIM, LPIPS
    python -m leffa_jax.evaluate --pred results/vitonhd_paired --gt data/viton_hd/test/image \\
        --paired --json results/vitonhd_paired.json
    # unpaired setting: FID and KID only
    python -m leffa_jax.evaluate --pred results/vitonhd_unpaired --gt data/viton_hd/test/image
    # text-conditioned systems: CLIP-I (vs the paired GT) and CLIP-T (vs each image's caption)
    python -m leffa_jax.evaluate --pred results/mc --gt data/viton_hd/test/image --paired \\
        --metrics clip_i,clip_t --clip models/clip-vit-large-patch14 --captions captions.json

The conventions are those of the authors' evaluation code (VtonEval / CatVTON `eval.py`, see
docs/evaluation.md): the GT folder is Lanczos-resized to the predictions' height when the first
files' heights differ (and re-encoded, as VtonEval's copy is); clean-fid FID and KID x1000 (its
TorchScript Inception, PIL-bicubic float resize to 299); pytorch-fid FID (its Inception, bilinear
resize inside the network); with --paired, SSIM (torchmetrics, data_range 1) and LPIPS
(SqueezeNet, torchmetrics net_type="squeeze") over predictions matched to GT by the 8 characters
from the first digit of the file name. Weights come from the users' own files, found in the usual
caches (see leffa_jax.metrics.weights) or given by flag; nothing is downloaded.

Feature extraction is jitted and split over all local devices in batches; images stream from the
folders (only the 2048-d features stay in memory). Prints a table; --json writes the numbers
atomically. Errors exit with status 2 and one message.

The flow-EPE helpers of the attention (`flow_epe`, `probe_inputs`, ...) live in
`leffa_jax.metrics.flow_epe` and are re-exported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from leffa_jax.metrics.flow_epe import (  # noqa: F401  (re-exported API)
    attention_flows,
    endpoint_error,
    flow_epe,
    probe_inputs,
)

PAPER_METRICS = ("fid", "kid", "ssim", "lpips")  # the default set (paired; unpaired: FID, KID)
CLIP_METRICS = ("clip_i", "clip_t")  # never in the default set: they need --clip
METRICS = PAPER_METRICS + CLIP_METRICS
PAIRED_ONLY = ("ssim", "lpips")


def build_parser() -> argparse.ArgumentParser:
    from leffa_jax.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m leffa_jax.evaluate", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--pred", help="folder of generated images (folder mode)")
    p.add_argument("--gt", help="folder of ground-truth images (folder mode)")
    p.add_argument("--paired", action="store_true",
                   help="paired setting: also SSIM and LPIPS over id-matched pairs")
    p.add_argument("--unpaired", action="store_true",
                   help="--model mode: sample the unpaired test pairs (FID/KID only)")
    m = p.add_argument_group("--model mode: sample a dataset split first, then evaluate it")
    m.add_argument("--model", help="Leffa checkpoint (.pth/.safetensors with --base-config, or "
                                   "a leffa_jax checkpoint folder)")
    m.add_argument("--base-config", help="base model config (sd15-inpainting, sdxl-inpainting "
                                         "or a folder) for official checkpoints")
    m.add_argument("--dataset", choices=("viton_hd", "dresscode", "deepfashion"),
                   help="dataset layout of --data-root")
    m.add_argument("--data-root", help="dataset folder")
    m.add_argument("--category", default="upper_body",
                   help="DressCode category (upper_body, lower_body, dresses)")
    m.add_argument("--split", default="test", choices=("test", "train"), help="split to sample")
    m.add_argument("--out", help="folder for the samples (pred/), the FID reference set (gt/, "
                                 "links) and pairs.json")
    m.add_argument("--height", type=int, default=1024, help="sampling height")
    m.add_argument("--width", type=int, default=768, help="sampling width")
    m.add_argument("--steps", type=int, default=50, help="sampling steps")
    m.add_argument("--guidance", type=float, default=2.5, help="classifier-free guidance scale")
    m.add_argument("--seed", type=int, default=42, help="noise seed (+ batch start)")
    m.add_argument("--sample-batch-size", type=int, default=4, help="pairs per sampling call")
    m.add_argument("--limit", type=int, default=None, help="sample only the first N pairs")
    p.add_argument("--metrics", default=None,
                   help="comma list of fid,kid,ssim,lpips,clip_i,clip_t (default: fid,kid, plus "
                        "ssim,lpips with --paired; clip_i/clip_t only when named)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--batch-size", type=int, default=16, help="images per device batch step")
    p.add_argument("--inception", default=None,
                   help="pytorch-fid pt_inception-2015-12-05-*.pth (default: $TORCH_HOME cache)")
    p.add_argument("--clean-inception", default=None,
                   help="clean-fid inception-2015-12-05.pt (default: /tmp, ., $TORCH_HOME)")
    p.add_argument("--squeezenet", default=None,
                   help="torchvision squeezenet1_1-*.pth (default: $TORCH_HOME cache)")
    p.add_argument("--lpips-lins", default=None,
                   help="LPIPS squeeze.pth linear layers (default: from the installed "
                        "torchmetrics or lpips package)")
    p.add_argument("--clip", default=None,
                   help="CLIP-I/CLIP-T: a transformers CLIPModel folder (config.json, "
                        "model.safetensors or pytorch_model.bin, preprocessor_config.json; for "
                        "clip_t also vocab.json, merges.txt, tokenizer_config.json), e.g. "
                        "openai/clip-vit-large-patch14")
    p.add_argument("--captions", default=None,
                   help="CLIP-T: captions of the predictions, JSON {file name: caption} or "
                        "[{\"file_name\", \"text\"}], JSON lines, or lines 'name<TAB>caption' / "
                        "'name,caption'; keyed by the prediction's relative path, file name or "
                        "stem (or, with --paired, its ground truth's file name or stem)")
    p.add_argument("--kid-seed", type=int, default=0,
                   help="seed of KID's random subsets (clean-fid uses numpy's unseeded RNG)")
    p.add_argument("--no-shard", action="store_true", help="run on one device only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _metrics(args) -> list[str]:
    from leffa_jax.cli import UsageError

    if args.metrics is None:
        return list(PAPER_METRICS) if args.paired else ["fid", "kid"]
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise UsageError(f"--metrics: unknown {bad}; choose from {','.join(METRICS)}")
    if not args.paired and any(m in PAIRED_ONLY for m in names):
        raise UsageError("--metrics ssim/lpips compare matched pairs: add --paired")
    if not args.paired and "clip_i" in names:
        raise UsageError("--metrics clip_i compares each prediction with its ground truth: "
                         "add --paired")
    clip = [m for m in names if m in CLIP_METRICS]
    if clip and not args.clip:
        raise UsageError(f"--metrics {','.join(clip)} needs --clip DIR, a transformers "
                         "CLIPModel folder (e.g. openai/clip-vit-large-patch14)")
    if clip and not os.path.isdir(args.clip):
        raise UsageError(f"--clip {args.clip} is not a folder (give a transformers CLIPModel "
                         "folder, e.g. openai/clip-vit-large-patch14)")
    if "clip_t" in names and not args.captions:
        raise UsageError("--metrics clip_t needs --captions FILE (per-image captions, see --help)")
    if "clip_t" in names and not os.path.isfile(args.captions):
        raise UsageError(f"--captions {args.captions} is not a file")
    return names


def _check_folder(path: str, flag: str) -> None:
    from leffa_jax.cli import UsageError

    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is not a folder")


def write_json_atomically(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def evaluate_folders(pred: str, gt: str, *, paired: bool, metrics: Sequence[str],
                     batch_size: int = 16, weight_paths: dict | None = None, kid_seed: int = 0,
                     shard: bool = True, progress: bool = True,
                     return_features: bool = False,
                     pairs: Sequence[tuple[str, str]] | None = None,
                     clip: str | None = None, captions: dict[str, str] | None = None) -> dict:
    """The numbers `python -m leffa_jax.evaluate` prints, as a dict (see the module doc);
    `return_features` adds the Inception features and per-pair scores under "features";
    `pairs` [(gt_path, pred_path)] replaces VtonEval's id matching for the paired metrics;
    `clip` (a CLIPModel folder) and `captions` ({name: caption}) serve clip_i / clip_t."""
    from leffa_jax.cli import UsageError, progress_bar
    from leffa_jax.metrics import extract, fid, kid, weights
    from leffa_jax.metrics import images as img_lib

    w = weight_paths or {}
    height = img_lib.vton_first_height(pred)
    resize_gt = img_lib.vton_first_height(gt) != height

    def gt_rgb(path):
        if resize_gt:
            return np.asarray(img_lib.vton_resized_gt(path, height).convert("RGB"))
        return img_lib.load_rgb(path)

    out: dict = {"pred": pred, "gt": gt, "paired": paired, "height": height,
                 "gt_resized_to_height": resize_gt, "metrics": {}, "counts": {}}

    def bar(total, desc):
        return progress_bar(total, desc, enabled=progress)

    if "fid" in metrics or "kid" in metrics:
        clean = weights.load_inception(w.get("clean_inception"), clean=True)
        run = extract.inception_runners(clean, shard=shard)["clean_fid"]
        feats = {}
        for name, folder, load in (
                ("gt", gt, lambda p: img_lib.clean_fid_resize(gt_rgb(p))),
                ("pred", pred, extract.load_clean_fid)):
            files = img_lib.clean_fid_files(folder)
            if len(files) < 2:
                raise UsageError(f"{folder}: FID/KID need at least 2 images, found {len(files)}")
            with bar(len(files), f"clean-fid {name}") as b:
                feats[name] = extract.stream(files, load, run, batch_size, b.update)
            out["counts"][f"clean_fid_{name}"] = len(files)
        if return_features:
            out.setdefault("features", {}).update({f"clean_fid_{k}": v for k, v in feats.items()})
        if "fid" in metrics:
            out["metrics"]["clean_fid"] = fid.fid(feats["gt"], feats["pred"])
        if "kid" in metrics:
            out["metrics"]["clean_kid_x1000"] = 1000 * kid.kernel_distance(
                feats["gt"], feats["pred"], seed=kid_seed)
        del clean, run, feats
    if paired and any(m in metrics for m in PAIRED_ONLY):
        unmatched: list = []
        if pairs is None:
            pairs, unmatched = img_lib.vton_pairs(gt, pred)
        if not pairs:
            raise UsageError(f"--paired: no prediction in {pred} matches a file of {gt} by id "
                             "(the 8 characters from the first digit of the name)")
        lp = weights.load_lpips(w.get("squeezenet"), w.get("lpips_lins")) if "lpips" in metrics \
            else None
        runner = extract.paired_runner(lp, shard=shard)

        def load_pair(pair):
            g, p = pair
            gi = (img_lib.vton_resized_gt(g, height) if img_lib.image_height(g) != height
                  else _open(g))
            gi = np.asarray(img_lib.to_height(gi, height).convert("RGB"), np.float32) / 255
            pi = np.asarray(img_lib.to_height(_open(p), height).convert("RGB"), np.float32) / 255
            if gi.shape != pi.shape:
                raise UsageError(f"{p} and its ground truth {g} differ in size after resizing to "
                                 f"height {height}: {pi.shape} vs {gi.shape}")
            return pi, gi

        scores = []
        with bar(len(pairs), "paired") as b:
            for group in img_lib.batches(extract.prefetch(pairs, load_pair), batch_size,
                                         key=lambda pg: pg[0].shape):
                scores.append(runner(np.stack([x[0] for x in group]),
                                     np.stack([x[1] for x in group])))
                b.update(len(group))
        scores = np.concatenate(scores)
        if return_features:
            out.setdefault("features", {})["paired_ssim_lpips"] = scores
        if "ssim" in metrics:
            out["metrics"]["ssim"] = float(scores[:, 0].mean())
        if "lpips" in metrics:
            out["metrics"]["lpips"] = float(scores[:, 1].mean())
        out["counts"]["pairs"] = len(pairs)
        out["counts"]["unmatched_predictions"] = len(unmatched)
    if any(m in metrics for m in CLIP_METRICS):
        out["metrics"].update(_clip_metrics(
            pred, gt, height, metrics, clip, captions, pairs if paired else None, paired,
            batch_size, shard, bar, out["counts"]))
    if "fid" in metrics:
        model = weights.load_inception(w.get("inception"))
        run = extract.inception_runners(model, shard=shard)["pytorch_fid"]
        feats = {}
        for name, folder, load in (
                ("gt", gt, lambda p: gt_rgb(p).astype(np.float32) / np.float32(255)),
                ("pred", pred, extract.load_pytorch_fid)):
            files = img_lib.pytorch_fid_files(folder)
            if len(files) < 2:
                raise UsageError(f"{folder}: pytorch-fid needs at least 2 images at the top level, "
                                 f"found {len(files)}")
            with bar(len(files), f"pytorch-fid {name}") as b:
                feats[name] = extract.stream(files, load, run, batch_size, b.update)
        if return_features:
            out.setdefault("features", {}).update({f"pytorch_fid_{k}": v for k, v in feats.items()})
        out["metrics"]["pytorch_fid"] = fid.fid(feats["gt"].astype(np.float64),
                                                feats["pred"].astype(np.float64))
    return out


def _clip_metrics(pred, gt, height, metrics, folder, captions, pairs, paired, batch_size, shard,
                  bar, counts) -> dict:
    """CLIP-I over the id-matched pairs (GT prepared as for SSIM/LPIPS) and CLIP-T over the
    predictions (see leffa_jax.metrics.clip_eval)."""
    from leffa_jax.cli import UsageError
    from leffa_jax.metrics import clip_eval
    from leffa_jax.metrics import images as img_lib

    if not folder:
        raise UsageError("--metrics clip_i/clip_t need --clip DIR (a transformers CLIPModel folder)")
    if paired and pairs is None:
        pairs, _ = img_lib.vton_pairs(gt, pred)
    if "clip_t" in metrics:  # every caption found before any work
        gt_of = {p: g for g, p in pairs} if pairs else {}
        files = [p for _, p in pairs] if pairs else img_lib.clean_fid_files(pred)
        if not files:
            raise UsageError(f"{pred}: no images for CLIP-T")
        texts = [clip_eval.caption_for(captions or {}, p, pred, gt_of.get(p)) for p in files]
        missing = [os.path.relpath(p, pred) for p, t in zip(files, texts, strict=True) if t is None]
        if missing:
            raise UsageError(f"--captions: no caption for {len(missing)} of {len(files)} "
                             f"predictions, e.g. {', '.join(missing[:3])} (key them by the "
                             "prediction's file name or stem, or its ground truth's with --paired)")
    try:
        models = clip_eval.ClipModels(folder, text="clip_t" in metrics, shard=shard)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--clip {folder}: {e}") from None
    res = {}
    if "clip_i" in metrics:
        if not pairs:
            raise UsageError(f"--paired: no prediction in {pred} matches a file of {gt} by id "
                             "(the 8 characters from the first digit of the name)")

        def gt_image(g):
            def prepare(img):
                if img.height != height:
                    img = img_lib.vton_resized_gt(g, height)
                return img_lib.to_height(img, height)
            return clip_eval.load_image(g, prepare)

        to_h = lambda img: img_lib.to_height(img, height)
        with bar(2 * len(pairs), "CLIP-I") as b:
            e_pred = models.image_embeddings([p for _, p in pairs],
                                             lambda p: clip_eval.load_image(p, to_h),
                                             batch_size, b.update)
            e_gt = models.image_embeddings([g for g, _ in pairs], gt_image, batch_size, b.update)
        res["clip_i"] = float(clip_eval.cosines(e_pred, e_gt).mean())
        counts["clip_i_pairs"] = len(pairs)
    if "clip_t" in metrics:
        with bar(len(files), "CLIP-T") as b:
            e_img = models.image_embeddings(files, clip_eval.load_image, batch_size, b.update)
        e_txt = models.text_embeddings(texts, batch_size)
        cos = clip_eval.cosines(e_img, e_txt)
        res["clip_t"] = float(np.mean(100 * np.maximum(cos, 0)))
        res["clip_t_cosine"] = float(cos.mean())  # JSON only: the unclipped mean cosine
        counts["clip_t_images"] = len(files)
    return res


def _open(path):
    from PIL import Image

    img = Image.open(path)
    img.load()
    return img


def table(result: dict) -> str:
    names = {"clean_fid": "Clean-FID", "clean_kid_x1000": "Clean-KID(x1000)", "ssim": "SSIM",
             "lpips": "LPIPS", "pytorch_fid": "PyTorch-FID", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
    keys = [k for k in names if k in result["metrics"]]
    head = [names[k] for k in keys]
    row = [f"{result['metrics'][k]:.4f}" for k in keys]
    widths = [max(len(a), len(b)) for a, b in zip(head, row, strict=True)]
    line = "+" + "+".join("-" * (n + 2) for n in widths) + "+"
    fmt = lambda cells: "| " + " | ".join(c.rjust(n) for c, n in zip(cells, widths, strict=True)) + " |"
    return "\n".join([f"GT Folder  : {result['gt']}", f"Pred Folder: {result['pred']}", line,
                      fmt(head), line, fmt(row), line])


def sample_split(checkpoint: str, base_config: str | None, dataset: str, root: str, out: str, *,
                 split: str = "test", mode: str = "paired", category: str = "upper_body",
                 height: int = 1024, width: int = 768, steps: int = 50, guidance: float = 2.5,
                 seed: int = 42, batch_size: int = 4, limit: int | None = None,
                 progress: bool = True) -> dict:
    """Sample a dataset split through the Grain pipeline (`leffa_jax.data.pipeline`: the
    training-time preparation, masks included, no flip, in order) and `pipeline.generate`.

    Writes `out/pred/<person>__<garment>.png` and `out/gt/`: links to the FID reference set (the
    split's person images; for DeepFashion, the paper's protocol: all training images), and
    `out/pairs.json` [(gt person file, prediction)]. Returns {"pred", "gt", "pairs"}."""
    from leffa_jax import imageio
    from leffa_jax import pipeline as pl
    from leffa_jax.cli import progress_bar
    from leffa_jax.data import config as data_config
    from leffa_jax.data import pipeline as data_pipeline
    from leffa_jax.model import LeffaModel

    cfg = data_config.default_data_config()
    cfg.name, cfg.root, cfg.split, cfg.mode = dataset, root, split, mode
    cfg.height, cfg.width, cfg.category = height, width, category
    cfg.batch_size, cfg.flip_prob, cfg.shuffle, cfg.drop_remainder = batch_size, 0.0, False, False
    cfg.num_epochs = 1
    source = data_pipeline.make_source(cfg, split)
    ds = data_pipeline.make_dataset(cfg, split, process_index=0, process_count=1, source=source)
    if os.path.isdir(checkpoint):
        model = LeffaModel.from_pretrained(checkpoint)
    else:
        from leffa_jax.weights.base_configs import resolve_base_config

        if not base_config:
            raise ValueError(f"{checkpoint} is an official checkpoint file: pass --base-config")
        model = LeffaModel.from_pretrained(checkpoint, resolve_base_config(base_config))
    pred_dir, gt_dir = os.path.join(out, "pred"), os.path.join(out, "gt")
    os.makedirs(pred_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    total = len(source) if limit is None else min(limit, len(source))
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]
    pairs: list[tuple[str, str]] = []
    with progress_bar(total, f"sampling {dataset} {split} {mode}", enabled=progress) as bar:
        for batch in ds:
            n = min(len(batch["index"]), total - len(pairs))
            full = {k: np.concatenate([batch[k], np.repeat(batch[k][-1:],
                                                         batch_size - len(batch[k]), 0)])
                    for k in ("person", "garment", "mask", "densepose")}  # one program
            res = pl.generate(model, full["person"], full["garment"], full["mask"],
                              full["densepose"], steps=steps, guidance=guidance,
                              seed=seed + len(pairs))
            for j in range(n):
                files = source.files(int(batch["index"][j]))
                path = os.path.join(pred_dir, f"{stem(files['person'])}__{stem(files['garment'])}.png")
                imageio.save_png(path, np.asarray(res.images[j]))
                pairs.append((files["person"], path))
            bar.update(n)
            if len(pairs) >= total:
                break
    if dataset == "deepfashion":  # FID against the training images (the paper's protocol)
        train = data_pipeline.make_source(cfg, "train")
        reference = sorted({train.files(i)[k] for i in range(len(train))
                            for k in ("person", "garment")})
    else:
        reference = sorted({source.files(i)["person"] for i in range(len(source))})
    for f in reference:
        link = os.path.join(gt_dir, os.path.basename(f))
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(f), link)
    write_json_atomically(os.path.join(out, "pairs.json"), {"pairs": pairs})
    return {"pred": pred_dir, "gt": gt_dir, "pairs": pairs}


def run(args) -> dict:
    from leffa_jax.cli import UsageError, positive_multiple

    pairs = None
    if args.model:
        missing = [f for f, v in (("--dataset", args.dataset), ("--data-root", args.data_root),
                                  ("--out", args.out)) if not v]
        if missing:
            raise UsageError(f"--model needs {', '.join(missing)}")
        if args.paired == args.unpaired:
            raise UsageError("--model: choose one of --paired / --unpaired")
        if args.pred or args.gt:
            raise UsageError("--model samples its own predictions: drop --pred/--gt")
    else:
        if not (args.pred and args.gt):
            raise UsageError("give --pred and --gt folders (or --model ... to sample a split)")
        _check_folder(args.pred, "--pred")
        _check_folder(args.gt, "--gt")
    positive_multiple("--batch-size", args.batch_size, 1)
    metrics = _metrics(args)
    captions = None
    if "clip_t" in metrics:
        from leffa_jax.data.garment_text import read_captions

        try:
            captions = read_captions(args.captions)
        except ValueError as e:
            raise UsageError(f"--captions: {e}") from None
    if args.json:
        from leffa_jax.cli import check_output_folder

        if os.path.isdir(args.json):
            raise UsageError(f"--json {args.json} is a folder: give a file name")
        check_output_folder(os.path.dirname(os.path.abspath(args.json)), "--json")
    if args.model:
        positive_multiple("--sample-batch-size", args.sample_batch_size, 1)
        sampled = sample_split(
            args.model, args.base_config, args.dataset, args.data_root, args.out,
            split=args.split, mode="paired" if args.paired else "unpaired",
            category=args.category, height=args.height, width=args.width, steps=args.steps,
            guidance=args.guidance, seed=args.seed, batch_size=args.sample_batch_size,
            limit=args.limit, progress=not args.no_progress)
        args.pred, args.gt, pairs = sampled["pred"], sampled["gt"], sampled["pairs"]
    result = evaluate_folders(
        args.pred.rstrip("/"), args.gt.rstrip("/"), paired=args.paired, metrics=metrics, pairs=pairs,
        batch_size=args.batch_size, kid_seed=args.kid_seed, shard=not args.no_shard,
        progress=not args.no_progress, clip=args.clip, captions=captions,
        weight_paths={"inception": args.inception, "clean_inception": args.clean_inception,
                      "squeezenet": args.squeezenet, "lpips_lins": args.lpips_lins})
    print(table(result))
    if args.json:
        write_json_atomically(args.json, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from leffa_jax.cli import run_reporting_errors

    args = build_parser().parse_args(argv)
    return run_reporting_errors(run, args, lambda r: f"wrote {args.json}" if args.json else "",
                                program="leffa_jax.evaluate")


if __name__ == "__main__":
    sys.exit(main())

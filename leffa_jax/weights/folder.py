"""The leffa_jax checkpoint folder: what `save_flax_checkpoint` writes and every loader reads.

    leffa_jax.json            format marker and the components:
                              {name: {"kind", "config", <recorded build options>}}
    config/<folder>/...json   each component's config folder, and scheduler/, from the base
    params.safetensors        '<component>.<flax path>', e.g. `unet.conv_in.kernel`
    orbax/                    (optional) the same tree as an Orbax checkpoint
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping

import numpy as np

from leffa_jax import components as components_lib
from leffa_jax.components import Component
from leffa_jax.weights import outputs
from leffa_jax.weights.modules import flat_to_nested, nested_to_flat
from leffa_jax.weights.tensor_io import (
    CheckpointError,
    CheckpointNotFoundError,
    LazyTensor,
    TensorSource,
    materialise,
    write_safetensors,
)

FORMAT_NAME = "leffa_jax"
FORMAT_VERSION = 1
META_FILE = "leffa_jax.json"
CONFIG_FOLDER = "config"  # base configs inside a checkpoint folder
FORMATS = ("safetensors", "orbax")
# Weightless folders of a base model copied beside the components' configs, when present.
COPIED_FOLDERS = ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor")


def component_entry(component: Component) -> dict:
    """The leffa_jax.json entry of a component: kind, config folder, recorded build options."""
    kind = components_lib.kind_of(component)
    return {"kind": kind.name, "config": component.config_folder,
            **{name: component.options.get(name) for name in kind.options}}


def checkpoint_components(meta: Mapping) -> dict[str, Component]:
    """leffa_jax.json's components as Components (version-1 entries lack "config": the kind's
    folder is used)."""
    out = {}
    for name, entry in meta["components"].items():
        kind = components_lib.kind_of(entry["kind"])
        options = {k: entry[k] for k in kind.options if entry.get(k) is not None}
        out[name] = Component(name, kind.name, entry.get("config"), options)
    return out


def copy_configs(config_dir: str, out_dir: str, folders: Iterable[str]) -> None:
    """Copy the components' config folders, `COPIED_FOLDERS` and model_index.json; the
    scheduler config of a base config folder gets an explicit `rescale_betas_zero_snr` (the
    official code decides it from the base folder's NAME, which the copy loses). A diffusers
    pipeline folder (with model_index.json) is copied as it is: its scheduler config is what
    diffusers samples it with."""
    from leffa_jax.schedulers import uses_zero_terminal_snr

    for folder in sorted(set(folders) | set(COPIED_FOLDERS)):
        src = os.path.join(config_dir, folder)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out_dir, CONFIG_FOLDER, folder), dirs_exist_ok=True)
    if os.path.isfile(os.path.join(config_dir, "model_index.json")):
        shutil.copy(os.path.join(config_dir, "model_index.json"), os.path.join(out_dir, CONFIG_FOLDER))
    scheduler = os.path.join(out_dir, CONFIG_FOLDER, "scheduler", "scheduler_config.json")
    if os.path.exists(scheduler):
        with open(scheduler) as f:
            config = json.load(f)
        pipeline = os.path.isfile(os.path.join(config_dir, "model_index.json"))
        if "rescale_betas_zero_snr" not in config and not pipeline:
            config["rescale_betas_zero_snr"] = uses_zero_terminal_snr(config_dir)
            with open(scheduler, "w") as f:
                json.dump(config, f, indent=2)


def check_formats(formats: Iterable[str] | str) -> list[str]:
    """The chosen output formats (a list, or a comma list as the CLI takes): at least one of
    FORMATS, no unknown ones."""
    if isinstance(formats, str):
        formats = formats.split(",")
    chosen = sorted({f.strip() for f in formats if f.strip()})
    if not chosen:
        raise CheckpointError(f"no output format given: choose one or more of {', '.join(FORMATS)}"
                              " (e.g. --formats safetensors); a checkpoint needs its weights")
    unknown = sorted(set(chosen) - set(FORMATS))
    if unknown:
        raise CheckpointError(f"unknown output formats {unknown}: choose from {', '.join(FORMATS)}")
    return chosen


def check_save(out_dir: str, formats: Iterable[str] | str, sources=(), overwrite: bool = False
               ) -> list[str]:
    """Everything `save_flax_checkpoint` checks, for callers to run before any other work;
    -> the formats."""
    formats = check_formats(formats)
    outputs.check_output_folder(out_dir, sources, overwrite, META_FILE)
    return formats


def save_flax_checkpoint(out_dir: str, params: Mapping[str, LazyTensor | np.ndarray],
                         config_dir: str, components: Iterable[Component],
                         formats: Iterable[str] = ("safetensors",), *, overwrite: bool = False,
                         sources: Iterable[str] = (),
                         extra_meta: Mapping | None = None) -> dict[str, dict]:
    """Write a leffa_jax checkpoint folder. `params` maps '<component>.<flax path>' to arrays
    (or LazyTensors, for streaming); `config_dir` is the base model folder. `out_dir` must be new
    or empty, or with `overwrite` an existing checkpoint folder (replaced as a whole); it must not
    overlap `sources` (files the params are read from). Written into a temporary sibling and
    swapped in, so a failure leaves `out_dir` as it was. `extra_meta`: further top-level
    leffa_jax.json entries (e.g. "resolution"). Returns the components' leffa_jax.json entries."""
    formats = check_save(out_dir, formats, sources, overwrite)
    components = list(components)
    entries = {c.name: component_entry(c) for c in components}
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "components": entries,
            "files": formats}
    clash = set(extra_meta or {}) & set(meta)
    if clash:
        raise ValueError(f"extra_meta may not replace leffa_jax.json's {sorted(clash)}")
    meta.update(extra_meta or {})

    def write(folder: str) -> None:
        copy_configs(config_dir, folder, [c.config_folder for c in components])
        if "safetensors" in formats:
            write_safetensors(os.path.join(folder, "params.safetensors"), list(params.items()),
                              metadata={"format": FORMAT_NAME})
        if "orbax" in formats:
            _save_orbax(os.path.abspath(os.path.join(folder, "orbax")), params)
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    outputs.write_folder_atomically(out_dir, write)
    return entries


def _save_orbax(target: str, params: Mapping) -> None:
    import orbax.checkpoint as ocp

    tree = _stringify_keys(flat_to_nested({k: materialise(v) for k, v in params.items()}))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, tree)
    checkpointer.wait_until_finished()


def _stringify_keys(tree):
    return {str(k): _stringify_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _not_a_checkpoint(path: str) -> str:
    """Why `path` is not a leffa_jax checkpoint folder, and what to give instead."""
    if not os.path.exists(path):
        return f"checkpoint {path} does not exist"
    export = os.path.join(path, "export")
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(export):
        if os.path.isfile(os.path.join(export, META_FILE)):
            return (f"{path} is a training workdir, not a checkpoint: give its exported model "
                    f"{export}")
        return (f"{path} is a training workdir without an exported model yet: {export} is "
                "written when training reaches train.steps (resume the run to finish it)")
    return (f"{path} is not a leffa_jax checkpoint (no {META_FILE}); convert an official "
            "checkpoint with `python -m leffa_jax.convert to-flax`")


def read_meta(path: str) -> dict:
    """leffa_jax.json of a checkpoint folder, checked (errors name the file)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise (CheckpointError if os.path.exists(path) else CheckpointNotFoundError)(
            _not_a_checkpoint(path))
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}): the checkpoint folder is "
                              "damaged; convert or export it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: format {found!r} is not {FORMAT_NAME}")
    table = meta.get("components")
    if not isinstance(table, dict) or not all(
            isinstance(e, dict) and "kind" in e for e in table.values()):
        raise CheckpointError(f"{meta_path}: no valid 'components' table (name -> {{kind, "
                              "config, ...}}); convert or export the checkpoint again")
    return meta


def read_flax_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (meta, {'<component>.<flax path>': array}). Reads params.safetensors, else orbax/."""
    path = os.fspath(path)
    meta = read_meta(path)
    safetensors_path = os.path.join(path, "params.safetensors")
    if os.path.exists(safetensors_path):
        source = TensorSource(safetensors_path)
        return meta, {k: source[k] for k in source.keys()}
    orbax_dir = os.path.join(path, "orbax")
    if os.path.isdir(orbax_dir):
        import orbax.checkpoint as ocp

        try:
            tree = ocp.StandardCheckpointer().restore(os.path.abspath(orbax_dir))
        except Exception as e:
            raise CheckpointError(f"{orbax_dir}: cannot restore Orbax checkpoint ({e})") from None
        return meta, {k: np.asarray(v) for k, v in nested_to_flat(tree).items()}
    raise CheckpointError(f"{path}: neither params.safetensors nor orbax/ is present")


def split_params(flat: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """{flax path: array} of one component from '<component>.<flax path>' names."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}

"""Plans: how the tensors of an official file layout become components, checked strictly before
any data is read, and conversions that stream a plan into a leffa_jax checkpoint and back.

Layouts:
    prefixed file    one state dict, '<component>.<torch key>' (the official Leffa `.pth`,
                     components `components.LEFFA`): `plan_prefixed`
    diffusers folder one subfolder per component with config.json and its weights
                     (`components.DIFFUSERS_FOLDER`): `plan_folder`
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from leffa_jax import components as components_lib
from leffa_jax.components import Component
from leffa_jax.weights import folder as folder_lib
from leffa_jax.weights import outputs
from leffa_jax.weights.base_configs import resolve_base_config
from leffa_jax.weights.leaf_rules import apply_to_shape
from leffa_jax.weights.modules import check_keys, expected_params
from leffa_jax.weights.tensor_io import (
    CheckpointError,
    LazyTensor,
    TensorSource,
    write_safetensors,
    write_torch,
)


@dataclasses.dataclass
class Plan:
    """A checked conversion: per component its spec (build options found in the tensors), its
    TensorSource and {flax path: torch key}; `config_dir` is the base model folder."""

    config_dir: str
    components: dict[str, Component]
    sources: dict[str, TensorSource]
    keys: dict[str, dict[str, str]]

    def _read(self, name: str, key: str) -> np.ndarray:
        rule = components_lib.kind_of(self.components[name]).torch_to_flax
        return rule(key, self.sources[name][key])[1]

    def lazy_params(self) -> dict[str, LazyTensor]:
        """'<component>.<flax path>' -> LazyTensor (read and transposed when written)."""
        out = {}
        for name, mapping in self.keys.items():
            rule = components_lib.kind_of(self.components[name]).torch_to_flax
            source = self.sources[name]
            for path, key in mapping.items():
                _, shape = apply_to_shape(rule, key, source.shape(key))
                out[f"{name}.{path}"] = LazyTensor(shape, source.numpy_dtype(key),
                                                   lambda n=name, k=key: self._read(n, k))
        return out

    def read_params(self) -> dict[str, np.ndarray]:
        """'<component>.<flax path>' -> array, read tensor by tensor."""
        return {f"{name}.{path}": self._read(name, key)
                for name, mapping in self.keys.items() for path, key in mapping.items()}


def _options_from_tensors(component: Component, shapes: dict[str, tuple[int, ...]], where: str,
                          what: str) -> Component:
    """The component with the build options its tensors give; an option the system fixes (e.g.
    the Leffa generative UNet's 12 input channels) must match what the tensors give."""
    found = components_lib.kind_of(component).options_from_tensors(shapes)
    for option, value in found.items():
        want = component.options.get(option)
        if want is not None and want != value:
            inputs = f" ({component.inputs})" if component.inputs else ""
            raise CheckpointError(
                f"{where}: its tensors give {option}={value}, but {what} has a "
                f"{component.role or component.name} {component.kind} '{component.name}' with "
                f"{option}={want}{inputs}: is this a checkpoint of another model?")
    return components_lib.with_options(component, **found)


def _plan_component(component: Component, source: TensorSource, keys: Sequence[str],
                    prefix: str, config_dir: str, where: str, what: str
                    ) -> tuple[Component, dict[str, str]]:
    """Check one component's tensors against its config, in the file's own names and layout;
    -> (component with the build options found in the tensors, {flax path: file key})."""
    kind = components_lib.kind_of(component)
    canonical = {}  # canonical torch key (the leaf rules' names) -> file key; buffers dropped
    for k in keys:
        name = kind.canonical_key(k[len(prefix):])
        if name is not None:
            canonical[name] = k
    shapes = {name: source.shape(k) for name, k in canonical.items()}
    component = _options_from_tensors(component, shapes, where, what)
    want = {}
    for path, (shape, _) in expected_params(component, config_dir).items():
        key, torch_shape = apply_to_shape(kind.flax_to_torch, path, shape)
        want[prefix + key] = torch_shape
    check_keys({prefix + name: shape for name, shape in shapes.items()}, want, where)
    mapping = {apply_to_shape(kind.torch_to_flax, name, shape)[0]: canonical[name]
               for name, shape in shapes.items()}
    return component, mapping


def _split_by_prefix(source: TensorSource, names: Sequence[str], what: str
                     ) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in names}
    stray = []
    for key in source.keys():
        name = key.split(".", 1)[0]
        (out[name] if name in out else stray).append(key)
    if stray:
        raise CheckpointError(f"{source.path}: {len(stray)} keys outside the components "
                              f"{sorted(out)}: {stray[:8]}")
    for name, keys in out.items():
        if not keys:
            raise CheckpointError(f"{source.path}: no '{name}.*' tensors; {what} has "
                                  f"{sorted(names)}")
    return out


def plan_prefixed(path: str, config_dir: str,
                  system: Sequence[Component] = components_lib.LEFFA,
                  what: str = "an official Leffa checkpoint") -> Plan:
    """A single state dict with '<component>.' key prefixes (default: the official Leffa file)
    checked against the base config folder."""
    config_dir = resolve_base_config(config_dir)
    source = TensorSource(path)
    split = _split_by_prefix(source, [c.name for c in system], what)
    plan = Plan(config_dir, {}, {}, {})
    for component in system:
        where = f"{path} [{component.name}] with base config {config_dir}"
        checked, mapping = _plan_component(component, source, split[component.name],
                                           component.name + ".", config_dir, where, what)
        plan.components[component.name], plan.sources[component.name] = checked, source
        plan.keys[component.name] = mapping
    return plan


def find_weights(subfolder: str, names: Sequence[str] = components_lib.DIFFUSERS_WEIGHT_FILES,
                 layout: Sequence[Component] = components_lib.DIFFUSERS_FOLDER) -> str:
    """The weights file of a diffusers model subfolder (first of `names` present)."""
    if not os.path.isdir(subfolder):
        folders = " and ".join(f"{c.config_folder}/" for c in layout if not c.optional)
        raise CheckpointError(f"{subfolder} not found: a diffusers folder has {folders} "
                              "subfolders")
    for name in names:
        path = os.path.join(subfolder, name)
        if os.path.exists(path):
            return path
    raise CheckpointError(f"{subfolder}: none of {list(names)} found")


def plan_folder(folder: str, layout: Sequence[Component] = components_lib.DIFFUSERS_FOLDER
                ) -> Plan:
    """A diffusers-format folder: each component from its own subfolder (config.json + weights)."""
    plan = Plan(folder, {}, {}, {})
    for component in layout:
        subfolder = os.path.join(folder, component.config_folder)
        if component.optional and not os.path.isdir(subfolder):
            continue
        weights = find_weights(subfolder, components_lib.kind_of(component).weight_files, layout)
        source = TensorSource(weights)
        where = f"{weights} with config {subfolder}/config.json"
        checked, mapping = _plan_component(component, source, source.keys(), "", folder, where,
                                           "a diffusers folder")
        plan.components[component.name], plan.sources[component.name] = checked, source
        plan.keys[component.name] = mapping
    return plan


# ----------------------------------------------------------------------------- conversions

def save_plan(plan: Plan, out_dir: str, formats: Iterable[str] = ("safetensors",), *,
              overwrite: bool = False, sources: Iterable[str] = ()) -> dict:
    """Stream a plan into a leffa_jax checkpoint folder; -> the components' entries."""
    sources = [*sources, plan.config_dir, *(s.path for s in plan.sources.values())]
    return folder_lib.save_flax_checkpoint(out_dir, plan.lazy_params(), plan.config_dir,
                                           plan.components.values(), formats,
                                           overwrite=overwrite, sources=sources)


def official_to_flax(checkpoint: str, config_dir: str, out_dir: str,
                     formats: Iterable[str] = ("safetensors",), *, overwrite: bool = False) -> dict:
    """Official Leffa `.pth`/`.safetensors` + base config folder (or a bundled name, see
    `base_configs`) -> leffa_jax checkpoint. The output is checked before any work: new or
    empty, or with `overwrite` an existing checkpoint folder, replaced as a whole."""
    config_dir = resolve_base_config(config_dir)
    formats = folder_lib.check_save(out_dir, formats, [checkpoint, config_dir], overwrite)
    return save_plan(plan_prefixed(checkpoint, config_dir), out_dir, formats, overwrite=overwrite)


def diffusers_to_flax(folder: str, out_dir: str, formats: Iterable[str] = ("safetensors",), *,
                      overwrite: bool = False) -> dict:
    """diffusers-format model folder (unet/, vae/ and the text_encoder/, text_encoder_2/,
    image_encoder/ present; `components.DIFFUSERS_PIPELINE`) -> leffa_jax checkpoint with those
    components (tokenizer folders are copied with the configs). `LeffaModel.from_pretrained` on
    an inpainting one initialises Leffa from it (see `LeffaModel.from_sd_inpainting`)."""
    formats = folder_lib.check_save(out_dir, formats, [folder], overwrite)
    plan = plan_folder(folder, components_lib.DIFFUSERS_PIPELINE)
    return save_plan(plan, out_dir, formats, overwrite=overwrite, sources=[folder])


def flax_to_torch_state(checkpoint_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """leffa_jax checkpoint -> ('<component>.<torch key>', array) in the original names, shapes
    and dtypes (each component through its kind's leaf rule)."""
    meta, flat = folder_lib.read_flax_checkpoint(checkpoint_dir)
    components = folder_lib.checkpoint_components(meta)
    for name, array in flat.items():
        component_name, path = name.split(".", 1)
        if component_name not in components:
            raise CheckpointError(f"{checkpoint_dir}: parameter {name} belongs to no component "
                                  f"of {folder_lib.META_FILE} ({sorted(components)})")
        rule = components_lib.kind_of(components[component_name]).flax_to_torch
        key, tensor = rule(path, array)
        yield f"{component_name}.{key}", np.ascontiguousarray(tensor)


TORCH_OUTPUTS = (".pth", ".pt", ".bin", ".safetensors")


def flax_to_torch(checkpoint_dir: str, out_path: str) -> int:
    """Write a PyTorch state dict (`.pth` via torch.save, or `.safetensors`) that the official
    code loads (`model.load_state_dict(torch.load(path))`). Returns the tensor count. The output
    is checked first: its folder exists and is writable, it is not inside the checkpoint."""
    outputs.check_output_file(out_path, [checkpoint_dir], TORCH_OUTPUTS)
    writer = write_safetensors if out_path.endswith(".safetensors") else write_torch
    items = list(flax_to_torch_state(checkpoint_dir))
    writer(out_path, items)
    return len(items)

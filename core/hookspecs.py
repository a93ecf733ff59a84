"""The hook catalogue of sora-export: the whole plugin API in one module.

A plugin is any module or object with functions marked ``@hookimpl`` (from
:mod:`sora_export.core.hookspecs` or ``pluggy.HookimplMarker("sora_export")``) whose names
match the specs below. Plugins are found through the ``sora_export`` entry-point group (the
built-in ones too), through ``--plugin-module MODULE`` or the ``SORA_EXPORT_PLUGINS``
environment variable (comma-separated module paths).

Hooks are called in this order during an export::

    sora_export_register_components / _transforms / _profiles   (discovery, every run)
    sora_export_check_profile        once, during planning       (all plugins)
    sora_export_chunk_component      per selected component      (first result wins)
    sora_export_chunk_variants       per chunk                   (all results collected)
    sora_export_patch_module         per chunk and variant, before capture (all plugins)
    sora_export_quantize             per lowered artifact        (first result wins)
    sora_export_package              once, after every chunk     (all plugins)

Only plugins that provide a selected component or transform, or that provide neither
(profile-only and policy plugins), take part in the chunking, patch, quantize and package
hooks of a run: selecting ``--plugins stdit`` does not run the ``tdtm`` patch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

from sora_export.core.types import (
    Chunk,
    ComponentSpec,
    DeviceProfile,
    ExportPlan,
    PlannedComponent,
    RunResult,
    TransformSpec,
)

PROJECT = "sora_export"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def sora_export_register_components(register: Callable[[ComponentSpec], None]) -> None:
    """Register the model components this plugin provides.

    Called once per run while plugins are discovered, for every installed plugin.

    :param register: call it with a :class:`~sora_export.core.types.ComponentSpec` for each
        component (e.g. ``stdit3``). Its ``name`` and ``aliases`` become valid
        ``--plugins`` names. Two components with the same name or alias are an error naming
        both plugins.
    :returns: nothing; results are ignored.
    """


@hookspec
def sora_export_register_transforms(register: Callable[[TransformSpec], None]) -> None:
    """Register optimisation plugins (transforms) such as ``tdtm`` or ``lpl``.

    Called once per run during discovery. A transform names the components it ``requires``;
    selecting it without them is a usage error (exit 2).

    :param register: call it with a :class:`~sora_export.core.types.TransformSpec`.
    :returns: nothing.
    """


@hookspec
def sora_export_register_profiles(register: Callable[[DeviceProfile], None]) -> None:
    """Register device profiles (``--profile NAME``).

    Called once per run during discovery. Profiles are plain data; the helper
    :func:`sora_export.core.profiles.profile_from_toml` turns TOML text into one with the
    same validation user files get.

    :param register: call it with a :class:`~sora_export.core.types.DeviceProfile`.
    :returns: nothing.
    """


@hookspec
def sora_export_check_profile(profile: DeviceProfile) -> None:
    """Validate this plugin's options in the device profile, before anything is exported.

    Called once per run for every active plugin, during planning, after the profile is
    resolved and before any component is described. Read your ``[plugins.NAME]`` table
    with ``profile.options(NAME)`` and raise
    :class:`~sora_export.core.errors.UsageError` naming the field for a bad value: it
    reaches the user as a usage error (exit 2) with nothing written.

    :returns: nothing; results are ignored.
    """


@hookspec(firstresult=True)
def sora_export_chunk_component(component: PlannedComponent) -> list[Chunk] | None:
    """Split a component into chunks. The first non-None result wins.

    Called once per selected component after its ``describe`` ran. ``component.context``
    carries the profile, ``chunk_budget_bytes`` (stored bytes a chunk may hold: the
    profile's per-chunk budget capped by what the export host can convert), ``policy``,
    size, weights path and export shape; ``component.description`` is what the
    component's ``describe`` returned.
    Return ``None`` for components you do not chunk. A third party can take over chunking of
    a built-in component with ``@hookimpl(tryfirst=True)``.

    :returns: the chunks in execution order, each with a picklable ``build`` that
        materialises only that chunk's weights.
    """


@hookspec
def sora_export_chunk_variants(chunk: Chunk, profile: DeviceProfile) -> list[str] | None:
    """Name extra variants (Core ML functions / ONNX graphs) a chunk should be exported with.

    Called once per chunk during planning. When any plugin returns names, the chunk is
    exported as one multifunction package with a ``plain`` function plus one function per
    returned name, sharing one copy of the weights; otherwise it has one function, ``main``.

    :returns: a list of variant names (e.g. ``["tdtm"]``) or None.
    """


@hookspec
def sora_export_patch_module(
    chunk: Chunk, module: Any, variant: str, profile: DeviceProfile
) -> Any | None:
    """The pre-trace patch: change a chunk's module before it is captured.

    Called for every plugin, for each chunk and each of its variants (``"main"``,
    ``"plain"`` or a variant name), after the module is built and its weights loaded and
    before ``torch.export``. Patch in place and return None, or return a replacement module
    (later plugins see the replacement). Patch only the variants you own: a merging patch
    should act when ``variant`` is its own name.

    :returns: None or a replacement ``torch.nn.Module``.
    """


@hookspec(firstresult=True)
def sora_export_quantize(
    artifact: Any, policy: str, chunk: Chunk, target: str, profile: DeviceProfile
) -> Any | None:
    """Quantize a lowered artifact. The first non-None result wins.

    Called after lowering, for each chunk and target, with the policy the profile (or
    ``--quantize``) gives this chunk. For ``fp32`` and ``fp16`` the lowering already chose
    the precision and plugins normally return None. ``artifact`` is the backend's in-memory
    model (a ``coremltools.models.MLModel`` for Core ML, an ``onnx.ModelProto`` for ONNX).

    :returns: the quantized artifact, or None to leave it to the next plugin (if no plugin
        handles a policy other than fp32/fp16, the chunk fails naming the policy).
    """


@hookspec
def sora_export_package(plan: ExportPlan, result: RunResult, bundle: Path) -> dict[str, Any] | None:
    """Contribute to the bundle after every chunk ran.

    Called once per run for every active plugin, before manifest.json is written. Write
    extra files under ``bundle`` if needed and return manifest sections to merge (e.g.
    ``{"sampler": {...}}``); two plugins returning the same top-level key is an error.

    :returns: a dict of manifest sections, or None.
    """

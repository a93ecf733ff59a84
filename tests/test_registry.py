"""Plugin discovery and hook calls: misbehaving plugins are named with their hook."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from sora_export.core import engine
from sora_export.core.errors import PluginError, UsageError
from sora_export.core.hookspecs import hookimpl
from sora_export.core.registry import Registry
from sora_export.core.types import ComponentSpec, ExportRequest, TransformSpec


def _module(name: str, **functions) -> str:
    module = types.ModuleType(name)
    for fname, fn in functions.items():
        setattr(module, fname, hookimpl(fn) if fname.startswith("sora_export_") else fn)
    sys.modules[name] = module
    return name


def test_builtins_found_through_entry_points() -> None:
    registry = Registry.discover()
    assert "stdit3" in registry.components
    assert registry.components["stdit3"].plugin == "stdit3"
    assert "lpl" in registry.transforms
    infos = {i.name: i for i in registry.plugin_infos()}
    assert infos["stdit3"].origin == "built-in"
    assert "sora_export_chunk_component" in infos["stdit3"].hooks


def test_clashing_component_name_names_both_plugins() -> None:
    def sora_export_register_components(register):
        register(ComponentSpec("stdit3", "impostor", 5, describe=lambda ctx: None))

    name = _module("clash_plugin", sora_export_register_components=sora_export_register_components)
    with pytest.raises(PluginError, match="clash_plugin") as info:
        Registry.discover([name])
    assert "stdit3" in str(info.value) and "already registered" in str(info.value)


def test_misspelled_hook_is_refused_with_suggestion() -> None:
    name = _module("typo_plugin", sora_export_chunk_componnet=lambda component: None)
    with pytest.raises(PluginError, match="did you mean sora_export_chunk_component"):
        Registry.discover([name])


def test_register_wrong_type_is_named() -> None:
    def sora_export_register_transforms(register):
        register({"name": "fast"})

    name = _module(
        "wrongtype_plugin", sora_export_register_transforms=sora_export_register_transforms
    )
    with pytest.raises(PluginError, match=r"wrongtype_plugin.*takes a TransformSpec"):
        Registry.discover([name])


def test_raising_chunk_hook_names_plugin_and_hook(tmp_path: Path) -> None:
    def sora_export_register_components(register):
        register(ComponentSpec("widget", "a test component", 50, describe=lambda ctx: "d"))

    def sora_export_chunk_component(component):
        raise RuntimeError("boom")

    name = _module(
        "raising_plugin",
        sora_export_register_components=sora_export_register_components,
        sora_export_chunk_component=sora_export_chunk_component,
    )
    registry = Registry.discover([name])
    with pytest.raises(PluginError) as info:
        engine.plan(ExportRequest(plugins=("widget",), output=tmp_path / "o"), registry)
    message = str(info.value)
    assert "raising_plugin" in message and "sora_export_chunk_component" in message
    assert "boom" in message


def test_chunk_hook_returning_wrong_type_is_named(tmp_path: Path) -> None:
    def sora_export_register_components(register):
        register(ComponentSpec("gadget", "a test component", 50, describe=lambda ctx: "d"))

    def sora_export_chunk_component(component):
        return "not chunks" if component.spec.name == "gadget" else None

    name = _module(
        "wrongreturn_plugin",
        sora_export_register_components=sora_export_register_components,
        sora_export_chunk_component=sora_export_chunk_component,
    )
    with pytest.raises(PluginError, match="must return a list of Chunk"):
        engine.plan(
            ExportRequest(plugins=("gadget",), output=tmp_path / "o"), Registry.discover([name])
        )


def test_transform_without_required_component_is_usage_error(tmp_path: Path) -> None:
    def sora_export_register_transforms(register):
        register(TransformSpec("sharpen", "needs stdit3", requires=("stdit3",)))

    name = _module("needy_plugin", sora_export_register_transforms=sora_export_register_transforms)
    registry = Registry.discover([name])
    with pytest.raises(UsageError, match=r"needs component.*stdit3"):
        registry.resolve(["sharpen"])
    comps, transforms = registry.resolve(["stdit", "sharpen"])
    assert [c.name for c in comps] == ["stdit3"] and [t.name for t in transforms] == ["sharpen"]


def test_unselected_plugins_do_not_patch(tmp_path: Path) -> None:
    calls: list[str] = []

    def sora_export_register_transforms(register):
        register(TransformSpec("spy", "records patch calls", requires=("stdit3",)))

    def sora_export_chunk_variants(chunk, profile):
        calls.append(chunk.key)
        return None

    name = _module(
        "spy_plugin",
        sora_export_register_transforms=sora_export_register_transforms,
        sora_export_chunk_variants=sora_export_chunk_variants,
    )
    registry = Registry.discover([name])
    engine.plan(ExportRequest(plugins=("stdit",), output=tmp_path / "o"), registry)
    assert calls == []
    engine.plan(ExportRequest(plugins=("stdit", "spy"), output=tmp_path / "o"), registry)
    assert calls and calls[0] == "stdit3/input"


def test_unknown_plugin_lists_closest_first() -> None:
    with pytest.raises(UsageError) as info:
        Registry.discover().resolve(["stdti"])
    known = str(info.value).split("known plugins: ")[1]
    assert known.startswith("stdit")


def test_bad_plugin_module_is_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot import plugin module 'no_such_module_xyz'"):
        Registry.discover(["no_such_module_xyz"])

"""Plugin discovery and the registry of components, transforms and device profiles.

Built-in plugins are found exactly like third-party ones: through the ``sora_export``
entry-point group. Extra plugin modules come from ``--plugin-module`` or the
``SORA_EXPORT_PLUGINS`` environment variable. Every hook call made through
:meth:`Registry.call` names the plugin and hook when a plugin raises.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import pluggy

from sora_export.core import hookspecs
from sora_export.core.errors import PluginError, UsageError
from sora_export.core.types import ComponentSpec, DeviceProfile, TransformSpec

ENV_PLUGINS = "SORA_EXPORT_PLUGINS"


@attrs.frozen
class PluginInfo:
    """Where a plugin came from and which hooks it implements (for ``--list-plugins``)."""

    name: str
    origin: str  # "built-in", "DIST VERSION", or "module"
    hooks: tuple[str, ...]


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("sora_export_")]


class Registry:
    """A pluggy manager plus what the registration hooks returned."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        origins: dict[str, str],
        extra_modules: tuple[str, ...] = (),
    ) -> None:
        self.pm = pm
        self.origins = origins
        self.extra_modules = extra_modules  # to rediscover the same plugins in a worker
        self.components: dict[str, ComponentSpec] = {}
        self.transforms: dict[str, TransformSpec] = {}
        self.profiles: dict[str, DeviceProfile] = {}
        self._owners: dict[str, str] = {}  # every selectable name/alias -> plugin
        self._collect()

    # -- discovery -------------------------------------------------------------------
    @classmethod
    def discover(cls, extra_modules: Sequence[str] = ()) -> Registry:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        origins: dict[str, str] = {}
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party install must be named
                raise PluginError(ep.name, "load", f"{type(exc).__name__}: {exc}") from exc
            dist = ep.dist
            origin = "built-in"
            if dist is not None and dist.metadata["Name"] != "sora-export":
                origin = f"{dist.metadata['Name']} {dist.version}"
            _register(pm, plugin, ep.name)
            origins[ep.name] = origin
        env = os.environ.get(ENV_PLUGINS, "")
        for module_name in [*extra_modules, *filter(None, (m.strip() for m in env.split(",")))]:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                raise UsageError(
                    f"cannot import plugin module {module_name!r}: {type(exc).__name__}: {exc}"
                ) from exc
            if pm.is_registered(module):
                continue
            _register(pm, module, module_name)
            origins[module_name] = "module"
        return cls(pm, origins, tuple(extra_modules))

    def _collect(self) -> None:
        def owner_check(name: str, plugin: str, kind: str) -> None:
            if name in self._owners and self._owners[name] != plugin:
                raise PluginError(
                    plugin,
                    f"sora_export_register_{kind}",
                    f"name {name!r} is already registered by plugin {self._owners[name]!r}",
                )
            self._owners[name] = plugin

        for impl, plugin in self._impls("sora_export_register_components"):

            def add_component(spec: ComponentSpec, _plugin: str = plugin) -> None:
                if not isinstance(spec, ComponentSpec):
                    raise PluginError(
                        _plugin,
                        "sora_export_register_components",
                        f"register() takes a ComponentSpec, got {type(spec).__name__}",
                    )
                for n in (spec.name, *spec.aliases):
                    owner_check(n, _plugin, "components")
                self.components[spec.name] = attrs.evolve(spec, plugin=_plugin)

            self._call_impl(impl, plugin, register=add_component)

        for impl, plugin in self._impls("sora_export_register_transforms"):

            def add_transform(spec: TransformSpec, _plugin: str = plugin) -> None:
                if not isinstance(spec, TransformSpec):
                    raise PluginError(
                        _plugin,
                        "sora_export_register_transforms",
                        f"register() takes a TransformSpec, got {type(spec).__name__}",
                    )
                for n in (spec.name, *spec.aliases):
                    owner_check(n, _plugin, "transforms")
                self.transforms[spec.name] = attrs.evolve(spec, plugin=_plugin)

            self._call_impl(impl, plugin, register=add_transform)

        for impl, plugin in self._impls("sora_export_register_profiles"):

            def add_profile(profile: DeviceProfile, _plugin: str = plugin) -> None:
                if not isinstance(profile, DeviceProfile):
                    raise PluginError(
                        _plugin,
                        "sora_export_register_profiles",
                        f"register() takes a DeviceProfile, got {type(profile).__name__}",
                    )
                if profile.name in self.profiles:
                    raise PluginError(
                        _plugin,
                        "sora_export_register_profiles",
                        f"profile {profile.name!r} is already registered by "
                        f"{self.profiles[profile.name].source!r}",
                    )
                self.profiles[profile.name] = profile

            self._call_impl(impl, plugin, register=add_profile)

    # -- names -----------------------------------------------------------------------
    def selectable_names(self) -> list[str]:
        return sorted(self._owners)

    def resolve(self, names: Iterable[str]) -> tuple[list[ComponentSpec], list[TransformSpec]]:
        """Map ``--plugins`` names (and aliases) to components and transforms.

        Unknown names are a :class:`UsageError` listing the known ones, closest first.
        A transform whose required components are not selected is a usage error too.
        """
        components: dict[str, ComponentSpec] = {}
        transforms: dict[str, TransformSpec] = {}
        for raw in names:
            name = raw.strip()
            if not name:
                continue
            hits = [c for c in self.components.values() if name in (c.name, *c.aliases)]
            hits_t = [t for t in self.transforms.values() if name in (t.name, *t.aliases)]
            if not hits and not hits_t:
                known = self.selectable_names()
                close = difflib.get_close_matches(name, known, n=len(known), cutoff=0.0)
                raise UsageError(
                    f"unknown plugin {name!r}; known plugins: {', '.join(close)}"
                    " (see --list-plugins)"
                )
            for c in hits:
                components[c.name] = c
            for t in hits_t:
                transforms[t.name] = t
        for t in transforms.values():
            missing = [r for r in t.requires if r not in components]
            if missing:
                raise UsageError(
                    f"plugin {t.name!r} needs component(s) {', '.join(missing)}; "
                    f"add them: --plugins {','.join([*missing, t.name])}"
                )
        ordered = sorted(components.values(), key=lambda c: (c.order, c.name))
        return ordered, list(transforms.values())

    def profile(self, name: str) -> DeviceProfile:
        if name in self.profiles:
            return self.profiles[name]
        close = difflib.get_close_matches(name, list(self.profiles), n=len(self.profiles), cutoff=0)
        raise UsageError(
            f"unknown profile {name!r}; known profiles: {', '.join(close)} (or pass a .toml file)"
        )

    # -- hook calls ------------------------------------------------------------------
    def active_plugins(
        self, components: Iterable[ComponentSpec], transforms: Iterable[TransformSpec]
    ) -> set[str]:
        """Plugins taking part in a run: those owning a selected name, plus those owning none."""
        selected = {c.plugin for c in components} | {t.plugin for t in transforms}
        owning = set(self._owners.values())
        everyone = {self.pm.get_name(p) for p in self.pm.get_plugins()}
        return selected | (everyone - owning)

    def call(
        self, hook: str, active: set[str] | None = None, firstresult: bool = False, **kwargs: Any
    ) -> Any:
        """Call ``hook`` on the active plugins in pluggy's order; name the plugin on failure."""
        results = []
        for impl, plugin in self._impls(hook):
            if active is not None and plugin not in active:
                continue
            value = self._call_impl(impl, plugin, **kwargs)
            if value is not None:
                if firstresult:
                    return value
                results.append((plugin, value))
        return None if firstresult else results

    def _impls(self, hook: str) -> list[tuple[Any, str]]:
        caller = getattr(self.pm.hook, hook)
        # pluggy runs implementations last-registered first (tryfirst/trylast respected)
        return [(impl, impl.plugin_name) for impl in reversed(caller.get_hookimpls())]

    @staticmethod
    def _call_impl(impl: Any, plugin: str, **kwargs: Any) -> Any:
        args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
        try:
            return impl.function(**args)
        except PluginError:
            raise
        except UsageError:
            raise
        except Exception as exc:
            hook = impl.function.__name__
            raise PluginError(plugin, hook, f"{type(exc).__name__}: {exc}") from exc

    def plugin_infos(self) -> list[PluginInfo]:
        infos = []
        for plugin in self.pm.get_plugins():
            name = self.pm.get_name(plugin) or repr(plugin)
            hooks = tuple(
                sorted(
                    h.name
                    for h in self.pm.get_hookcallers(plugin) or []
                    if h.name.startswith("sora_export_")
                )
            )
            infos.append(PluginInfo(name, self.origins.get(name, "module"), hooks))
        return sorted(infos, key=lambda i: (i.origin != "built-in", i.name))

    def names_of(self, plugin: str) -> list[str]:
        return sorted(n for n, p in self._owners.items() if p == plugin)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Register and validate a plugin; a bad hookimpl is named with its plugin."""
    known = set(_hook_names())
    for attr in dir(plugin):
        if attr.startswith("sora_export_") and attr not in known:
            close = difflib.get_close_matches(attr, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PluginError(name, attr, f"no such hook{hint}")
    try:
        pm.register(plugin, name=name)
    except ValueError as exc:  # pluggy: duplicate name or plugin
        raise PluginError(name, "register", str(exc)) from exc
    except pluggy.PluginValidationError as exc:
        raise PluginError(name, "register", str(exc)) from exc

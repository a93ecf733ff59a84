"""Built-in device profiles, registered through the same hook third parties use.

Each ``profiles/*.toml`` file beside this module is one profile (schema: docs/profiles.md).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

from sora_export.core.hookspecs import hookimpl
from sora_export.core.profiles import profile_from_toml
from sora_export.core.types import DeviceProfile


@hookimpl
def sora_export_register_profiles(register: Callable[[DeviceProfile], None]) -> None:
    folder = resources.files("sora_export.plugins") / "profiles"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            register(profile_from_toml(entry.read_text(encoding="utf-8"), f"built-in {entry.name}"))

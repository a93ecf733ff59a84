"""The ``lpl`` transform plugin: Linear Proportional Leap, shipped as sampler data.

Nothing is traced: LPL changes how a runtime steps the rectified-flow sampler. The package
hook writes the manifest's ``sampler`` section — transformed timesteps and step sizes for
every exported shape, guidance scale, and the LPL rule with its parameters — so an
on-device runtime needs no Python. Settings come from the profile's ``[plugins.lpl]``
table (see docs/profiles.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sora_export.core.errors import UsageError
from sora_export.core.hookspecs import hookimpl
from sora_export.core.types import DeviceProfile, ExportPlan, RunResult, TransformSpec
from sora_export.plugins.lpl.sampler import LPLSettings, SamplerSettings, manifest_section

NAME = "lpl"

# [plugins.lpl] field -> (type, which settings object, attribute)
_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "mode": (str, "lpl"),
    "static_steps": (int, "lpl"),
    "min_fraction": ((int, float), "lpl"),
    "tolerance": ((int, float), "lpl"),
    "patience": (int, "lpl"),
    "num_steps": (int, "sampler"),
    "cfg_scale": ((int, float), "sampler"),
    "use_timestep_transform": (bool, "sampler"),
}


def settings_from_profile(profile: DeviceProfile) -> SamplerSettings:
    """Validate ``[plugins.lpl]`` and build the sampler settings; errors name the field."""
    options: Mapping[str, Any] = profile.options(NAME)
    lpl_kwargs: dict[str, Any] = {}
    sampler_kwargs: dict[str, Any] = {}
    for field, value in options.items():
        if field not in _FIELDS:
            raise UsageError(
                f"profile {profile.name!r}: unknown field [plugins.lpl] {field!r}; "
                f"known: {', '.join(_FIELDS)}"
            )
        expected, target = _FIELDS[field]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise UsageError(
                f"profile {profile.name!r}: [plugins.lpl] {field} has the wrong type "
                f"({type(value).__name__} {value!r})"
            )
        (lpl_kwargs if target == "lpl" else sampler_kwargs)[field] = value
    try:
        return SamplerSettings(lpl=LPLSettings(**lpl_kwargs), **sampler_kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"profile {profile.name!r}: [plugins.lpl]: {exc}") from exc


@hookimpl
def sora_export_register_transforms(register: Callable[[TransformSpec], None]) -> None:
    register(
        TransformSpec(
            name=NAME,
            description="Linear Proportional Leap: stop denoising early with one proportional "
            "leap; ships timesteps and the leap rule in the manifest",
            requires=("stdit3",),
        )
    )


@hookimpl
def sora_export_package(plan: ExportPlan, result: RunResult, bundle: Path) -> dict[str, Any]:
    settings = settings_from_profile(plan.profile)
    shapes = [s.to_json() for s in plan.profile.shapes]
    return {"sampler": manifest_section(settings, shapes)}


@hookimpl
def sora_export_check_profile(profile: DeviceProfile) -> None:
    settings_from_profile(profile)  # raises UsageError naming the [plugins.lpl] field

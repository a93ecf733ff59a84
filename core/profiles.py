"""Device profiles from TOML: parsing and validation with messages that name the field.

The schema is documented field by field in docs/profiles.md; the built-in profiles live in
``plugins/profiles/*.toml`` and are registered by the ``profiles`` plugin through the same
hook third parties use.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sora_export.core.errors import UsageError
from sora_export.core.types import (
    QUANT_POLICIES,
    TARGETS,
    DeviceProfile,
    ExportShape,
    QuantizationPolicy,
)

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")
_DEPLOYMENT_PREFIXES = ("iOS", "macOS", "tvOS", "watchOS", "visionOS")

# field -> (python type(s), required)
_TOP_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "name": (str, True),
    "description": (str, False),
    "targets": (list, True),
    "deployment_target": (str, False),  # required when targets include coreml
    "compute_units": (str, False),
    "memory_budget_bytes": (int, True),
    "activation_reserve_bytes": (int, True),
    "resident_chunks": (int, False),
    "chunk_budget_bytes": (int, False),
    "onnx_opset": (int, False),
    "quantization": (dict, False),
    "psnr_thresholds_db": (dict, False),
    "shapes": (list, True),
    "plugins": (dict, False),
}
_QUANT_FIELDS = {"default": str, "components": dict, "chunks": dict}
_SHAPE_FIELDS: dict[str, tuple[type, bool]] = {
    "name": (str, True),
    "height": (int, True),
    "width": (int, True),
    "num_frames": (int, True),
    "default": (bool, False),
}


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        list: "array",
        dict: "table",
    }.get(t, t.__name__)


def _check_type(where: str, field: str, value: Any, expected: type | tuple[type, ...]) -> None:
    # bool is an int in Python; a TOML `true` where an integer belongs is still wrong
    ok = isinstance(value, expected) and not (
        isinstance(value, bool) and expected in (int, float, (int, float))
    )
    if not ok:
        raise UsageError(
            f"{where}: field {field!r} must be a {_type_name(expected)}, "
            f"got {type(value).__name__} {value!r}"
        )


def _check_policy(where: str, field: str, value: Any) -> str:
    _check_type(where, field, value, str)
    if value not in QUANT_POLICIES:
        raise UsageError(
            f"{where}: field {field!r} = {value!r} is not a quantization policy; "
            f"use one of {', '.join(QUANT_POLICIES)}"
        )
    return value


def profile_from_mapping(data: Mapping[str, Any], source: str) -> DeviceProfile:
    """Validate a parsed profile table and build a :class:`DeviceProfile`.

    Raises :class:`UsageError` naming ``source`` and the offending field on an unknown
    field, a missing required field, a wrong type or an out-of-range value.
    """
    for field in data:
        if field not in _TOP_FIELDS:
            raise UsageError(
                f"{source}: unknown field {field!r}; known fields: {', '.join(_TOP_FIELDS)}"
            )
    for field, (expected, required) in _TOP_FIELDS.items():
        if field not in data:
            if required:
                raise UsageError(f"{source}: missing required field {field!r}")
            continue
        _check_type(source, field, data[field], expected)

    targets = tuple(data["targets"])
    for t in targets:
        if t not in TARGETS:
            raise UsageError(f"{source}: targets: unknown target {t!r}; use {', '.join(TARGETS)}")
    if not targets:
        raise UsageError(f"{source}: field 'targets' must name at least one target")
    if "coreml" in targets:
        for field in ("deployment_target", "compute_units"):
            if field not in data:
                raise UsageError(f"{source}: field {field!r} is required for the coreml target")
    compute_units = data.get("compute_units", "CPU_ONLY")
    deployment = data.get("deployment_target", "")
    if compute_units not in COMPUTE_UNITS:
        raise UsageError(
            f"{source}: field 'compute_units' = {compute_units!r}; "
            f"use one of {', '.join(COMPUTE_UNITS)}"
        )
    if deployment and not deployment.startswith(_DEPLOYMENT_PREFIXES):
        raise UsageError(
            f"{source}: field 'deployment_target' = {deployment!r}; use e.g. iOS18 or macOS15"
        )
    for field in ("memory_budget_bytes", "activation_reserve_bytes"):
        if data[field] <= 0:
            raise UsageError(f"{source}: field {field!r} must be positive")
    if data["activation_reserve_bytes"] >= data["memory_budget_bytes"]:
        raise UsageError(
            f"{source}: 'activation_reserve_bytes' must be below 'memory_budget_bytes'"
        )

    quant = data.get("quantization", {})
    for field, value in quant.items():
        if field not in _QUANT_FIELDS:
            raise UsageError(
                f"{source}: unknown field 'quantization.{field}'; known: {', '.join(_QUANT_FIELDS)}"
            )
        _check_type(source, f"quantization.{field}", value, _QUANT_FIELDS[field])
    policy = QuantizationPolicy(
        default=_check_policy(source, "quantization.default", quant.get("default", "fp16")),
        components={
            k: _check_policy(source, f"quantization.components.{k}", v)
            for k, v in quant.get("components", {}).items()
        },
        chunks={
            k: _check_policy(source, f"quantization.chunks.{k}", v)
            for k, v in quant.get("chunks", {}).items()
        },
    )

    thresholds: dict[str, float] = {}
    for key, value in data.get("psnr_thresholds_db", {}).items():
        if key != "default" and key not in QUANT_POLICIES:
            raise UsageError(
                f"{source}: unknown field 'psnr_thresholds_db.{key}'; "
                f"use a policy name ({', '.join(QUANT_POLICIES)}) or 'default'"
            )
        _check_type(source, f"psnr_thresholds_db.{key}", value, (int, float))
        thresholds[key] = float(value)

    shapes = []
    for i, entry in enumerate(data["shapes"]):
        where = f"{source}: shapes[{i}]"
        _check_type(source, f"shapes[{i}]", entry, dict)
        for field in entry:
            if field not in _SHAPE_FIELDS:
                raise UsageError(
                    f"{where}: unknown field {field!r}; known: {', '.join(_SHAPE_FIELDS)}"
                )
        for field, (expected, required) in _SHAPE_FIELDS.items():
            if field not in entry:
                if required:
                    raise UsageError(f"{where}: missing required field {field!r}")
                continue
            _check_type(where, field, entry[field], expected)
        for field in ("height", "width"):
            if entry[field] <= 0 or entry[field] % 16:
                raise UsageError(f"{where}: {field!r} must be a positive multiple of 16")
        if entry["num_frames"] <= 0:
            raise UsageError(f"{where}: 'num_frames' must be positive")
        shapes.append(ExportShape(**entry))
    if not shapes:
        raise UsageError(f"{source}: field 'shapes' must list at least one shape")
    if sum(s.default for s in shapes) > 1:
        raise UsageError(f"{source}: more than one shape has default = true")

    plugin_options = data.get("plugins", {})
    for key, value in plugin_options.items():
        _check_type(source, f"plugins.{key}", value, dict)

    return DeviceProfile(
        name=data["name"],
        description=data.get("description", ""),
        targets=targets,
        deployment_target=deployment,
        compute_units=compute_units,
        memory_budget_bytes=data["memory_budget_bytes"],
        activation_reserve_bytes=data["activation_reserve_bytes"],
        resident_chunks=data.get("resident_chunks", 2),
        chunk_budget_bytes=data.get("chunk_budget_bytes"),
        quantization=policy,
        psnr_thresholds_db=thresholds,
        shapes=tuple(shapes),
        onnx_opset=data.get("onnx_opset", 18),
        plugin_options=plugin_options,
        source=source,
    )


def profile_from_toml(text: str, source: str) -> DeviceProfile:
    """Parse TOML text into a validated profile; a syntax error names line and column."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: TOML syntax error: {exc}") from exc
    return profile_from_mapping(data, source)


def load_profile_file(path: Path) -> DeviceProfile:
    """Read a profile from a ``.toml`` file given on the command line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read profile file {str(path)!r}: {exc.strerror}") from exc
    return profile_from_toml(text, str(path))

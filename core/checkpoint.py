"""Lazy, strict checkpoint reading: only the tensors a chunk needs are materialised.

Formats: ``.safetensors`` (read tensor by tensor), torch files ``.pt/.pth/.bin/.ckpt``
(memory-mapped zip archives, so untouched tensors stay on disk), and Hugging Face style
directories (``*.safetensors`` shards or ``pytorch_model*.bin`` shards, with or without an
index). Every refusal is a :class:`~sora_export.core.errors.UsageError` naming the file and
the keys or shapes at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sora_export.core.errors import UsageError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_NESTED_KEYS = ("state_dict", "model", "module", "ema")
_SHOW = 8  # how many offending keys a message lists


class _SafetensorsFile:
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._handle.keys())
            self._shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._keys}
        except Exception as exc:  # safetensors raises its own error types
            raise UsageError(
                f"weights file {str(path)!r} is not a readable safetensors checkpoint "
                f"(truncated or corrupt?): {exc}"
            ) from exc
        self.path = path

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise UsageError(
                f"weights file {str(self.path)!r}: cannot read tensor {key!r}: {exc}"
            ) from exc


class _TorchFile:
    def __init__(self, path: Path) -> None:
        try:
            try:
                obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # legacy (non-zip) torch files cannot be memory-mapped
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(
                f"weights file {str(path)!r} is not a readable torch checkpoint "
                f"(truncated or corrupt?): {type(exc).__name__}: {exc}"
            ) from exc
        state = _unwrap(obj)
        if state is None:
            raise UsageError(
                f"weights file {str(path)!r} holds no state dict of tensors "
                f"(found {type(obj).__name__})"
            )
        self._state = state
        self.path = path

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]


def _unwrap(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _NESTED_KEYS:
            if key in obj:
                inner = _unwrap(obj[key])
                if inner is not None:
                    return inner
    return None


class CheckpointReader:
    """Read-only view over one checkpoint (file or directory of shards).

    ``keys()``, ``shape()`` cost no tensor reads; ``get()`` reads one tensor.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UsageError(f"weights path {str(self.path)!r} does not exist")
        self._files: list[_SafetensorsFile | _TorchFile] = [
            _open_file(p) for p in _checkpoint_files(self.path)
        ]
        self._where: dict[str, _SafetensorsFile | _TorchFile] = {}
        for f in self._files:
            for k in f.keys():  # noqa: SIM118 - f is not a dict
                self._where.setdefault(k, f)
        if not self._where:
            raise UsageError(f"weights path {str(self.path)!r} holds no tensors")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def get(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        tensor = self._where[key].get(key)
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def detect_prefix(self, candidates: Iterable[str], probe: str) -> str:
        """Return the first prefix in ``candidates`` under which ``probe`` exists."""
        tried = []
        for prefix in candidates:
            if prefix + probe in self._where:
                return prefix
            tried.append(prefix + probe)
        raise UsageError(
            f"weights {str(self.path)!r} do not look like this component's checkpoint: "
            f"none of {', '.join(repr(t) for t in tried)} found "
            f"(first keys: {', '.join(self.keys()[:_SHOW])})"
        )

    def validate(
        self,
        expected: Mapping[str, tuple[int, ...]],
        prefix: str = "",
        optional: Iterable[str] = (),
        ignore_prefixes: Iterable[str] = (),
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        """Strict check of the whole component before any chunk is built.

        ``expected`` maps module keys to shapes; the checkpoint key is ``prefix + key``
        (or ``prefix + aliases[key]`` when the checkpoint stores it under another name).
        Keys in ``optional`` may be absent; checkpoint keys under ``prefix`` that start with
        one of ``ignore_prefixes`` are not reported as unexpected. Raises a UsageError that
        lists the first missing keys, unexpected keys and mismatched shapes.
        """
        aliases = dict(aliases or {})
        optional = set(optional)
        ignore = tuple(prefix + p for p in ignore_prefixes)
        missing, mismatched = [], []
        seen: set[str] = set()
        for key, shape in expected.items():
            ck = self._resolve(prefix, key, aliases)
            if ck is None:
                if key not in optional:
                    missing.append(prefix + key)
                continue
            seen.add(ck)
            got = self.shape(ck)
            if tuple(got) != tuple(shape):
                mismatched.append(f"{ck}: checkpoint {list(got)} vs model {list(shape)}")
        unexpected = [
            k
            for k in self._where
            if k.startswith(prefix)
            and k not in seen
            and not k.startswith(ignore)
            and k[len(prefix) :] not in optional
        ]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched)}")
        if problems:
            raise UsageError(
                f"weights {str(self.path)!r} do not match the model: " + "; ".join(problems)
            )

    def state_dict(
        self,
        keys: Iterable[str],
        prefix: str = "",
        optional: Iterable[str] = (),
        aliases: Mapping[str, str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read just ``keys`` (module names) into a state dict, mapping through prefix/aliases."""
        aliases = dict(aliases or {})
        optional = set(optional)
        out = {}
        for key in keys:
            ck = self._resolve(prefix, key, aliases)
            if ck is None:
                if key in optional:
                    continue
                raise UsageError(f"weights {str(self.path)!r}: missing key {prefix + key!r}")
            out[key] = self.get(ck)
        return out

    def _resolve(self, prefix: str, key: str, aliases: Mapping[str, str]) -> str | None:
        for candidate in (prefix + key, prefix + aliases[key] if key in aliases else None):
            if candidate is not None and candidate in self._where:
                return candidate
        return None


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = sorted(path.glob("*.safetensors.index.json")) + sorted(path.glob("*.bin.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise UsageError(f"checkpoint index {str(index[0])!r} is not valid: {exc}") from exc
        return [path / name for name in sorted(set(weight_map.values()))]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth", "*.bin", "*.ckpt"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise UsageError(
        f"weights directory {str(path)!r} holds no checkpoint "
        "(*.safetensors, pytorch_model*.bin, *.pt, *.pth, *.ckpt)"
    )


def _open_file(path: Path) -> _SafetensorsFile | _TorchFile:
    if not path.exists():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return _TorchFile(path)
    raise UsageError(
        f"weights file {str(path)!r} has an unknown suffix {path.suffix!r}; "
        "use .safetensors, .pt, .pth, .bin, .ckpt or a Hugging Face directory"
    )

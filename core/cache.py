"""Content-addressed cache of lowered (pre-quantization) artifacts.

Capturing and lowering a chunk is most of an export's time; quantizing a lowered model is
a small part. The engine keeps every lowered fp16/fp32 model here under a key made of
everything that determines it -- the chunk (name, I/O, weights: checkpoint identity or
random seed), the function, the code that built and lowered it (a digest of this
package's sources, the torch/coremltools/onnx versions, the versions of third-party
plugins), the profile, the target and the precision -- but not the quantization policy.
A re-run that only changes ``--quantize`` therefore skips build, capture and lowering and
quantizes the cached models; a re-run that changes nothing of a chunk reuses its lowered
model too. Anything else (edited code, new weights, another profile) gives another key.

Entries are directories written under a temporary name and renamed into place, so a
reader never sees half an entry; an entry that cannot be read is deleted and rebuilt.
Deleting the cache directory at any time is safe.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sora_export.core.backends import remove_path, tree_bytes

log = logging.getLogger(__name__)

ENV_VAR = "SORA_EXPORT_CACHE"
ENTRY_FILE = "entry.json"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # core/.. : core/ and plugins/


def default_cache_dir() -> Path:
    """``$SORA_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/sora-export``, else ``~/.cache/...``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sora-export"


@functools.cache
def code_digest() -> str:
    """What code built a lowered model: this project's sources and the toolchain versions.

    The sources are hashed, not the version string, so an edited checkout never serves a
    model lowered by the code before the edit.
    """
    digest = hashlib.sha256()
    for folder in ("core", "plugins"):
        root = _PACKAGE_ROOT / folder
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".toml") and path.is_file():
                digest.update(str(path.relative_to(_PACKAGE_ROOT)).encode() + b"\0")
                digest.update(path.read_bytes())
    for dist in ("torch", "coremltools", "onnx", "onnxscript"):
        try:
            digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{dist}=-".encode())
    return digest.hexdigest()


def third_party_versions() -> dict[str, str]:
    """Versions of installed distributions that provide ``sora_export`` plugins."""
    return dict(_plugin_distributions())


@functools.cache
def _plugin_distributions() -> tuple[tuple[str, str], ...]:
    # read once per process, like the plugins themselves (scanning every installed
    # distribution's metadata costs ~10 ms, and a run makes hundreds of keys)
    out = {}
    for dist in importlib.metadata.distributions():
        eps = dist.entry_points
        if any(ep.group == "sora_export" for ep in eps):
            out[dist.metadata["Name"]] = dist.version
    return tuple(sorted(out.items()))


def make_key(fields: Mapping[str, Any]) -> str:
    """SHA-256 of the JSON of ``fields`` plus :func:`code_digest`."""
    blob = json.dumps(
        {"code": code_digest(), "plugins": third_party_versions(), **fields},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class LoweredCache:
    """Lowered models on disk, one directory per key, one artifact per function.

    ``backend`` objects provide ``save_lowered(model, path)``, ``load_lowered(path)`` and
    ``suffix``; the cache never looks inside an artifact.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str, backend: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The entry's models by function name and what it records about them (``about``
        of :meth:`put`), or None (missing, incomplete or unreadable)."""
        entry = self._entry(key)
        if not (entry / ENTRY_FILE).is_file():
            return None
        try:
            meta = json.loads((entry / ENTRY_FILE).read_text())
            names = list(meta["functions"])
            models = {n: backend.load_lowered(entry / f"{n}{backend.suffix}") for n in names}
        except Exception as exc:  # a damaged entry is rebuilt, never trusted
            log.warning("ignoring unreadable cache entry %s: %s", entry, exc)
            remove_path(entry)
            return None
        os.utime(entry)  # recently used: what a size-bounded clean-up would keep
        return models, meta

    def files(self, key: str, suffix: str) -> tuple[dict[str, Path], dict[str, Any]] | None:
        """The entry's artifact paths by function and its record, without reading the
        artifacts (None when missing or incomplete)."""
        entry = self._entry(key)
        try:
            meta = json.loads((entry / ENTRY_FILE).read_text())
            paths = {n: entry / f"{n}{suffix}" for n in meta["functions"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(p.exists() for p in paths.values()):
            return None
        return paths, meta

    def paths(self, key: str, backend: Any) -> dict[str, Path] | None:
        """Where the entry's artifacts are (checked readable, as :meth:`get`), or None."""
        hit = self.get(key, backend)
        if hit is None:
            return None
        return {n: self._entry(key) / f"{n}{backend.suffix}" for n in hit[0]}

    def put(self, key: str, backend: Any, models: Mapping[str, Any], about: Mapping) -> bool:
        """Store ``models`` (function name -> lowered model); returns whether it was
        stored. Failures only log: a cache that cannot be written (full disk, read-only
        home) must not fail the export."""
        writers = {
            name: functools.partial(backend.save_lowered, model) for name, model in models.items()
        }
        return self.put_with(key, backend.suffix, writers, about)

    def put_with(
        self,
        key: str,
        suffix: str,
        writers: Mapping[str, Callable[[Path], None]],
        about: Mapping,
    ) -> bool:
        """Store an entry whose artifacts ``writers[name](path)`` write themselves (to
        ``path`` = ``<name><suffix>`` in the new entry). Returns whether it was stored;
        failures to write only log, as in :meth:`put`."""
        entry = self._entry(key)
        tmp = entry.with_name(f".tmp-{os.getpid()}-{key}")
        try:
            remove_path(tmp)
            tmp.mkdir(parents=True)
            for name, write in writers.items():
                write(tmp / f"{name}{suffix}")
            meta = {"functions": list(writers), "bytes": tree_bytes(tmp), **about}
            (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=2, default=str))
            if entry.exists():
                remove_path(entry)
            os.replace(tmp, entry)
            return True
        except OSError as exc:
            log.warning("could not write cache entry %s: %s", entry, exc)
            remove_path(tmp)
            return False
        except BaseException:
            remove_path(tmp)
            raise

    @contextmanager
    def lock(self, key: str, wait: bool = True) -> Iterator[bool]:
        """Hold an exclusive lock named ``key`` (so two workers do not make the same entry
        at once). Yields whether it is held: with ``wait=False`` another holder makes it
        yield False at once. A cache that cannot hold lock files yields True (no lock)."""
        try:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            fh = open(self.root / "locks" / key, "a+b")  # noqa: SIM115 (held across the yield)
        except OSError:
            yield True
            return
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

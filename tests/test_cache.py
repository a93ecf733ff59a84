"""The lowered-model cache, the automatic --jobs choice and --max-memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_export.core import engine
from sora_export.core.cache import LoweredCache
from sora_export.core.cli import _size_arg, main
from sora_export.core.registry import Registry
from sora_export.core.types import Chunk, ExportRequest
from sora_export.core.workers import WorkerPool, start_workers


def _export(out: Path, *extra: str) -> dict:
    code = main(["--plugins", "stdit", "--target", "coreml", "-o", str(out), *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def test_requantize_reuses_lowered_models(tmp_path: Path) -> None:
    cold = _export(tmp_path / "fp16", "--quantize", "fp16", "--no-verify")
    assert [c["lowered_cache"] for c in cold["chunks"]] == ["stored"] * 3
    assert all("capture" in c["timings"] for c in cold["chunks"])

    warm = _export(tmp_path / "int8", "--quantize", "int8", "--no-verify")
    for chunk in warm["chunks"]:
        assert chunk["lowered_cache"] == "hit", chunk["chunk"]
        # nothing was built, captured or lowered: only the cache read, quantize and save
        assert not {"build", "capture", "lower"} & set(chunk["timings"]), chunk["timings"]
        assert chunk["quantization"] == "int8"
    blocks = {c["chunk"]: c for c in warm["chunks"]}["stdit3/blocks-00-03"]
    assert blocks["bytes"] < 0.7 * {c["chunk"]: c for c in cold["chunks"]}[blocks["chunk"]]["bytes"]

    # a verified re-run from the cache builds the reference but neither captures nor lowers
    checked = _export(tmp_path / "int8v", "--quantize", "int8", "--verify")
    for chunk in checked["chunks"]:
        assert chunk["lowered_cache"] == "hit"
        assert chunk["verification"]["passed"], chunk
        assert "reference" in chunk["timings"] and "capture" not in chunk["timings"]


def test_no_cache_flag_and_damaged_entries(tmp_path: Path) -> None:
    plain = _export(tmp_path / "a", "--no-verify", "--no-cache")
    assert {c["lowered_cache"] for c in plain["chunks"]} == {""}
    cache = tmp_path / "cache"
    _export(tmp_path / "b", "--no-verify", "--cache-dir", str(cache))
    entries = [p.parent for p in cache.rglob("entry.json")]
    assert len(entries) == 3
    for entry in entries:  # damage every stored model
        for spec in entry.rglob("model.mlmodel"):
            spec.write_bytes(b"not a protobuf")
    again = _export(tmp_path / "c", "--no-verify", "--cache-dir", str(cache))
    # the damaged entries were dropped and rebuilt, never served
    assert [c["lowered_cache"] for c in again["chunks"]] == ["stored"] * 3
    served = _export(tmp_path / "d", "--no-verify", "--cache-dir", str(cache))
    assert [c["lowered_cache"] for c in served["chunks"]] == ["hit"] * 3


class _FailingBackend:
    suffix = ".bin"

    def save_lowered(self, model: object, path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    def load_lowered(self, path: Path) -> object:
        return path.read_bytes()


def test_unwritable_cache_only_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = LoweredCache(tmp_path / "c")
    cache.put("ab" * 32, _FailingBackend(), {"main": object()}, {})
    assert "could not write cache entry" in caplog.text
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # no half entry
    assert cache.get("ab" * 32, _FailingBackend()) is None


def _plan(tmp_path: Path, **changes: object) -> engine.ExportPlan:
    request = ExportRequest(plugins=("stdit",), output=tmp_path / "o", verify=False)
    return engine.plan(attrs.evolve(request, **changes), Registry.discover())


def test_lowered_key_follows_what_changes_the_lowered_model(tmp_path: Path) -> None:
    base = _plan(tmp_path)
    chunk = base.chunks[1]

    def key(plan: engine.ExportPlan, target: str = "coreml", precision: str = "fp16") -> str:
        same = next(c for c in plan.chunks if c.key == chunk.key)
        return engine.lowered_key(plan, same, target, precision)

    k = key(base)
    assert key(_plan(tmp_path)) == k  # deterministic
    # the quantization policy is not part of it: that is what makes re-quantizing cheap
    assert key(_plan(tmp_path, quantize="int8")) == k
    assert key(base, precision="fp32") != k
    assert key(base, target="onnx") != k
    assert key(_plan(tmp_path, seed=1)) != k
    assert key(_plan(tmp_path, plugins=("stdit", "tdtm"))) != k
    # the resume fingerprint does depend on the policy
    fp = engine.chunk_fingerprint(base, chunk, "coreml", "fp16")
    assert engine.chunk_fingerprint(base, chunk, "coreml", "int8") != fp


def _chunks(params: list[int]) -> list[Chunk]:
    return [
        Chunk(
            component="c",
            index=i,
            name=f"c{i}",
            build=object,  # never called: auto_jobs reads params only
            example_inputs=tuple,
            inputs=(),
            outputs=(),
            params=p,
        )
        for i, p in enumerate(params)
    ]


@settings(max_examples=200, deadline=None)
@given(
    params=st.lists(st.integers(1, 2_000_000_000), min_size=1, max_size=40),
    cores=st.integers(1, 64),
    host=st.integers(1_000_000_000, 512_000_000_000),
)
def test_auto_jobs_fits_cores_chunks_and_memory(params: list[int], cores: int, host: int) -> None:
    jobs, reason = engine.auto_jobs(_chunks(params), host, cores=cores)
    assert 1 <= jobs <= max(1, min(cores, len(params)))
    assert reason
    if jobs > 1:
        peak = max(engine.export_peak_bytes(p) for p in params)
        assert jobs * peak <= host
        assert sum(params) >= engine.PARALLEL_MIN_PARAMS


def test_auto_jobs_examples() -> None:
    pair = 42_467_328  # one STDiT3-XL/2 block pair
    # full-size STDiT3 on a 2-core, 24 GB machine: both cores
    assert engine.auto_jobs(_chunks([18_500_000, 15 * pair, 13 * pair, 1]), 18 * 10**9, 2)[0] == 2
    # the same on a 4 GB export budget: one 15-pair chunk needs ~7 GB, so one worker
    jobs, reason = engine.auto_jobs(_chunks([15 * pair, 13 * pair]), 4 * 10**9, 2)
    assert jobs == 1 and "memory" in reason
    # a tiny model: workers would cost more than they save
    jobs, reason = engine.auto_jobs(_chunks([76_000, 534_000, 2_000]), 18 * 10**9, 8)
    assert jobs == 1 and "too small" in reason


def test_tiny_plan_runs_serially_by_default(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    assert plan.jobs == 1 and "too small" in plan.jobs_reason
    assert _plan(tmp_path, jobs=3).jobs == 3


@pytest.mark.parametrize(
    ("text", "value"),
    [("4G", 4 * 10**9), ("4GB", 4 * 10**9), ("3500M", 3_500_000_000), ("4e9", 4 * 10**9)],
)
def test_max_memory_sizes(text: str, value: int) -> None:
    assert _size_arg(text) == value


@pytest.mark.parametrize("text", ["lots", "4X", "", "10M"])
def test_max_memory_refuses_nonsense(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _size_arg(text)


def test_max_memory_caps_chunks(tmp_path: Path) -> None:
    # converted whole, chunks shrink until two of them convert side by side in 4 GB
    roomy = _plan(tmp_path, size="full", jobs=2, whole_chunks=True)
    tight = _plan(tmp_path, size="full", jobs=2, host_memory_bytes=4 * 10**9, whole_chunks=True)
    assert len(tight.chunks) > len(roomy.chunks)
    per_worker = 4 * 10**9 / 2
    assert all(engine.export_peak_bytes(c.params) <= per_worker for c in tight.chunks)
    # converted part by part (Core ML), the chunks keep the device's size: the parts fit
    stitched = _plan(tmp_path, size="full", jobs=2, host_memory_bytes=4 * 10**9)
    assert [c.name for c in stitched.chunks] == [c.name for c in roomy.chunks]
    for chunk in stitched.chunks:
        units = [p.params for p in chunk.parts] or [chunk.params]
        assert all(engine.export_peak_bytes(u) <= per_worker for u in units)
    # ... unless a target converts chunks whole
    both = _plan(
        tmp_path, size="full", jobs=2, host_memory_bytes=4 * 10**9, targets=("coreml", "onnx")
    )
    assert len(both.chunks) == len(tight.chunks)


def test_auto_jobs_counts_parts(tmp_path: Path) -> None:
    # full-size STDiT3 for Core ML: four chunks, but 28 block pairs to convert one by one
    plan = _plan(tmp_path, size="full", host_memory_bytes=18 * 10**9)
    units = engine._export_units(plan.chunks, plan.request, plan.targets)
    assert len(units) == 30
    peak = max(engine.export_peak_bytes(u.params) for u in units)
    assert plan.jobs == min(engine.available_cores(), 30, 18 * 10**9 // peak)
    # converted whole (ONNX too), the two 1.3 GB chunks would need ~7 GB each
    whole = _plan(tmp_path, size="full", host_memory_bytes=6 * 10**9, targets=("coreml", "onnx"))
    assert whole.jobs == 1 and "memory" in whole.jobs_reason


def test_workers_started_ahead_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI starts workers before planning (their imports overlap its own); a plan
    wanting as many runs in them, not in a pool started afterwards."""
    import concurrent.futures

    registry = Registry.discover()
    request = ExportRequest(
        plugins=("stdit",), output=tmp_path / "o", targets=("coreml",), jobs=2, verify=False
    )
    plan = engine.plan(request, registry)
    workers = start_workers(1)  # with this process: two jobs

    def no_new_pool(*_: object, **__: object) -> None:
        raise AssertionError("a second pool was started")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_new_pool)
    try:
        result = engine.run(plan, registry, workers=workers)
    finally:
        workers.close()
    assert result.ok and len(result.results) == 3


def test_cli_starts_workers_before_importing_torch() -> None:
    """The CLI and the worker pool import no torch, so the workers' imports of it start
    before the parent's (they run side by side instead of one after the other)."""
    import subprocess
    import sys

    # the command's own path up to the point it starts the workers, too
    probe = (
        "import sys; from sora_export.core import cli, workers\n"
        "def early(args):\n"
        "    print(sorted(m for m in ('torch', 'coremltools', 'sora_export.core.engine') "
        "if m in sys.modules))\n"
        "    raise SystemExit(0)\n"
        "cli._early_workers = early\n"
        "cli.main(['--plugins', 'stdit', '--jobs', '2', '-o', 'unused'])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cli_starts_workers_only_for_parallel_runs() -> None:
    from sora_export.core.cli import _early_workers, export_parser

    def early(*argv: str) -> WorkerPool | None:
        return _early_workers(export_parser().parse_args(["--plugins", "stdit", *argv]))

    assert early() is None  # tiny models: one process
    assert early("--jobs", "1", "--size", "full") is None
    pool = early("--jobs", "3")
    assert pool is not None and pool.workers == 2  # and this process
    pool.close()


def test_feed_keeps_the_pool_busy_and_leaves_the_rest_here() -> None:
    """engine._Feed: the pool gets the next task from its own thread as each one finishes
    (this process never has to come back for it), this process takes what is left, and
    every task runs once."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from sora_export.core.engine import _Feed, _Task

    chunk = engine.plan(
        ExportRequest(plugins=("stdit",), output=Path("o"), targets=("coreml",), verify=False),
        Registry.discover(),
    ).chunks[0]
    ran: dict[int, str] = {}
    release = threading.Event()

    def work(task: _Task, where: str) -> None:
        ran[task.part] = where  # type: ignore[index]
        if task.part == 0:
            release.wait(5)  # the pool's first task outlasts this process's first one

    with ThreadPoolExecutor(1) as pool:
        feed = _Feed(lambda t: pool.submit(work, t, "pool"), size=1)
        for i in range(6):
            feed.add(_Task(chunk, i))
        mine = feed.take()
        assert mine is not None and mine.part == 1  # task 0 went to the pool
        work(mine, "here")
        release.set()
        deadline = time.monotonic() + 5
        while 2 not in ran and time.monotonic() < deadline:
            time.sleep(0.01)  # the pool's thread hands it task 2 as task 0 ends
        while (task := feed.take()) is not None:
            work(task, "here")
        while len(ran) < 6:
            feed.done.get(timeout=5)
    assert sorted(ran) == list(range(6))
    assert ran[0] == "pool" and ran[1] == "here" and ran[2] == "pool"

    def broken(_: _Task) -> None:
        raise BrokenProcessPool("a worker died")

    feed = _Feed(broken, size=1)
    feed.add(_Task(chunk, 7))
    assert feed.broken and feed.take() == _Task(chunk, 7)  # left for this process


def test_marker_lowerings_made_elsewhere_are_not_waited_for(tmp_path: Path) -> None:
    """A part task told not to wait makes the marker lowerings nobody else is making and
    reports the others as pending (the scheduler runs it again later), instead of
    blocking its process; once they are there it goes on."""
    from sora_export.core.engine import TemplatePending, _ensure_entries

    cache = LoweredCache(tmp_path / "cache")
    made: list[int] = []

    def make(seed: int, key: str) -> None:
        made.append(seed)
        cache.put_with(key, ".mlpackage", {"main": lambda p: p.mkdir()}, {})

    keys = [(1, "a" * 64), (2, "b" * 64)]
    with cache.lock(keys[1][1]):  # another process is making the second one
        with pytest.raises(TemplatePending):
            _ensure_entries(cache, keys, make, wait=False)
        assert made == [1]
    _ensure_entries(cache, keys, make, wait=False)  # released, still missing: made here
    assert made == [1, 2]
    _ensure_entries(cache, keys, make, wait=False)  # both there: nothing to do
    assert made == [1, 2]

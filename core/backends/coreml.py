"""Core ML backend: ML Program packages via coremltools from a torch.export program."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sora_export.core import runtime
from sora_export.core.types import Chunk, DeviceProfile

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32}


# Frameworks coremltools imports at start-up only to note whether they are installed
# (``coremltools._deps``): nothing on the paths this project uses reads the answer, and
# transformers alone costs a second of every process's start (measured: coremltools'
# import 2.2 s with it, 1.2 s without).
_PROBED_ONLY = ("transformers",)


def quiet_coremltools() -> Any:
    """Import coremltools without its progress bars and untested-torch chatter.

    The engine prints its own progress; coremltools' tqdm bars and the warning that torch
    2.13 is untested (the torch.export path is what we rely on and verify) would bury it.
    The first import runs with :data:`_PROBED_ONLY` hidden (a module not yet imported is
    reported missing to coremltools' probe, and importable again right after).
    """
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    first = "coremltools" not in sys.modules
    with warnings.catch_warnings(), _hidden(_PROBED_ONLY):
        warnings.simplefilter("ignore")
        import coremltools as ct
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    if first:
        runtime.settle_imports()  # its modules' objects: out of the collector's walks
    return ct


@contextlib.contextmanager
def _hidden(names: Sequence[str]) -> Iterator[None]:
    """Make ``import NAME`` fail inside the block for each name not imported yet."""
    if "coremltools" in sys.modules:
        yield
        return
    hidden = [n for n in names if n not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


# Elements per slice in :func:`fp16_overflow`: 16 MB of fp32 at a time.
OVERFLOW_SLICE = 1 << 22
FP16_MAX = 65504.0
INF_FLOOR = 1e38


def fp16_overflow(op: Any) -> bool:
    """Whether a constant fp32 input of ``op`` holds a finite value beyond fp16's range.

    The same rule as coremltools' ``FP16ComputePrecision.fp16_overflow`` (values of
    magnitude >= 1e38 count as infinities and may become fp16 inf; NaN is ignored), which
    its ``add_fp16_cast`` pass asks of every op with a constant input. coremltools answers
    with ``np.where`` over the whole tensor: two int64 index arrays, 16 bytes per weight,
    plus copies: 4.2 GB and 16 s for T5-XXL's 131M-entry embedding table, where this
    answer, slice by slice, takes 0.03 GB and 0.2 s (``examples/benchmarks/fp16_overflow.py``).
    """
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else (inputs,):
            if (
                var.op is None
                or var.op.op_type != "const"
                or not var.is_tensor_or_scalar_of(dtype="fp32")
            ):
                continue
            flat = np.asarray(var.op.val.val).reshape(-1)
            for start in range(0, flat.size, OVERFLOW_SLICE):
                magnitude = np.abs(flat[start : start + OVERFLOW_SLICE])
                finite_max = np.max(magnitude, where=magnitude < INF_FLOOR, initial=0.0)
                if finite_max > FP16_MAX:
                    return True
    return False


@contextlib.contextmanager
def bounded_fp16_overflow_check() -> Iterator[None]:
    """Within the block, coremltools' fp16 range check is :func:`fp16_overflow` (a
    coremltools without that check is left as it is)."""
    try:
        from coremltools.converters.mil.mil.passes.defs.quantization import (
            FP16ComputePrecision,
        )
    except ImportError:
        yield
        return
    original = FP16ComputePrecision.__dict__.get("fp16_overflow")
    if not isinstance(original, staticmethod):
        yield
        return
    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = original


def deployment_target(ct: Any, name: str) -> Any:
    try:
        return getattr(ct.target, name)
    except AttributeError:
        known = [t for t in dir(ct.target) if not t.startswith("_")]
        raise ValueError(f"unknown Core ML deployment target {name!r}; known: {known}") from None


class CoreMLBackend:
    """Lower to an ML Program, save (multifunction when a chunk has variants), run back."""

    name = "coreml"
    suffix = ".mlpackage"

    def lower(
        self,
        program: Any,
        chunk: Chunk,
        profile: DeviceProfile,
        precision: str,
        enumerated: Mapping[str, Sequence[tuple[int, ...]]] | None = None,
    ) -> Any:
        """Convert to an ML Program; inputs named in ``enumerated`` get
        ``ct.EnumeratedShapes`` (the default shape first; never a RangeDim)."""
        ct = quiet_coremltools()
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"Core ML lowering precision must be fp16 or fp32, got {precision}")
        enumerated = enumerated or {}
        inputs = [
            ct.TensorType(
                name=spec.name,
                shape=ct.EnumeratedShapes(
                    shapes=[list(s) for s in enumerated[spec.name]],
                    default=list(enumerated[spec.name][0]),
                )
                if spec.name in enumerated
                else spec.shape,
                dtype=_NP_DTYPES[spec.dtype],
            )
            for spec in chunk.inputs
        ]
        outputs = [ct.TensorType(name=spec.name) for spec in chunk.outputs]
        with warnings.catch_warnings(), bounded_fp16_overflow_check():
            warnings.simplefilter("ignore")
            return ct.convert(
                program,
                inputs=inputs,
                outputs=outputs,
                minimum_deployment_target=deployment_target(ct, profile.deployment_target),
                compute_precision=(
                    ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32
                ),
                compute_units=ct.ComputeUnit[profile.compute_units],
                skip_model_load=True,  # Core ML cannot load off macOS; we verify separately
            )

    def save(self, models: dict[str, Any], path: Path) -> tuple[str, ...]:
        """Write ``models`` (function name -> model) as one package: a single model as it
        is, several as the functions of one package sharing equal weights. Those are
        joined by the stitcher (one part per function: the graphs copied, blobs streamed
        and deduplicated), which takes a fraction of the time coremltools'
        ``save_multifunction`` takes to load and re-serialise every program; a graph the
        stitcher does not take (nested blocks) goes to ``save_multifunction``."""
        from sora_export.core.backends import remove_path
        from sora_export.core.backends.stitch import CHUNK_INPUT, StitchError, stitch_packages

        ct = quiet_coremltools()
        if len(models) == 1:
            (model,) = models.values()
            model.save(str(path))
            return ("main",)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".mf-") as tmp:
            singles = {}
            for function, model in models.items():
                singles[function] = Path(tmp) / f"{function}.mlpackage"
                model.save(str(singles[function]))
            names = {
                feature.name
                for model in models.values()
                for feature in model.get_spec().description.input
            }
            try:
                stitch_packages(
                    [{f: (single, "main") for f, single in singles.items()}],
                    [{name: f"{CHUNK_INPUT}{name}" for name in names}],
                    tuple(models),
                    path,
                )
            except StitchError:
                remove_path(path)
                self._save_multifunction(ct, singles, path)
        return tuple(models)

    @staticmethod
    def _save_multifunction(ct: Any, singles: Mapping[str, Path], path: Path) -> None:
        from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

        descriptor = MultiFunctionDescriptor()
        for function, single in singles.items():
            descriptor.add_function(str(single), "main", function)
        descriptor.default_function_name = next(iter(singles))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_multifunction(descriptor, str(path))

    def save_lowered(self, model: Any, path: Path) -> None:
        """Write one lowered model for the engine's cache."""
        model.save(str(path))

    def load_lowered(self, path: Path) -> Any:
        """Read back what :meth:`save_lowered` wrote, as a model the quantize hook and
        :meth:`save` accept (not loaded into Core ML: that only works on macOS)."""
        ct = quiet_coremltools()
        model = ct.models.MLModel(str(path), skip_model_load=True)
        model.get_spec()  # parse now: an unreadable entry fails here, not later
        return model

    def load(self, path: Path, function: str = "main") -> Any:
        """A ready runner for one function of a saved package (cached: the last two).

        Real Core ML on macOS; the MIL reference interpreter elsewhere. Loading decodes
        the weights, so verification times it apart from the run.
        """
        # keyed by every file's identity, so a rewritten package is never served stale
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        stamp = tuple(
            (str(f), f.stat().st_ino, f.stat().st_size, f.stat().st_mtime_ns) for f in files
        )
        key = (str(Path(path).resolve()), function, stamp)
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = _load_runner(Path(path), function)
            _RUNNERS[key] = runner
            while len(_RUNNERS) > 2:
                _RUNNERS.pop(next(iter(_RUNNERS)))
        return runner

    def run(self, path: Path, inputs: dict[str, Any], function: str = "main") -> dict[str, Any]:
        """Run one function of a saved package on numpy inputs."""
        return self.load(path, function)(inputs)

    def cross_check(
        self, path: Path, inputs: dict[str, Any], function: str, actual: dict[str, Any]
    ) -> str:
        """Where real Core ML ran (macOS), how closely the MIL interpreter agrees with it.

        Returns a note for the report, or "" where the interpreter was the runner itself.
        """
        from sora_export.core.verify.metrics import compare
        from sora_export.core.verify.mil_interpreter import (
            MILInterpreter,
            coreml_predict_available,
        )

        if not coreml_predict_available():
            return ""
        interpreted = MILInterpreter(path, function=function).run(inputs)
        fid = compare({k: np.asarray(v) for k, v in actual.items()}, interpreted)
        return (
            f"MIL interpreter vs Core ML ({function}): {fid.psnr_db:.1f} dB, "
            f"max err {fid.max_abs_err:.3g}"
        )

    @staticmethod
    def runner_name() -> str:
        from sora_export.core.verify.mil_interpreter import coreml_predict_available

        return "coreml-predict" if coreml_predict_available() else "mil-interpreter"


_RUNNERS: dict[tuple[Any, ...], Any] = {}


def _load_runner(path: Path, function: str) -> Any:
    from sora_export.core.verify.mil_interpreter import MILInterpreter, coreml_predict_available

    if not coreml_predict_available():
        return MILInterpreter(path, function=function).run
    ct = quiet_coremltools()
    kwargs = {} if function == "main" else {"function_name": function}
    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY, **kwargs)

    def predict(inputs: dict[str, Any]) -> dict[str, Any]:
        out = model.predict({k: np.asarray(v) for k, v in inputs.items()})
        return {k: np.asarray(v) for k, v in out.items()}

    return predict

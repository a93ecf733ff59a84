"""Bundle-level checks: component chains by manifest wiring, the text-to-video pipeline
through the artifacts, the PNG frame strip, and faults that only a chained run can see.

One tiny whole-pipeline bundle (t5, stdit3, both VAE decoders; 32x32, 17 frames) is
exported once per module. T5 comes from a seeded checkpoint as wide as the tiny STDiT3's
captions, which also exercises ``--weights`` in a whole-pipeline export.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_export.core.backends import tree_sha256
from sora_export.core.bundle import read_manifest
from sora_export.core.bundle_cli import plan_from_manifest, verify_bundle
from sora_export.core.cli import main
from sora_export.core.registry import Registry
from sora_export.core.types import ExportPlan
from sora_export.core.verify.pipeline import (
    ChainCheck,
    PipelineCheck,
    check_component_chain,
    check_text_to_video,
    pipeline_checks,
    write_frames,
)
from sora_export.core.verify.png import (
    PNG_SIGNATURE,
    encode_png,
    frame_indices,
    frame_strip,
    to_uint8,
)

HEIGHT = WIDTH = 32
FRAMES = 17
# Budget: 400K fp16 parameters per chunk, so STDiT3 (133.6K per block pair) gets two
# block chunks with identical I/O (blocks-00-01, blocks-02-03) that can be swapped.
SMALL_TOML = f"""
name = "pipeline-small"
description = "tiny whole-pipeline test profile: {HEIGHT}x{WIDTH}, {FRAMES} frames"
targets = ["coreml"]
deployment_target = "iOS18"
compute_units = "CPU_AND_GPU"
memory_budget_bytes = 3_300_000_000
activation_reserve_bytes = 700_000_000
resident_chunks = 2
chunk_budget_bytes = 800_000

[quantization]
default = "fp16"

[psnr_thresholds_db]
fp32 = 60.0
fp16 = 35.0
int8 = 30.0

[[shapes]]
name = "small"
height = {HEIGHT}
width = {WIDTH}
num_frames = {FRAMES}
default = true

[plugins.t5]
max_length = 16

[plugins.lpl]
mode = "dynamic"
num_steps = 30
cfg_scale = 7.0
"""
FP16_BAR_DB = 35.0


def _t5_checkpoint(path: Path, d_model: int | None = None) -> None:
    """A seeded T5 v1.1 encoder, by default as wide as the tiny STDiT3's captions."""
    from safetensors.torch import save_file

    from sora_export.core.weights import seeded_init_
    from sora_export.plugins.stdit3.model import STDIT3_CONFIGS
    from sora_export.plugins.t5.model import T5Config, T5Encoder

    stdit = STDIT3_CONFIGS["tiny"]
    cfg = T5Config(
        vocab_size=128,
        d_model=d_model or stdit.caption_channels,
        d_kv=16,
        d_ff=64,
        num_layers=4,
        num_heads=2,
        max_length=stdit.model_max_length,
    )
    model = seeded_init_(T5Encoder(cfg), seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    profile = root / "small.toml"
    profile.write_text(SMALL_TOML)
    weights = root / "t5.safetensors"
    _t5_checkpoint(weights)
    out = root / "bundle"
    # per-chunk verification is not what this module tests (and `verify` re-runs it)
    argv = ["--plugins", "t5,stdit,vae", "--profile", str(profile), "-o", str(out)]
    code = main([*argv, "--weights", f"t5={weights}", "--no-verify"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def plan(bundle: Path) -> ExportPlan:
    return plan_from_manifest(bundle, read_manifest(bundle), Registry.discover())


@pytest.fixture(scope="module")
def checks(plan: ExportPlan, bundle: Path) -> list[ChainCheck | PipelineCheck]:
    return pipeline_checks(plan, bundle)


def _copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


# -- the good bundle -----------------------------------------------------------------------
def test_component_chains_pass(checks: list, bundle: Path) -> None:
    chains = [c for c in checks if isinstance(c, ChainCheck)]
    manifest = read_manifest(bundle)
    assert [c.component for c in chains] == manifest["pipeline"]
    for check in chains:
        v = check.verification
        assert v.error == "", v.error
        assert check.passed and v.finite
        # every chunk is fp16 (35 dB): n chunks' error budgets add up to 35 - 10*log10(n)
        expected_bar = FP16_BAR_DB - 10 * math.log10(len(check.chunks))
        assert v.threshold_db == pytest.approx(expected_bar)
        assert v.psnr_db >= FP16_BAR_DB
        # fp16 artifacts really ran: they differ from fp32 PyTorch, a little
        assert 0.0 < v.max_abs_err < 1.0
        assert v.backend == "mil-interpreter" and v.seconds > 0 and v.reference_seconds > 0
    stdit = next(c for c in chains if c.component == "stdit3")
    assert stdit.chunks == ("input", "blocks-00-01", "blocks-02-03", "output")


def test_text_to_video_passes_with_a_finite_video(checks: list) -> None:
    (t2v,) = [c for c in checks if isinstance(c, PipelineCheck)]
    v = t2v.verification
    assert v.error == "", v.error
    assert t2v.passed and v.finite and v.psnr_db >= FP16_BAR_DB
    assert t2v.steps == 2 and t2v.target == "coreml"
    assert set(t2v.videos) == {"pytorch", "coreml"}
    for video in t2v.videos.values():
        assert video.shape == (3, FRAMES, HEIGHT, WIDTH) and video.dtype == np.float32
        assert np.all(np.isfinite(video))
        assert float(video.std()) > 0.05  # a decoded picture, not a constant
    difference = np.abs(t2v.videos["pytorch"] - t2v.videos["coreml"]).max()
    assert 0.0 < difference == pytest.approx(v.max_abs_err)


def test_frames_png_has_one_row_per_video(checks: list, tmp_path: Path) -> None:
    path = write_frames(checks, tmp_path / "frames.png")
    assert path is not None
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, colour) == (8 * WIDTH, 2 * HEIGHT, 8, 2)
    rows = _decode_png(data)
    (t2v,) = [c for c in checks if isinstance(c, PipelineCheck)]
    top_left = to_uint8(t2v.videos["pytorch"][:, 0].transpose(1, 2, 0))
    bottom_right = to_uint8(t2v.videos["coreml"][:, FRAMES - 1].transpose(1, 2, 0))
    np.testing.assert_array_equal(rows[:HEIGHT, :WIDTH], top_left)
    np.testing.assert_array_equal(rows[HEIGHT:, -WIDTH:], bottom_right)


def test_cli_verify_pipeline_refuses_integrity_only(bundle: Path) -> None:
    assert main(["verify", str(bundle), "--pipeline", "--integrity-only"]) == 2


# -- faults only a chained run can see -------------------------------------------------------
def test_swapped_stdit3_chunk_files_fail_the_chain(
    bundle: Path, plan: ExportPlan, tmp_path: Path
) -> None:
    copy = _copy(bundle, tmp_path / "swapped")
    manifest = read_manifest(copy)
    stdit = next(c for c in manifest["components"] if c["name"] == "stdit3")
    first, second = (e for e in stdit["chunks"] if e["name"].startswith("blocks-"))
    a, b = copy / first["path"], copy / second["path"]
    a.rename(copy / "swap.tmp")
    b.rename(a)
    (copy / "swap.tmp").rename(b)
    # a careless re-packaging: the hashes are recomputed, so integrity passes
    first["sha256"], second["sha256"] = tree_sha256(a), tree_sha256(b)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert all(c.integrity == "ok" for c in verify_bundle(copy, numeric=False))

    check = check_component_chain(plan, copy, "coreml", "stdit3")
    v = check.verification
    assert not check.passed
    assert v.error == "" and v.finite  # it ran; the numbers are wrong
    assert v.psnr_db < v.threshold_db
    assert check_component_chain(plan, copy, "coreml", "t5").passed


def _stdit3_only(bundle: Path, dest: Path) -> tuple[Path, dict]:
    """A copy of the bundle that holds only stdit3 (as ``--plugins stdit`` would write it),
    so ``verify`` re-runs 4 chunks instead of 12 and no text-to-video check."""
    copy = _copy(bundle, dest)
    manifest = read_manifest(copy)
    manifest["components"] = [c for c in manifest["components"] if c["name"] == "stdit3"]
    manifest["pipeline"] = ["stdit3"]
    manifest["dataflow"] = []
    manifest["request"].update(plugins=["stdit3"], weights={})
    return copy, manifest


def test_rewired_manifest_fails_verify_pipeline(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every artifact is intact and passes alone; only the chain shows the wiring fault."""
    copy, manifest = _stdit3_only(bundle, tmp_path / "rewired")
    (stdit,) = manifest["components"]
    output = next(e for e in stdit["chunks"] if e["name"] == "output")
    # the output chunk skips the second block chunk
    output["wiring"]["tokens"] = "stdit3/blocks-00-01:tokens_out"
    (copy / "manifest.json").write_text(json.dumps(manifest))

    assert main(["verify", str(copy), "--pipeline"]) == 1
    out = capsys.readouterr().out
    assert "all 4 artifact(s) passed" in out
    assert "1 of 1 pipeline check(s) failed" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert "FAIL" in rows["stdit3"]
    assert not (copy / "frames.png").exists()  # no text-to-video without t5 and the VAE


def test_verify_pipeline_passes_an_intact_bundle(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy, manifest = _stdit3_only(bundle, tmp_path / "intact")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy), "--pipeline"]) == 0
    assert "all 1 pipeline check(s) passed" in capsys.readouterr().out


def test_missing_null_caption_is_a_failed_check_not_a_crash(
    bundle: Path, plan: ExportPlan, tmp_path: Path
) -> None:
    copy = _copy(bundle, tmp_path / "no-null")
    (copy / "stdit3" / "null_caption.npy").unlink()
    check = check_text_to_video(plan, copy, "coreml")
    assert not check.passed and "null_caption" in check.verification.error
    assert check.videos == {}
    assert math.isinf(check.verification.psnr_db)


def test_caption_width_mismatch_is_reported_before_running(bundle: Path, tmp_path: Path) -> None:
    """A T5 narrower than STDiT3's captions cannot feed it: said before anything runs."""
    from sora_export.core import engine
    from sora_export.core.types import ExportRequest

    narrow = tmp_path / "t5-narrow.safetensors"
    _t5_checkpoint(narrow, d_model=32)
    request = ExportRequest(
        plugins=("t5", "stdit", "vae"),
        profile=str(bundle.parent / "small.toml"),
        output=bundle,
        weights={"t5": narrow},
    )
    mismatched = engine.plan(request, Registry.discover())
    check = check_text_to_video(mismatched, bundle, "coreml")
    assert not check.passed and check.videos == {}
    assert "d_model" in check.verification.error and "[1, 16, 32]" in check.verification.error


# -- the PNG writer ----------------------------------------------------------------------------
def _decode_png(data: bytes) -> np.ndarray:
    """Minimal reader for what encode_png writes (RGB, 8 bit, filter 0), checking CRCs."""
    assert data[:8] == PNG_SIGNATURE
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert size is not None and kind == b"IEND"
    width, height = size
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert np.all(raw[:, 0] == 0)
    return raw[:, 1:].reshape(height, width, 3)


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_png_round_trip(height: int, width: int, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_png(encode_png(image)), image)


@pytest.mark.parametrize(
    "image",
    [np.zeros((2, 2, 4), np.uint8), np.zeros((2, 2, 3), np.float32), np.zeros((0, 2, 3), np.uint8)],
)
def test_png_refuses_what_it_cannot_encode(image: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_png(image)


def test_to_uint8_maps_and_clips() -> None:
    values = np.array([-3.0, -1.0, 0.0, 1.0, 2.5, np.nan])
    assert to_uint8(values).tolist() == [0, 0, 128, 255, 255, 0]


@settings(max_examples=50, deadline=None)
@given(num_frames=st.integers(1, 200), frames=st.integers(1, 20))
def test_frame_indices_are_evenly_spaced_and_span_the_video(num_frames: int, frames: int) -> None:
    idx = frame_indices(num_frames, frames)
    assert len(idx) == min(frames, num_frames)
    assert idx[0] == 0
    assert idx[-1] == (num_frames - 1 if len(idx) > 1 else 0)
    gaps = np.diff(idx)
    if gaps.size:
        assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1


def test_frame_strip_layout_and_row_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    frames, h, w = 5, 3, 4
    first = torch.rand(3, frames, h, w).numpy() * 2 - 1
    second = -first
    image = frame_strip({"a": first, "b": second}, tmp_path / "s.png", frames=3)
    assert image.shape == (2 * h, 3 * w, 3)
    np.testing.assert_array_equal(_decode_png((tmp_path / "s.png").read_bytes()), image)
    # columns are frames 0, 2, 4; rows keep the mapping's order
    for col, frame in enumerate((0, 2, 4)):
        block = image[:h, col * w : (col + 1) * w]
        np.testing.assert_array_equal(block, to_uint8(first[:, frame].transpose(1, 2, 0)))
        block = image[h:, col * w : (col + 1) * w]
        np.testing.assert_array_equal(block, to_uint8(second[:, frame].transpose(1, 2, 0)))
    with pytest.raises(ValueError, match="shape"):
        frame_strip({"a": first, "b": first[:, :2]}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        frame_strip({}, tmp_path / "x.png")

"""TDTM: frame merging, patched STDiT3 blocks against a hand-written formula, and the plugin
through the engine and the CLI (multifunction block packages sharing one copy of weights)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from sora_export.core import engine
from sora_export.core.cli import main
from sora_export.core.errors import UsageError
from sora_export.core.profiles import load_profile_file
from sora_export.core.registry import Registry
from sora_export.core.types import ExportRequest
from sora_export.plugins.stdit3.model import STDiT3Block, STDiT3Blocks, STDiT3Config
from sora_export.plugins.tdtm.merge import (
    apply_tdtm,
    is_merged,
    merge_frames,
    merged_frames,
    unmerge_frames,
)
from sora_export.plugins.tdtm.plugin import TDTMSettings, settings_from_profile

PLUGIN_MODULE = "sora_export.plugins.tdtm.plugin"
# Small enough that a block runs in milliseconds; 2 heads so head handling is exercised.
CFG = STDiT3Config(depth=4, hidden_size=16, num_heads=2, caption_channels=8, model_max_length=6)


@pytest.fixture(autouse=True)
def _one_thread():
    # Every tensor here is tiny: a second intra-op thread only adds synchronisation, which
    # costs seconds on a loaded 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- merge / unmerge ---------------------------------------------------------------------
def _frames_tensor(data: st.DataObject, frames: int) -> Tensor:
    batch = data.draw(st.integers(1, 3), label="batch")
    rest = data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=3), label="rest")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    return torch.randn(batch, frames, *rest)


@settings(max_examples=60, deadline=None)
@given(frames=st.integers(1, 9), data=st.data())
def test_merge_averages_pairs_and_keeps_odd_last_frame(frames: int, data: st.DataObject) -> None:
    x = _frames_tensor(data, frames)
    merged = merge_frames(x)
    assert merged.shape == (x.shape[0], merged_frames(frames), *x.shape[2:])
    for j in range(frames // 2):
        torch.testing.assert_close(merged[:, j], (x[:, 2 * j] + x[:, 2 * j + 1]) / 2)
    if frames % 2:
        assert torch.equal(merged[:, -1], x[:, -1]), "the unpaired last frame must pass through"


@settings(max_examples=60, deadline=None)
@given(frames=st.integers(1, 9), data=st.data())
def test_unmerge_copies_each_frame_to_its_pair(frames: int, data: st.DataObject) -> None:
    y = _frames_tensor(data, merged_frames(frames))
    out = unmerge_frames(y, frames)
    assert out.shape == (y.shape[0], frames, *y.shape[2:])
    for t in range(frames):
        assert torch.equal(out[:, t], y[:, t // 2])
    # merging a video whose frames come in equal pairs loses nothing, both ways round
    assert torch.equal(merge_frames(out), y)
    assert torch.equal(unmerge_frames(merge_frames(out), frames), out)


@pytest.mark.parametrize(("merged", "frames"), [(2, 2), (2, 5), (3, 7), (1, 0), (1, 3)])
def test_unmerge_rejects_a_frame_count_that_does_not_match(merged: int, frames: int) -> None:
    with pytest.raises(ValueError, match="cannot unmerge"):
        unmerge_frames(torch.zeros(1, merged, 2), frames)


# -- a patched block against an independent formula -------------------------------------
def _pair_groups(frames: int, merge: bool) -> list[list[int]]:
    if not merge:
        return [[t] for t in range(frames)]
    return [list(range(s, min(s + 2, frames))) for s in range(0, frames, 2)]


def reference_block(
    block: STDiT3Block, x: Tensor, t_mlp: Tensor, y_tokens: Tensor, y_bias: Tensor, merge: bool
) -> Tensor:
    """One STDiT3 block written out from its submodules, with optional frame-pair merging.

    Merging is done with explicit frame groups (each pair averaged, an odd last frame alone)
    and unmerging by indexing frame ``t`` from group ``t // 2``, independently of
    :mod:`sora_export.plugins.tdtm.merge`.
    """
    batch, frames, rows, cols, dim = x.shape
    groups = _pair_groups(frames, merge)
    width = 2 if merge else 1

    def merged(v: Tensor) -> Tensor:
        return torch.stack([v[:, g].mean(dim=1) for g in groups], dim=1)

    def unmerged(v: Tensor) -> Tensor:
        return torch.stack([v[:, t // width] for t in range(frames)], dim=1)

    mod = block.scale_shift_table[None] + t_mlp.reshape(batch, 6, dim)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[:, i].reshape(batch, 1, 1, 1, dim) for i in range(6)
    )
    h = merged(F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale_msa) + shift_msa)
    m = len(groups)
    if block.temporal:
        seq = h.permute(0, 2, 3, 1, 4).reshape(batch * rows * cols, m, dim)
        attn = block.attn(seq).reshape(batch, rows, cols, m, dim).permute(0, 3, 1, 2, 4)
    else:
        attn = block.attn(h.reshape(batch * m, rows * cols, dim)).reshape(h.shape)
    x = x + gate_msa * unmerged(attn)
    q = merged(x)
    cross = block.cross_attn(q.reshape(batch, m * rows * cols, dim), y_tokens, y_bias)
    x = x + unmerged(cross.reshape(q.shape))
    h = F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * block.mlp(h)


def _blocks(start: int = 0, stop: int = 2, seed: int = 0) -> STDiT3Blocks:
    torch.manual_seed(seed)
    return STDiT3Blocks(attrs.evolve(CFG, depth=max(CFG.depth, stop)), start, stop).eval()


def _inputs(batch: int, frames: int, rows: int, cols: int, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    c, length = CFG.hidden_size, CFG.model_max_length
    x = torch.randn(batch, frames, rows, cols, c, generator=g)
    t_mlp = torch.randn(batch, 6 * c, generator=g)
    y_tokens = torch.randn(batch, length, c, generator=g)
    y_bias = torch.zeros(batch, 1, 1, length)
    y_bias[..., length // 2 :] = -1e4  # half the text is padding
    return x, t_mlp, y_tokens, y_bias


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    frames=st.integers(1, 7),
    rows=st.integers(1, 3),
    cols=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_patched_block_matches_hand_written_merge(
    batch: int, frames: int, rows: int, cols: int, seed: int
) -> None:
    blocks = _blocks(seed=seed)
    plain = copy.deepcopy(blocks)
    apply_tdtm(blocks)
    inputs = _inputs(batch, frames, rows, cols, seed)
    with torch.no_grad():
        for group in ("spatial_blocks", "temporal_blocks"):
            block = getattr(blocks, group)["1"]
            unpatched = getattr(plain, group)["1"]
            assert is_merged(block) and not is_merged(unpatched)
            # the formula is the model when nothing merges, so it checks the wiring too
            torch.testing.assert_close(
                reference_block(unpatched, *inputs, merge=False),
                unpatched(*inputs),
                rtol=1e-5,
                atol=1e-5,
            )
            torch.testing.assert_close(
                block(*inputs), reference_block(block, *inputs, merge=True), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("frames", [4, 5])
def test_merging_changes_the_output_and_one_frame_merges_nothing(frames: int) -> None:
    blocks = _blocks(seed=1)
    plain = copy.deepcopy(blocks)
    apply_tdtm(blocks)
    with torch.no_grad():
        merged_out = blocks(*_inputs(2, frames, 2, 3, seed=1))
        plain_out = plain(*_inputs(2, frames, 2, 3, seed=1))
        assert (merged_out - plain_out).abs().max() > 1e-3
        single = _inputs(2, 1, 2, 3, seed=2)
        assert torch.equal(blocks(*single), plain(*single))
        # Frames in equal pairs: a spatial block attends within each frame, so merging only
        # averages equal values and changes nothing. (A temporal block does change: RoPE
        # positions run over the merged frames.)
        x, *cond = _inputs(2, 3, 2, 3, seed=3)
        paired = unmerge_frames(x, 6)
        torch.testing.assert_close(
            blocks.spatial_blocks["0"](paired, *cond), plain.spatial_blocks["0"](paired, *cond)
        )


@settings(max_examples=15, deadline=None)
@given(
    frames=st.integers(1, 6),
    rows=st.integers(1, 3),
    cols=st.integers(1, 3),
    first=st.integers(2, 5),
    width=st.integers(1, 3),
)
def test_block_range_patches_only_its_pairs(
    frames: int, rows: int, cols: int, first: int, width: int
) -> None:
    blocks = _blocks(2, 5, seed=first)  # pairs 2, 3, 4 of a deeper model
    plain = copy.deepcopy(blocks)
    apply_tdtm(blocks, (first, first + width))
    inside = set(range(first, first + width))
    inputs = _inputs(1, frames, rows, cols, seed=width)
    with torch.no_grad():
        for index in range(2, 5):
            for group in ("spatial_blocks", "temporal_blocks"):
                block = getattr(blocks, group)[str(index)]
                assert is_merged(block) == (index in inside)
                if index not in inside:  # merging off: bit-identical to the unpatched block
                    assert torch.equal(block(*inputs), getattr(plain, group)[str(index)](*inputs))
        if not inside & {2, 3, 4}:
            assert torch.equal(blocks(*inputs), plain(*inputs))


def test_patch_shares_weights_keeps_keys_and_survives_deepcopy() -> None:
    blocks = _blocks(seed=4)
    before = {k: v.data_ptr() for k, v in blocks.state_dict().items()}
    assert apply_tdtm(blocks) is blocks
    after = {k: v.data_ptr() for k, v in blocks.state_dict().items()}
    assert after == before, "weights must be shared, not copied, and keys unchanged"
    inputs = _inputs(1, 4, 2, 2, seed=4)
    with torch.no_grad():
        once = blocks(*inputs)
        apply_tdtm(blocks)  # idempotent: no double merging
        assert torch.equal(blocks(*inputs), once)
        clone = copy.deepcopy(blocks)
        assert all(is_merged(b) for b in clone.spatial_blocks.values())
        assert torch.equal(clone(*inputs), once)
        clone.spatial_blocks["0"].attn.proj.bias.add_(1.0)
        assert torch.equal(blocks(*inputs), once), "a deep copy must not share weights"


def test_apply_tdtm_rejects_other_modules_and_bad_ranges() -> None:
    with pytest.raises(TypeError, match="STDiT3Blocks"):
        apply_tdtm(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_range"):
        apply_tdtm(_blocks(), (2, 1))


# -- profile options ---------------------------------------------------------------------
PROFILE_TOML = """
name = "tdtm-test"
targets = ["coreml"]
deployment_target = "iOS18"
compute_units = "CPU_AND_GPU"
memory_budget_bytes = 3_300_000_000
activation_reserve_bytes = 700_000_000
{extra}
[quantization]
default = "fp16"

[psnr_thresholds_db]
fp32 = 60.0
fp16 = 35.0

[[shapes]]
name = "64x64x17"
height = 64
width = 64
num_frames = 17
default = true

{plugins}
"""


def _profile_file(tmp_path: Path, plugins: str = "", extra: str = "") -> Path:
    path = tmp_path / "profile.toml"
    path.write_text(PROFILE_TOML.format(plugins=plugins, extra=extra))
    return path


def test_settings_defaults_and_step_count(tmp_path: Path) -> None:
    bare = load_profile_file(_profile_file(tmp_path))
    assert settings_from_profile(bare) == TDTMSettings(merge_steps=15, num_steps=30)
    lpl = load_profile_file(
        _profile_file(tmp_path, "[plugins.lpl]\nnum_steps = 50\n[plugins.tdtm]\nblocks = [1, 3]")
    )
    s = settings_from_profile(lpl, depth=4)
    assert (s.merge_steps, s.num_steps, s.blocks) == (25, 50, (1, 3))
    assert s.schedule() == ["tdtm"] * 25 + ["plain"] * 25
    assert s.rule() == "use function 'tdtm' for denoising steps 0..24, 'plain' after"
    sampler = attrs.evolve(bare, plugin_options={"sampler": {"num_steps": 10}})
    assert settings_from_profile(sampler).num_steps == 10


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"merge_steps": -1}, "merge_steps"),
        ({"merge_steps": 31}, "merge_steps"),
        ({"merge_steps": 2.5}, "merge_steps"),
        ({"merge_steps": True}, "merge_steps"),
        ({"merge_steps": "15"}, "merge_steps"),
        ({"blocks": [3, 3]}, "blocks"),
        ({"blocks": [0, 5]}, "blocks"),
        ({"blocks": [-1, 2]}, "blocks"),
        ({"blocks": [1]}, "blocks"),
        ({"blocks": [0.0, 2]}, "blocks"),
        ({"blocks": "0-2"}, "blocks"),
        ({"merge": 3}, "merge"),
    ],
)
def test_bad_option_is_usage_error_naming_the_field(
    tmp_path: Path, options: dict, field: str
) -> None:
    profile = attrs.evolve(
        load_profile_file(_profile_file(tmp_path)), plugin_options={"tdtm": options}
    )
    with pytest.raises(UsageError, match=rf"\[plugins\.tdtm\] {field}"):
        settings_from_profile(profile, depth=4)


# -- through the engine ------------------------------------------------------------------
def _plan(tmp_path: Path, plugins: tuple[str, ...], profile: Path) -> engine.ExportPlan:
    registry = Registry.discover(extra_modules=[PLUGIN_MODULE])
    request = ExportRequest(plugins=plugins, profile=str(profile), output=tmp_path / "o")
    return engine.plan(request, registry)


def test_plan_gives_variants_only_to_chunks_in_the_block_range(tmp_path: Path) -> None:
    # one block pair per chunk: a tiny pair is 133.6K params, 267 KB in the default fp16
    budget = "chunk_budget_bytes = 300_000\n"
    profile = _profile_file(tmp_path, "[plugins.tdtm]\nblocks = [1, 3]", extra=budget)
    plan = _plan(tmp_path, ("stdit", "tdtm"), profile)
    functions = {c.name: c.functions for c in plan.chunks}
    assert functions == {
        "input": ("main",),
        "blocks-00-00": ("main",),
        "blocks-01-01": ("plain", "tdtm"),
        "blocks-02-02": ("plain", "tdtm"),
        "blocks-03-03": ("main",),
        "output": ("main",),
    }
    assert not (tmp_path / "o").exists()
    off = _profile_file(tmp_path, "[plugins.tdtm]\nmerge_steps = 0", extra=budget)
    assert {c.functions for c in _plan(tmp_path, ("stdit", "tdtm"), off).chunks} == {("main",)}
    # without the tdtm plugin selected the same profile exports plain chunks only
    assert {c.functions for c in _plan(tmp_path, ("stdit",), profile).chunks} == {("main",)}


def _tdtm_export_args(profile: Path, out: Path) -> list[str]:
    return [
        *("--plugins", "stdit,tdtm", "--plugin-module", PLUGIN_MODULE),
        *("--profile", str(profile), "-o", str(out)),
    ]


def test_bad_profile_option_exits_2_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    profile = _profile_file(tmp_path, "[plugins.tdtm]\nblocks = [2, 9]")
    out = tmp_path / "o"
    code = main(_tdtm_export_args(profile, out))
    assert code == 2
    # (rich markup swallows the "[plugins.tdtm]" of the message on the console; the
    # exception itself names it, see test_bad_option_is_usage_error_naming_the_field)
    assert "blocks must be" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "o.partial").exists()
    with pytest.raises(UsageError, match=r"\[plugins\.tdtm\] blocks"):
        _plan(tmp_path, ("stdit", "tdtm"), profile)


def test_tdtm_without_stdit3_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["--plugins", "tdtm", "--plugin-module", PLUGIN_MODULE, "-o", str(tmp_path / "o")])
    assert code == 2
    assert "plugin 'tdtm' needs component(s) stdit3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tdtm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sora-export --plugins stdit,tdtm`` (tiny, verified) at a small odd-frame shape."""
    tmp = tmp_path_factory.mktemp("tdtm")
    profile = _profile_file(tmp, "[plugins.tdtm]\nmerge_steps = 12\n[plugins.lpl]\nnum_steps = 24")
    out = tmp / "out"
    code = main(_tdtm_export_args(profile, out))
    assert code == 0
    return out


def test_cli_export_manifest_has_tdtm_section_and_functions(tdtm_bundle: Path) -> None:
    manifest = json.loads((tdtm_bundle / "manifest.json").read_text())
    assert "tdtm" in manifest["transforms"]
    (component,) = manifest["components"]
    chunks = {c["name"]: c for c in component["chunks"]}
    blocks = [name for name in chunks if name.startswith("blocks-")]
    assert blocks, "the tiny model has block chunks"
    for name, chunk in chunks.items():
        assert chunk["functions"] == (["plain", "tdtm"] if name in blocks else ["main"])
    section = manifest["tdtm"]
    assert section["merge_steps"] == 12 and section["num_steps"] == 24
    assert section["blocks"] == [0, 4]
    assert section["functions"] == {"merged": "tdtm", "plain": "plain"}
    assert section["rule"] == "use function 'tdtm' for denoising steps 0..11, 'plain' after"
    assert section["schedule"] == ["tdtm"] * 12 + ["plain"] * 12
    assert section["chunks"] == blocks
    report = json.loads((tdtm_bundle / "report.json").read_text())
    assert report["ok"] and all(c["verification"]["passed"] for c in report["chunks"])


def test_block_packages_hold_both_functions_and_weights_once(
    tdtm_bundle: Path, tmp_path: Path
) -> None:
    from coremltools.converters.mil.frontend.milproto.load import load

    from sora_export.core.backends.coreml import quiet_coremltools

    ct = quiet_coremltools()
    manifest = json.loads((tdtm_bundle / "manifest.json").read_text())
    block_chunks = [c for c in manifest["components"][0]["chunks"] if "tdtm" in c["functions"]]
    weight_bytes: dict[str, int] = {}
    for chunk in block_chunks:
        package = tdtm_bundle / chunk["path"]
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        assert sorted(f.name for f in spec.description.functions) == ["plain", "tdtm"]
        weights = package / "Data" / "com.apple.CoreML" / "weights"
        program = load(spec, spec.specificationVersion, str(weights))
        assert sorted(program.functions) == ["plain", "tdtm"]
        weight_bytes[chunk["name"]] = sum(f.stat().st_size for f in weights.iterdir())

    # The same chunk exported without tdtm: a single-function package of the same weights.
    chunk = block_chunks[0]
    profile = tdtm_bundle.parent / "profile.toml"
    plan = attrs.evolve(_plan(tmp_path, ("stdit",), profile), verify=False)
    (plain_chunk,) = [c for c in plan.chunks if c.name == chunk["name"]]
    assert plain_chunk.functions == ("main",)
    registry = Registry.discover()
    (result,) = engine.export_chunk(plain_chunk, plan, registry, set(plan.plugins), tmp_path)
    assert result.ok and result.artifact is not None
    single = result.artifact.bytes
    multi = chunk["bytes"]
    assert single > 0 and multi < 1.3 * single, f"multifunction {multi} B vs single {single} B"
    single_weights = tmp_path / result.artifact.path / "Data" / "com.apple.CoreML" / "weights"
    single_weight_bytes = sum(f.stat().st_size for f in single_weights.iterdir())
    assert weight_bytes[chunk["name"]] < 1.05 * single_weight_bytes, "weights stored twice"

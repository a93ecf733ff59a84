"""Loading STDiT3 checkpoints in Open-Sora's key layout, strictly, and refusing bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sora_export.core import engine
from sora_export.core.cli import main
from sora_export.core.errors import UsageError
from sora_export.core.registry import Registry
from sora_export.core.types import ExportRequest
from sora_export.core.weights import seeded_init_
from sora_export.plugins.stdit3.model import STDIT3_CONFIGS, STDiT3
from sora_export.plugins.stdit3.plugin import model_inputs


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    model = seeded_init_(STDiT3(STDIT3_CONFIGS["tiny"]), seed=11)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # Open-Sora checkpoints also carry the fixed RoPE frequencies
    head_dim = STDIT3_CONFIGS["tiny"].head_dim
    state["rope.freqs"] = 10000 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    return state


def _plan(tmp_path: Path, weights: Path):
    request = ExportRequest(
        plugins=("stdit",), output=tmp_path / "out", weights={"stdit3": weights}
    )
    return engine.plan(request, Registry.discover())


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-nested-module-prefix"])
def test_checkpoint_loads_strictly_and_matches(tmp_path: Path, tiny_state, fmt: str) -> None:
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(tiny_state, str(path))
    elif fmt == "pt":
        path = tmp_path / "model.pt"
        torch.save(tiny_state, path)
    else:
        path = tmp_path / "ema.pth"
        torch.save({"model": {"module." + k: v for k, v in tiny_state.items()}}, path)
    plan = _plan(tmp_path, path)
    (component,) = plan.components
    assert component.description.cfg == STDIT3_CONFIGS["tiny"]  # read from shapes
    # the chunks hold exactly the checkpoint's values, and chain to the same output
    from sora_export.core.verify.chain import run_chain

    names = ("x", "timestep", "y", "mask", "fps", "height", "width")
    inputs = model_inputs(component.description.cfg, component.description.shape, 0)
    values = run_chain(component.chunks, dict(zip(names, inputs, strict=True)))
    model = STDiT3(STDIT3_CONFIGS["tiny"])
    model.load_state_dict(tiny_state, strict=True)
    with torch.no_grad():
        expected = model.eval()(*inputs)
    got = values[f"stdit3/{component.chunks[-1].name}:velocity"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _cli_refuses(tmp_path: Path, weights: Path, capsys) -> str:
    out = tmp_path / "out"
    code = main(["--plugins", "stdit", "--weights", f"stdit3={weights}", "-o", str(out)])
    assert code == 2
    assert not out.exists() and not out.with_name("out.partial").exists()
    return capsys.readouterr().err


def test_missing_key_is_named(tmp_path: Path, tiny_state, capsys) -> None:
    state = dict(tiny_state)
    del state["temporal_blocks.2.attn.proj.weight"]
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    err = _cli_refuses(tmp_path, path, capsys)
    assert "missing key" in err and "temporal_blocks.2.attn.proj.weight" in err


def test_wrong_shape_is_named(tmp_path: Path, tiny_state, capsys) -> None:
    state = dict(tiny_state)
    state["spatial_blocks.1.mlp.fc2.bias"] = torch.zeros(7)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    err = _cli_refuses(tmp_path, path, capsys)
    assert "spatial_blocks.1.mlp.fc2.bias" in err and "[7]" in err and "[64]" in err


def test_unexpected_key_is_named(tmp_path: Path, tiny_state, capsys) -> None:
    state = dict(tiny_state)
    state["spatial_blocks.0.attn.extra"] = torch.zeros(3)
    path = tmp_path / "m.pt"
    torch.save(state, path)
    err = _cli_refuses(tmp_path, path, capsys)
    assert "unexpected key" in err and "spatial_blocks.0.attn.extra" in err


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file_is_named(tmp_path: Path, tiny_state, capsys, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_file(tiny_state, str(path))
    else:
        torch.save(tiny_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _cli_refuses(tmp_path, path, capsys)
    assert str(path) in err and ("truncated" in err or "not a readable" in err)


def test_not_a_checkpoint_is_named(tmp_path: Path, capsys) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    err = _cli_refuses(tmp_path, path, capsys)
    assert str(path) in err


def test_missing_file_and_unknown_suffix(tmp_path: Path, capsys) -> None:
    err = _cli_refuses(tmp_path, tmp_path / "nope.safetensors", capsys)
    assert "does not exist" in err
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"\x89HDF")
    err = _cli_refuses(tmp_path, odd, capsys)
    assert "unknown suffix" in err


def test_weights_for_unselected_component_is_refused(tmp_path: Path, tiny_state) -> None:
    path = tmp_path / "m.safetensors"
    save_file(tiny_state, str(path))
    with pytest.raises(UsageError, match="unknown component"):
        engine.plan(
            ExportRequest(plugins=("stdit",), output=tmp_path / "o", weights={"unet": path}),
            Registry.discover(),
        )

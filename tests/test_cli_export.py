"""End-to-end: the CLI exports tiny STDiT3 into a bundle that coremltools reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sora_export.core.cli import main


def test_bundle_layout_and_manifest(tiny_stdit_bundle: Path) -> None:
    manifest = json.loads((tiny_stdit_bundle / "manifest.json").read_text())
    assert manifest["format"] == "sora-export-bundle"
    assert manifest["version"] == 1
    assert manifest["profile"]["name"] == "iphone15pro"
    assert manifest["pipeline"] == ["stdit3"]
    (component,) = manifest["components"]
    assert component["name"] == "stdit3" and component["target"] == "coreml"
    chunks = component["chunks"]
    assert len(chunks) >= 3
    assert chunks[0]["name"] == "input" and chunks[-1]["name"] == "output"
    for chunk in chunks:
        path = tiny_stdit_bundle / chunk["path"]
        assert path.suffix == ".mlpackage" and path.is_dir()
        assert chunk["bytes"] > 0 and len(chunk["sha256"]) == 64
        assert chunk["functions"] == ["main"]
        for spec in chunk["inputs"] + chunk["outputs"]:
            assert set(spec) == {"name", "shape", "dtype"}
    # wiring: every block/output input comes from the pipeline or an earlier chunk's output
    produced = {"pipeline"}
    for chunk in chunks:
        for source in chunk["wiring"].values():
            origin = source.split(":")[0]
            assert origin in produced, source
        produced.add(f"stdit3/{chunk['name']}")


def test_packages_read_back_with_manifest_io(tiny_stdit_bundle: Path) -> None:
    from sora_export.core.backends.coreml import quiet_coremltools

    ct = quiet_coremltools()
    manifest = json.loads((tiny_stdit_bundle / "manifest.json").read_text())
    for chunk in manifest["components"][0]["chunks"]:
        model = ct.models.MLModel(str(tiny_stdit_bundle / chunk["path"]), skip_model_load=True)
        spec = model.get_spec()
        assert [i.name for i in spec.description.input] == [i["name"] for i in chunk["inputs"]]
        assert [o.name for o in spec.description.output] == [o["name"] for o in chunk["outputs"]]
        for got, want in zip(spec.description.input, chunk["inputs"], strict=True):
            assert list(got.type.multiArrayType.shape) == want["shape"]


def test_report_has_timings_sizes_and_memory(tiny_stdit_bundle: Path) -> None:
    report = json.loads((tiny_stdit_bundle / "report.json").read_text())
    assert report["ok"] is True
    assert report["total_seconds"] > 0
    assert report["peak_rss_bytes"] > 10_000_000
    assert report["random_weights"] == ["stdit3"]
    for chunk in report["chunks"]:
        assert {"build", "capture", "lower", "save"} <= set(chunk["timings"])
        assert chunk["bytes"] > 0 and chunk["params"] > 0
        assert chunk["quantization"] in ("fp16", "fp32")


def test_unknown_plugin_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["--plugins", "stdti", "-o", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown plugin 'stdti'" in err and "stdit3" in err
    assert not (tmp_path / "o").exists()


def test_existing_bundle_is_refused_and_untouched(
    tiny_stdit_bundle: Path, capsys: pytest.CaptureFixture
) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_stdit_bundle.rglob("*")}
    code = main(["--plugins", "stdit", "-o", str(tiny_stdit_bundle)])
    assert code == 2
    assert "already holds a bundle" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in tiny_stdit_bundle.rglob("*")}
    assert before == after


def test_list_plugins_and_profiles(capsys: pytest.CaptureFixture) -> None:
    assert main(["--list-plugins"]) == 0
    out = capsys.readouterr().out
    assert "stdit3" in out and "built-in" in out
    assert main(["--list-profiles"]) == 0
    out = capsys.readouterr().out
    for name in ("iphone15pro", "iphone16pro", "macos15"):
        assert name in out


def test_missing_plugins_flag_is_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "--plugins is required" in capsys.readouterr().err


def test_bad_weights_spec_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--plugins", "stdit", "--weights", "nonsense", "-o", str(tmp_path / "o")])
    assert info.value.code == 2

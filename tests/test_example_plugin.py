"""The example third-party package (examples/plugin-package), installed as a user would.

The package is built and installed with pip into a directory of its own (offline: no
dependencies, no build isolation), and the CLI runs in a subprocess that sees that
directory only through ``PYTHONPATH``: the plugins are found through the entry points in
the installed ``*.dist-info``, exactly as for a distribution installed from an index.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin-package"
TUTORIAL = ROOT / "docs" / "writing-a-plugin.md"
DIST = "sora-export-tinyclip"
ORIGIN = f"{DIST} 0.1.0"
# Per-chunk budget of the test profile: two tiny layers at fp16 (198,272 parameters each),
# so the four layers of the tiny config become two chunks.
TWO_LAYERS_BYTES = 800_000
PROFILE = f"""
name = "tinyclip-test"
targets = ["coreml"]
deployment_target = "iOS18"
compute_units = "CPU_AND_GPU"
memory_budget_bytes = 3_300_000_000
activation_reserve_bytes = 700_000_000
chunk_budget_bytes = {TWO_LAYERS_BYTES}

[[shapes]]
name = "256x256x68"
height = 256
width = 256
num_frames = 68

[plugins.clamp-activations]
limit = 20000.0
"""


@attrs.frozen
class Installed:
    source: Path  # a copy of the package source (pip and pytest write next to it)
    site: Path  # the --target directory holding the package and its dist-info


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300):
    done = subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done.returncode, done.stdout + done.stderr


def _env(site: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SORA_EXPORT_PLUGINS", "PYTHONPATH")}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    env["COLUMNS"] = "200"  # rich wraps table cells to the terminal width
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        pytest.fail(f"{DIST} is installed in this environment; uninstall it for a fresh install")
    root = tmp_path_factory.mktemp("tinyclip")
    source = root / "plugin-package"
    # a copy, so the in-tree build (build/, *.egg-info) never lands in the repository
    shutil.copytree(
        PACKAGE,
        source,
        ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".hypothesis"
        ),
    )
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    code, out = _run(
        [*pip, "--no-index", "--quiet", "--target", str(site), str(source)], _env(None), root
    )
    assert code == 0, out
    assert (site / "sora_export_tinyclip").is_dir()
    return Installed(source=source, site=site)


def test_list_plugins_names_the_distribution(installed: Installed) -> None:
    cli = [sys.executable, "-m", "sora_export.core.cli", "--list-plugins"]
    code, out = _run(cli, _env(installed.site), installed.source.parent)
    assert code == 0, out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    for plugin in ("tinyclip", "clamp-activations"):
        assert plugin in rows, out
        assert ORIGIN in rows[plugin], rows[plugin]
    assert "transform clamp-activations (needs tinyclip)" in rows["clamp-activations"]
    assert rows["stdit3"].count("built-in") == 1


def test_cli_exports_the_component_with_the_transform(installed: Installed, tmp_path: Path) -> None:
    profile = tmp_path / "tinyclip-test.toml"
    profile.write_text(PROFILE)
    out_dir = tmp_path / "bundle"
    cli = [sys.executable, "-m", "sora_export.core.cli"]
    args = ["--plugins", "tinyclip,clamp-activations", "--profile", str(profile)]
    code, out = _run([*cli, *args, "-o", str(out_dir)], _env(installed.site), tmp_path)
    assert code == 0, out

    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["pipeline"] == ["tinyclip"]
    assert manifest["transforms"] == ["clamp-activations"]
    assert {"tinyclip", "clamp-activations"} <= set(manifest["plugins"])
    (component,) = manifest["components"]
    names = [c["name"] for c in component["chunks"]]
    assert names == ["embed", "layers-00-01", "layers-02-03", "final-norm"]
    assert component["chunks"][2]["wiring"] == {"hidden": "tinyclip/layers-00-01:hidden_out"}
    for chunk in component["chunks"]:
        assert (out_dir / chunk["path"]).is_dir() and chunk["bytes"] > 0
    # the sections contributed by the two plugins' package hooks
    assert manifest["clamp-activations"] == {
        "component": "tinyclip",
        "limit": 20000.0,
        "chunks": ["layers-00-01", "layers-02-03"],
        "rule": "each encoder layer's output is clamped to [-limit, limit]",
    }
    assert manifest["tinyclip"]["eos_id"] == manifest["tinyclip"]["vocab_size"] - 1

    report = json.loads((out_dir / "report.json").read_text())
    assert report["ok"] is True
    assert report["random_weights"] == ["tinyclip"]
    assert len(report["chunks"]) == 4
    assert all(c["verification"]["passed"] for c in report["chunks"])


def test_the_example_package_tests_pass(installed: Installed) -> None:
    # run from the package directory with this project's interpreter and pytest; the
    # package's own pytest settings put src/ on the path
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    code, out = _run(pytest_cmd, _env(None), installed.source)
    assert code == 0, out
    assert " passed" in out and "failed" not in out


def test_tutorial_code_is_quoted_from_the_package() -> None:
    sources = [PACKAGE / "pyproject.toml", PACKAGE / "README.md"]
    sources += sorted(PACKAGE.glob("src/**/*.py")) + sorted(PACKAGE.glob("tests/*.py"))
    text = "\n".join(path.read_text() for path in sources)
    blocks = re.findall(r"```(python|toml)\n(.*?)```", TUTORIAL.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 10
    for language, block in blocks:
        assert block in text, f"{language} block not found in the example package:\n{block}"

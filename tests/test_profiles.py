"""Device profiles: built-ins load, TOML files are validated field by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sora_export.core.errors import UsageError
from sora_export.core.profiles import load_profile_file, profile_from_toml
from sora_export.core.registry import Registry

GOOD = """
name = "lab"
targets = ["coreml"]
deployment_target = "iOS18"
compute_units = "CPU_AND_GPU"
memory_budget_bytes = 3_000_000_000
activation_reserve_bytes = 1_000_000_000

[[shapes]]
name = "s"
height = 256
width = 256
num_frames = 68
"""


def test_builtin_iphone15pro() -> None:
    profile = Registry.discover().profile("iphone15pro")
    assert profile.deployment_target == "iOS18"
    assert profile.compute_units == "CPU_AND_GPU"
    assert profile.memory_budget_bytes == 3_300_000_000
    # two resident chunks plus the activation reserve fit the usable memory
    assert 2 * profile.per_chunk_budget_bytes + profile.activation_reserve_bytes <= (
        profile.memory_budget_bytes
    )
    latents = {s.name: (s.latent_frames, *s.latent_hw) for s in profile.shapes}
    assert latents == {"256x256x68": (20, 32, 32), "192x192x68": (20, 24, 24)}
    assert profile.default_shape.name == "256x256x68"
    assert profile.quantization.for_chunk("t5", "blocks-00-05") == "int8"
    assert profile.quantization.for_chunk("stdit3", "input") == "fp32"
    assert profile.quantization.for_chunk("stdit3", "blocks-00-14") == "fp16"
    assert profile.threshold_for("fp32") == 60 and profile.threshold_for("fp16") == 35


def test_other_builtins() -> None:
    registry = Registry.discover()
    assert registry.profile("iphone16pro").deployment_target == "iOS18"
    mac = registry.profile("macos15")
    assert mac.deployment_target == "macOS15" and mac.compute_units == "ALL"


def test_good_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(GOOD)
    profile = load_profile_file(path)
    assert profile.name == "lab" and profile.per_chunk_budget_bytes == 1_000_000_000


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (GOOD + "colour = 'red'\n", "unknown field 'colour'"),
        (
            GOOD.replace("memory_budget_bytes = 3_000_000_000", 'memory_budget_bytes = "3GB"'),
            "'memory_budget_bytes' must be a integer",
        ),
        (GOOD.replace('compute_units = "CPU_AND_GPU"', 'compute_units = "GPU"'), "compute_units"),
        (GOOD.replace('targets = ["coreml"]', 'targets = ["tflite"]'), "unknown target 'tflite'"),
        (GOOD.replace("height = 256", "height = 250"), "multiple of 16"),
        (GOOD + "[quantization]\ndefault = 'int3'\n", "quantization.default"),
        (GOOD + "[quantization]\nlevels = 3\n", "quantization.levels"),
        (GOOD.replace("num_frames = 68", "num_frames = 68\nfps = 24"), "unknown field 'fps'"),
        (GOOD.replace('deployment_target = "iOS18"\n', ""), "deployment_target"),
    ],
)
def test_bad_fields_are_named(edit: str, message: str) -> None:
    with pytest.raises(UsageError, match=r"lab\.toml") as info:
        profile_from_toml(edit, "lab.toml")
    assert message.replace("a integer", "an integer") in str(info.value) or message in str(
        info.value
    )


def test_syntax_error_names_line() -> None:
    with pytest.raises(UsageError, match=r"line 3"):
        profile_from_toml('name = "x"\ntargets = ["coreml"]\nmemory = = 3\n', "bad.toml")


def test_unknown_profile_lists_known(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="iphone15pro"):
        Registry.discover().profile("iphone15")

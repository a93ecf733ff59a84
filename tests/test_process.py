"""Process start and end: coremltools imported without the frameworks it only probes for,
and the quick exit (core/quick_exit.py) keeping later exit handlers and the status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import atexit, sys
from sora_export.core import quick_exit
quick_exit.arm()
atexit.register(lambda: open({marker!r}, "w").write("cleaned"))
{body}
"""


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("quick_exit.set_code(0); sys.exit(0)", 0),
        ("quick_exit.set_code(3); sys.exit(3)", 3),
        ("raise RuntimeError('boom')", 1),  # an uncaught error still exits 1
    ],
)
def test_handlers_registered_later_still_run(tmp_path: Path, body: str, status: int) -> None:
    marker = tmp_path / "marker"
    script = SCRIPT.format(marker=str(marker), body=body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == status, done.stderr
    # e.g. coremltools removing its temporary packages: registered after arm(), run before
    assert marker.read_text() == "cleaned"


def test_coremltools_import_leaves_probe_only_frameworks_importable() -> None:
    """transformers is hidden from coremltools' start-up probe only: not imported by it
    (a second of every process's start), importable right after."""
    probe = (
        "import sys\n"
        "from sora_export.core.backends.coreml import quiet_coremltools\n"
        "quiet_coremltools()\n"
        "print('transformers' in sys.modules)\n"
        "import transformers\n"
        "print(transformers.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "transformers"]

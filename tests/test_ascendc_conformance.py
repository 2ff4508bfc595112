"""The kernel files the CPU twin compiles must also type-check against Huawei's open AscendC headers
(`make ascendc-check`: ascendc-check, a checker kept outside this repository, and an asc-devkit checkout).
Runs where both exist, found as the Makefile finds them (ASCENDC_CHECK and ASC_DEVKIT_DIR, with the
Makefile's defaults, the development machine's layout); skipped elsewhere.
"""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "csrc" / "ascend" / "kernel"
CHECK = pathlib.Path(os.environ.get("ASCENDC_CHECK", ROOT.parent / "shared" / "ascendc-check" / "check.sh"))
DEVKIT = pathlib.Path(os.environ.get("ASC_DEVKIT_DIR", "/tmp/asc-devkit"))


def test_kernel_folder_holds_no_twin_header():
    """A kernel_operator.h beside the kernel would shadow Huawei's in the check."""
    assert not (KERNEL_DIR / "kernel_operator.h").exists()
    for f in KERNEL_DIR.iterdir():
        text = f.read_text()
        includes = [line for line in text.splitlines() if line.lstrip().startswith("#include")]
        assert all("torch" not in i and "pybind" not in i and "acl" not in i for i in includes), (f.name, includes)
        assert "<<<" not in text, f"host launch code in {f.name}"


@pytest.mark.skipif(not CHECK.exists() or not (DEVKIT / "include").exists(),
                    reason="ascendc-check or asc-devkit checkout not available")
def test_kernel_type_checks_against_asc_devkit():
    files = sorted(str(p) for p in KERNEL_DIR.glob("*.cpp"))
    assert files
    res = subprocess.run([str(CHECK), *files], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ASC_DEVKIT_DIR=str(DEVKIT)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(line.startswith("ok ") for line in res.stdout.strip().splitlines()), res.stdout

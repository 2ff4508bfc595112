"""Planted-bug suite for the strict CPU twin (docs/ascendc.md "The strict twin").

The real kernel source (csrc/ascend/kernel) is compiled once per ``PlantedBug`` value with
``-DSELATTN_PLANTED_BUG=N``: each variant carries exactly one deliberate bug of the kinds that hang or
corrupt a real Ascend chip (event-id collision with TQue, missing pipe barriers and waits, flag misuse,
API limits, UB overflow, reading unspecified padding). ``csrc/ascend/twin/planted_driver.cpp`` runs every
variant through the twin on one problem; each must be caught with a message naming the bug, and the real
kernel (variant 0) must run clean and match a float64 evaluation, on 910B2, 910B4, 910_9391 and 310P3, both
in one work item per token and split over cores with the combine launch.
Needs a C++20 compiler (g++ or $CXX); the build (about 15 files, cached under build/) is skipped where
none exists. Nothing here runs on an NPU.
"""

import concurrent.futures
import hashlib
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASCEND = ROOT / "csrc" / "ascend"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
SOCS = ("Ascend910B2", "Ascend910B4", "Ascend910_9391", "Ascend310P3")

# PlantedBug value -> (its name in selective_attention_kernel.h, a regex the twin's message must match)
EXPECTED = {
    1: ("PLANT_EVENT_ID0", r"SetFlag<V_MTE2>\(0\) on a flag that is already set"),
    2: ("PLANT_NO_PIPE_M_BARRIER", r"Mmad accumulates .* no PipeBarrier<PIPE_M>\(\) between them \(Mmad\.md\)"),
    3: ("PLANT_NO_MTE2_V_WAIT", r"race on UB .*\(Add on V of AIV\d\) races with the write by DataCopyPad\(GM->UB\) on MTE2"),
    4: ("PLANT_NO_V_MTE3_WAIT", r"race on UB .*\(DataCopyPad\(UB->GM\) on MTE3 of AIV\d\) races with the write by \w+ on V"),
    5: ("PLANT_DOUBLE_SET", r"SetFlag<\w+>\(\d\) on a flag that is already set"),
    6: ("PLANT_WAIT_WITHOUT_SET", r"WaitFlag<\w+>\(\d\) with no SetFlag before it: a deadlock"),
    7: ("PLANT_CROSS_FLAG_OVERFLOW", r"CrossCoreSetFlag\(5\): the flag's counter overflows"),
    8: ("PLANT_MISALIGNED_COPY", r"DataCopyPad\(GM->UB\) .*must start 32-byte aligned"),
    9: ("PLANT_BLOCK_COUNT_4096", r"blockCount 4096 outside \[1, 4095\]"),
    10: ("PLANT_MMAD_K_UNALIGNED", r"Mmad: k = \d+ is not a multiple of C0 = 16"),
    11: ("PLANT_UB_OVERFLOW", r"UB overflow on Ascend"),
    12: ("PLANT_UNPADDED_TAIL", r"NaN in out where the float64 evaluation is finite: the kernel used data the chip "
                               r"leaves unspecified"),
    13: ("PLANT_NO_V_MTE2_WAIT", r"race on UB .*\(DataCopyPad\(GM->UB\) on MTE2 of AIV\d\) races with the write by "
                                r"Duplicate on V"),
    14: ("PLANT_CROSS_FLAG_WRONG_PIPE", r"race on GM workspace .*DataCopy\(Nd2Nz\) on MTE2 of the AIC.*"
                                       r"DataCopyPad\(UB->GM\) on MTE3 of AIV\d"),
}

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/clang++) to build the planted variants")


def _sources():
    files = sorted((ASCEND / "kernel").glob("*")) + sorted((ASCEND / "host").glob("*")) + [
        ASCEND / "twin" / "kernel_operator.h", ASCEND / "twin" / "twin_launch.h", ASCEND / "twin" / "planted_driver.cpp"]
    return files


def _kernel_enum():
    text = (ASCEND / "kernel" / "selective_attention_kernel.h").read_text()
    body = text[text.index("enum PlantedBug"):text.index("PLANT_COUNT")]
    return re.findall(r"\b(PLANT_[A-Z0-9_]+)\b", body)


@pytest.fixture(scope="module")
def driver():
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _sources()) + CXX.encode()).hexdigest()[:16]
    out = ROOT / "build" / "ascendc_planted" / digest
    exe = out / "planted_driver"
    if exe.exists():
        return exe
    out.mkdir(parents=True, exist_ok=True)
    inc = [f"-I{ASCEND / d}" for d in ("twin", "kernel", "host")]
    base = [CXX, "-std=c++20", "-O0", "-pthread", *inc]  # -O0: the build dominates, the run is tiny
    n = len(_kernel_enum()) - 1  # PLANT_NONE .. PLANT_COUNT - 1

    def compile_variant(i):
        obj = out / f"variant_{i}.o"
        cmd = base + ["-c", str(ASCEND / "kernel" / "selective_attention.cpp"), "-o", str(obj), "-DSELATTN_F16_ONLY",
                      f"-DSELATTN_PLANTED_BUG={i}", f"-Dselattn=selattn_plant{i}",
                      f"-Dselective_attention_f16=plant_entry_{i}", f"-Dselective_attention_combine_f16=plant_combine_{i}"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return obj

    def compile_plain(src, name):
        obj = out / name
        subprocess.run(base + ["-c", str(src), "-o", str(obj)], check=True, capture_output=True, text=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = [pool.submit(compile_variant, i) for i in range(n + 1)]
        jobs.append(pool.submit(compile_plain, ASCEND / "host" / "tiling.cpp", "tiling.o"))
        jobs.append(pool.submit(compile_plain, ASCEND / "twin" / "planted_driver.cpp", "driver.o"))
        try:
            objs = [str(j.result()) for j in jobs]
        except subprocess.CalledProcessError as e:
            pytest.fail(f"building a planted variant failed: {' '.join(e.cmd)}\n{e.stderr[-3000:]}")
    tmp = out / "planted_driver.tmp"
    subprocess.run(base + objs + ["-o", str(tmp)], check=True, capture_output=True, text=True)
    tmp.rename(exe)
    return exe


def test_every_planted_bug_is_listed():
    names = _kernel_enum()
    assert names[0] == "PLANT_NONE"
    assert {i: names[i] for i in EXPECTED} == {i: v[0] for i, v in EXPECTED.items()}
    assert len(names) - 1 == len(EXPECTED) >= 12


@pytest.mark.parametrize("soc", SOCS)
def test_planted_bugs_are_caught_and_the_real_kernel_is_clean(driver, soc):
    res = subprocess.run([str(driver), soc], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ATTENTION_TWIN_HANG_S="10"))
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert lines.pop("0") == "clean", "the real kernel must run clean and match float64"
    # and with the decode split: partial results of several splits, merged by the combine launch
    assert lines.pop("split") == "clean", "the real kernel with split candidates must run clean and match float64"
    problems = []
    for i, (name, pattern) in EXPECTED.items():
        got = lines.get(str(i), "<no output>")
        if not (got.startswith("caught: ") or got.startswith("wrong: ")) or not re.search(pattern, got):
            problems.append(f"{name}: {got}")
    assert not problems, "\n".join(problems)

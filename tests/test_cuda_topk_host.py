"""Host emulation of the CUDA top-k (csrc/cuda/topk.cu) against python_ref.

csrc/cuda/topk_host_check.cpp runs the kernels' selection logic - the __host__ __device__ functions of
csrc/cuda/topk_select.cuh, compiled here by a plain C++ compiler - over the same slice decomposition as
the GPU, and must return exactly python_ref.selection.topk_indices (= the float64 oracle's order:
descending, ties to the lower position, NaN as -inf, -1 padding). It checks the selection logic, not
the CUDA scheduling: the kernel itself has never run on a GPU (docs/selection.md, CUDA section).
"""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from python_ref.selection import topk_indices, topk_indices_dense

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "cuda"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = tmp_path_factory.mktemp("topk_host") / "topk_host_check"
    if CXX:
        cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror"]
    elif NVCC:
        cmd = [NVCC, "-x", "c++", "-std=c++17", "-O2"]  # host compiler only, no CUDA runtime
    else:
        pytest.skip("no C++ compiler (g++, clang++ or nvcc) to build the host emulation")
    subprocess.run(cmd + ["-I", str(CSRC), str(CSRC / "topk_host_check.cpp"), "-o", str(exe)], check=True)
    return exe


def run(exe, scores: torch.Tensor, k: int, sms: int, lengths=None):
    """The emulation's [T, 1, k] indices and the finish path each row took."""
    T, W = scores.shape
    bits = scores.contiguous().view(torch.int32).numpy().view(np.uint32).ravel()
    lens = [] if lengths is None else lengths.tolist()
    text = (f"{T} {W} {k} {sms} {len(lens)}\n" + " ".join(str(n) for n in lens) + "\n"
            + " ".join(f"{b:x}" for b in bits.tolist()) + "\n")
    res = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = torch.tensor([[int(v) for v in line.split()] for line in res.stdout.splitlines()], dtype=torch.int32)
    info = [line.split() for line in res.stderr.splitlines()]
    return out.view(T, 1, k), [i[-1] for i in info], int(info[0][3])


def check(exe, scores, k, sms=132, lengths=None):
    got, paths, slices = run(exe, scores, k, sms, lengths)
    want = topk_indices(scores, k, lengths)
    assert torch.equal(got, want), (got != want).nonzero()[:5]
    assert torch.equal(want, topk_indices_dense(scores, k, lengths))  # the reference agrees with the oracle
    return paths, slices


def _rows(gen, T, W, *, spread=1.0):
    """Random float32 rows with ties, NaN, -inf, +inf, -0.0/+0.0, and an all-invalid row."""
    s = torch.randn(T, W, generator=gen) * spread
    s = torch.where(torch.rand(T, W, generator=gen) < 0.3, (s * 8).round() / 8, s)  # many exact ties
    u = torch.rand(T, W, generator=gen)
    s[u < 0.02] = float("nan")
    s[(u >= 0.02) & (u < 0.05)] = float("-inf")
    s[(u >= 0.05) & (u < 0.06)] = -0.0
    s[(u >= 0.06) & (u < 0.061)] = float("inf")
    s[0] = float("-inf")
    s[0, ::3] = float("nan")
    return s


def test_decode_multi_cta_random_rows(driver):
    """4 rows x 20K, k = 2048 and small k: several CTAs per row, every path of the row mix."""
    gen = torch.Generator().manual_seed(0)
    s = _rows(gen, 4, 20000)
    for k in (2048, 300, 1):
        paths, slices = check(driver, s, k)
        assert slices == 5  # 20000 / kMinSlice (4096), rounded up, under the 2 * SMs / rows = 66 cap
        assert "shared" in paths
        assert paths[0] == "shared"  # all-invalid row: -inf/NaN are never threshold-bin candidates


def test_slice_counts_do_not_change_the_result(driver):
    gen = torch.Generator().manual_seed(1)
    s = _rows(gen, 2, 70000, spread=4.0)
    seen = set()
    for sms in (1, 8, 1000):  # 1, 8 and 18 (= 70000 / 4096, rounded up) CTAs per row
        _, slices = check(driver, s, 2048, sms=sms)
        seen.add(slices)
    assert seen == {1, 8, 18}


def test_crowded_threshold_bin_takes_the_exact_fallback(driver):
    """Scores within one eighth of a binade (one coarse bin), and all-equal rows: > 2048 candidates
    in the threshold bin, so the finish refines it over the row; ties still go to the lower position."""
    gen = torch.Generator().manual_seed(2)
    s = 1.0 + torch.rand(5, 9000, generator=gen) * 0.1
    # scores a few ulps apart: the refinement must resolve every bit down to the lowest
    s[4] = (0x3F800000 + torch.randint(0, 6, (9000,), generator=gen, dtype=torch.int32)).view(torch.float32)
    s[0, ::97] += 2.0  # 93 scores above the crowded bin: selected before the refinement
    s[1] = (s[1] * 64).round() / 64  # few distinct values, long runs of ties
    s[2] = 0.75  # every score equal
    s[1, 5::7] = float("nan")
    s[3] = float("-inf")  # 10 valid scores (a causal row): -inf is not crowding, it is -1 padding
    s[3, 4000:4010] = torch.arange(10.0)
    s[3, 7000:7004] = -3e38  # valid, in the -inf coarse bin
    for k in (2048, 77):
        paths, _ = check(driver, s, k)
        # row 0 at k = 77: the threshold is among the 93 raised scores, not in the crowded bin
        assert paths == ["fallback" if k == 2048 else "shared", "fallback", "fallback", "shared", "fallback"]


def test_row_no_wider_than_k(driver):
    gen = torch.Generator().manual_seed(3)
    s = _rows(gen, 3, 500)
    paths, _ = check(driver, s, 512)
    assert paths == ["whole_row"] * 3
    paths, _ = check(driver, s[:, :512].contiguous(), 512)
    assert paths == ["whole_row"] * 3


def test_per_row_lengths(driver):
    """vLLM's per-row lengths: row t ranks positions [0, lengths[t]) only, whatever lies beyond (here
    the row's best scores); lengths <= k take the whole-row finish, longer ones the multi-CTA passes;
    out-of-range lengths are clamped to [0, W] (the kernel's row_width), never read past the row."""
    gen = torch.Generator().manual_seed(4)
    W = 12000
    s = _rows(gen, 7, W)
    s[:, 9000:] = 50.0  # past every length but the last two: must never be selected
    lengths = torch.tensor([0, 1, 700, 2048, 5000, W, W + 77], dtype=torch.int32)
    paths, slices = check(driver, s, 2048, lengths=lengths)
    assert slices == 3  # planned for the full width (12000 / 4096, rounded up)
    assert paths[:4] == ["whole_row"] * 4 and paths[4:] == ["shared", "fallback", "fallback"]
    got, _, _ = run(driver, s, 2048, 132, lengths)
    assert int(got[4].max()) < 5000 and int(got[3].max()) < 2048
    paths, _ = check(driver, s, 300, sms=8, lengths=torch.tensor([-3, 299, 300, 301, 4100, 9001, 0]))
    assert paths == ["whole_row"] * 3 + ["shared"] * 3 + ["whole_row"]

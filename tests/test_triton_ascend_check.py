"""The Ascend path of the Triton backend, what runs without triton-ascend: bench/triton_ascend_check.py's
reading of bishengir-compile's output and saved HIVM IR (planned UB/L1 bytes, chip sizes, overflow and
retry diagnostics, scalar feature loops) and its verdicts; the shipped Ascend records; the row gather (GATHER_ROWS) and the
rope chunk size (BLOCK_DR) under the interpreter against the float64 oracle; the npu offer of the
Triton backend; and that `make triton-ascend-check` skips cleanly without PyPI.

The compile itself (`make triton-ascend-check`) needs the triton-ascend environment and is not run here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attention
from attention import tuning
from attention.testing import CASES_BY_NAME, DTYPE_NAMES, TOLERANCES, oracle
from attention.testing import max_error as _max_err
from bench import triton_ascend_check as tac

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the IR and log readers

SPEC = ('module attributes {dlti.target_system_spec = #dlti.target_system_spec<"NPU" : #hacc.target_device_spec<'
        '#dlti.dl_entry<"AI_CORE_COUNT", 24 : i32>, #dlti.dl_entry<"UB_SIZE", 1572864 : i32>, '
        '#dlti.dl_entry<"L1_SIZE", 4194304 : i32>, #dlti.dl_entry<"L0C_SIZE", 1048576 : i32>>>} {\n')


def _ir(body: str) -> str:
    return SPEC + body + "}\n"


def test_chip_sizes_come_from_the_target_spec_in_bits():
    sizes = tac.chip_sizes(_ir(""))
    assert sizes == {"ub": 1572864 // 8, "cbuf": 4194304 // 8, "cc": 1048576 // 8}


def test_planned_bytes_is_the_highest_end_over_planned_buffers():
    # Two UB buffers (the second double-buffered: two offsets) and one L1 buffer.
    body = ("  %c0_i64 = arith.constant 0 : i64\n  %c4096_i64 = arith.constant 4096 : i64\n"
            "  %c70000_i64 = arith.constant 70000 : i64\n  %c512_i64 = arith.constant 512 : i64\n"
            "  %1 = hivm.hir.pointer_cast(%c0_i64) : memref<16x64xf32, #hivm.address_space<ub>>\n"
            "  %2 = hivm.hir.pointer_cast(%c4096_i64, %c70000_i64) : memref<16x512xbf16, #hivm.address_space<ub>>\n"
            "  %3 = hivm.hir.pointer_cast(%c512_i64) : memref<32x128xbf16, strided<[128, 1]>, #hivm.address_space<cbuf>>\n"
            "  %4 = hivm.hir.pointer_cast(%c0_i64) : memref<0xi1, #hivm.address_space<ub>>\n")
    got = tac.planned_bytes(_ir(body))
    assert got == {"ub": 70000 + 16 * 512 * 2, "cbuf": 512 + 32 * 128 * 2}


def test_planned_bytes_refuses_an_unplanned_offset():
    body = "  %1 = hivm.hir.pointer_cast(%arg3) : memref<16xf32, #hivm.address_space<ub>>\n"
    with pytest.raises(ValueError, match="not a constant"):
        tac.planned_bytes(_ir(body))


LOG_OVERFLOW = ('[NOTE] Ub overflow detected; automatically set enable-auto-multi-buffer to false and retrying '
                'compilation.\nloc("k.mlir":3:3): error: ub overflow, requires 4030464 bits while 1572864 bits '
                'available! (possible reason: tiling basic block is too large)\n[ERROR] Failed to run BiShengIR pipeline\n')
LOG_HIVMC = ("[ERROR] Cannot find hivmc under $PATH \nloc(\"k.mlir\":1:1): error: External hivmc run fails, returning "
             "module before running external compiler\n[ERROR] Failed to run BiShengIR pipeline\n")
LOG_RETRIED = ("[NOTE] Ub overflow detected; automatically set enable-code-motion to false and retrying compilation.\n"
               + LOG_HIVMC)


def test_overflow_diagnostic_is_read_in_bytes():
    assert tac.overflows(LOG_OVERFLOW) == [("ub", 4030464 // 8, 1572864 // 8)]
    assert tac.overflows(LOG_HIVMC) == []


ROW_COPY = ("    scf.for %arg53 = %10 to %11 step %c16_i32  : i32 {\n"
            "      scf.for %arg55 = %c0 to %c16 step %c1 {\n"
            "        %475 = memref.load %367[%arg55] {DiscreteMemAccess} : memref<16xi32, #hivm.address_space<ub>>\n"
            "        func.call @load_gm_to_ubuf_1d_bfloat16_t(%a, %b, %c0_i32, %cst, %c0) : (memref<?xbf16>) -> ()\n"
            "      } {ExtractedLoadOrStore, hivm.parallel_loop}\n"
            "    }\n")
SCALAR = ("    scf.for %arg57 = %10 to %11 step %c16_i32  : i32 {\n"
          "      scf.for %arg62 = %c0 to %c64 step %c1 {\n"
          "        scf.for %arg63 = %c0 to %c16 step %c1 {\n"
          "          %490 = memref.load %rc[%c0] {markDCacheInvalidatePatternVisited = 0 : i32} : memref<1xbf16, "
          "strided<[1], offset: ?>, #hivm.address_space<gm>>\n"
          "          memref.store %490, %469[%arg62, %arg63] : memref<64x16xbf16, #hivm.address_space<ub>>\n"
          "        } {ExtractedLoadOrStore}\n"
          "      } {ExtractedLoadOrStore, pipeline.veconly}\n"
          "    }\n")
CONSTS = ("    %c0 = arith.constant 0 : index\n    %c1 = arith.constant 1 : index\n"
          "    %c16 = arith.constant 16 : index\n    %c64 = arith.constant 64 : index\n")
# The same element loop over a block-table column (an integer) is candidate bookkeeping, not a gather.
TABLE = SCALAR.replace("memref<1xbf16", "memref<1xi32")


def test_scalar_feature_loop_is_found_inside_the_candidate_loop_only():
    found = tac.scalar_feature_loops(_ir(CONSTS + SCALAR), [64])
    assert len(found) == 1 and "64 feature columns" in found[0]
    assert tac.scalar_feature_loops(_ir(CONSTS + ROW_COPY), [16, 512]) == []
    assert tac.scalar_feature_loops(_ir(CONSTS + TABLE), [64]) == []
    # Not nested in another loop: a one-off scalar loop (e.g. the epilogue) is not a gather in the hot loop.
    outer_removed = "\n".join(SCALAR.splitlines()[1:-1]) + "\n"
    assert tac.scalar_feature_loops(_ir(CONSTS + outer_removed), [64]) == []


def test_verdicts():
    planned = ("  %c0_i64 = arith.constant 0 : i64\n"
               "  %1 = hivm.hir.pointer_cast(%c0_i64) : memref<16x512xf32, #hivm.address_space<ub>>\n")
    ok = tac.classify(LOG_HIVMC, _ir(CONSTS + planned + ROW_COPY), [512])
    assert ok["status"] == "ok" and ok["planned"] == {"ub": 16 * 512 * 4} and ok["chip"]["ub"] == 196608
    assert tac.classify(LOG_OVERFLOW, None, [512])["status"] == "overflow"
    # Fitting only because the compiler turned its own optimisations off is not fitting.
    assert tac.classify(LOG_RETRIED, _ir(CONSTS + planned), [512])["status"] == "retried"
    assert tac.classify(LOG_HIVMC, _ir(CONSTS + planned + SCALAR), [64])["status"] == "scalar-gather"
    # A pipeline that stopped anywhere but at the missing hivmc is an error, whatever it saved.
    assert tac.classify("error: 'tt.load' op failed to legalize\n", _ir(planned), [512])["status"] == "error"
    big = planned.replace("16x512xf32", "128x512xf32")  # 256 KiB planned on a 192 KiB UB
    assert tac.classify(LOG_HIVMC, _ir(big), [512])["status"] == "overflow"


def test_known_failure_is_strict(monkeypatch):
    """A listed kernel failing with its listed diagnostic is "known-fail" (does not fail the check); passing,
    or failing another way, is "unexpected" (fails it). (The list is empty today: the select kernel's
    entry, hivm vsort's f16/f32-only operands, went with the Ascend variant's pair network.)"""
    why = "'hivm.hir.vsort' op failed to verify that operand at idx 0 and 1 should have element type"
    monkeypatch.setitem(tac.KNOWN_FAILURES, "_select_kernel", why)
    row = dict(soc="Ascend910B2", kernel="_select_kernel", status="error", log="loc(...): error: " + why)
    assert tac.apply_known_failures(row)["status"] == "known-fail"
    assert tac.apply_known_failures(dict(row, status="ok", log=None))["status"] == "unexpected"
    assert tac.apply_known_failures(dict(row, log="error: something else"))["status"] == "unexpected"
    other = dict(row, kernel="_indexer_kernel")
    assert tac.apply_known_failures(other) == other


def test_select_is_offered_on_npu_within_the_pair_network_limits():
    """The Ascend variant compiles (make triton-ascend-check), so select is offered on npu again at
    DeepSeek's k = 2048; declined past k = 2048 (264 KiB of UB at 4096), with the reason."""
    from types import SimpleNamespace

    from attention.backends.triton import selection

    inp = SimpleNamespace(op="select", block_size=1, k=2048, quantized=False, device=SimpleNamespace(type="npu"))
    assert selection.limit_reasons(inp) == []
    assert any("k=4096 > 2048 on npu" in r for r in selection.limit_reasons(SimpleNamespace(**{**vars(inp), "k": 4096})))
    assert selection.limit_reasons(SimpleNamespace(**{**vars(inp), "device": torch.device("cpu"), "k": 4096})) == []


def test_pair_network_refuses_more_slots_than_float32_positions_hold(monkeypatch):
    """The pair network carries positions as float32 (exact below 2**24): a paged cache whose table
    spans more slots is refused with a ValueError naming k_idx, before any kernel runs (CPU tensors,
    the variant forced). Blocks of 2 positions halve the slots and pass that check."""
    from attention.backends.triton import selection
    from attention.selection import validate_selection

    monkeypatch.setattr(selection.LAUNCHER, "pair_sort_override", True)
    monkeypatch.setattr(selection, "_kernels", lambda: pytest.fail("a kernel was reached"))
    page = 64
    table = torch.zeros(1, (1 << 24) // page + 1, dtype=torch.int32)
    args = dict(q_idx=torch.randn(1, 2, 16), k_idx=torch.randn(1, page, 16), weights=torch.randn(1, 2),
                block_table=table, seqlens_k=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_idx: 16777280 key slots per sequence > 16777216"):
        selection.LAUNCHER.run(validate_selection("select", k=4, **args))
    inp = validate_selection("select", k=4, block_size=2, **args)
    assert selection._max_slots(inp) <= selection.PAIR_MAX_SLOTS


@pytest.mark.parametrize("soc", tac.SOCS)
def test_pair_sort_is_chosen_for_ascend_only(soc, monkeypatch):
    """The select's Ascend variant runs on npu and wherever an Ascend SoC is planned for (its record's
    SELECT_PAIR_SORT, what the check compiles); NVIDIA targets and the interpreter keep tl.sort."""
    from types import SimpleNamespace

    from attention.backends.triton import launch
    from attention.backends.triton.selection import LAUNCHER

    cpu = torch.device("cpu")
    assert LAUNCHER.pair_sort(SimpleNamespace(type="npu")) and not LAUNCHER.pair_sort(cpu)
    monkeypatch.setenv(launch.TARGET_ENV, soc)
    assert LAUNCHER.pair_sort(cpu) and LAUNCHER.device_config(cpu)["SELECT_BLOCK_N"] == 32
    monkeypatch.setenv(launch.TARGET_ENV, "NVIDIA H200")
    assert not LAUNCHER.pair_sort(cpu)


def test_feature_widths_are_the_launch_d_tiles():
    cfg = {"BLOCK_H": 16, "BLOCK_N": 16, "BLOCK_D": 64, "BLOCK_DV": 128, "BLOCK_DR": 16, "K_PAD": 2048}
    assert tac.feature_widths(cfg) == [16, 64, 128]


# ---------------------------------------------------------------- the shipped Ascend records


@pytest.mark.parametrize("soc", tac.SOCS)
def test_shipped_ascend_record_is_marked_compile_checked_and_plans(soc, monkeypatch):
    from attention.backends.triton import launch

    rec = tuning.shipped_entry("triton", soc)
    assert rec is not None and rec["name"] == soc
    assert rec["measured"] is False and rec["status"] == "compile-checked, never ran"
    assert "never ran" in rec["note"] and tuning.config_problems(rec["config"]) == []
    assert rec["config"]["GATHER_ROWS"] == 1 and rec["config"]["SELECT_PAIR_SORT"] == 1
    # Planned for the SoC (what the check compiles): its record, its AI-core count for the split choice.
    monkeypatch.setenv(launch.TARGET_ENV, soc)
    inp = attention.validate(**CASES_BY_NAME["deepseek_split_rope"].make(torch.float32, "cpu"))
    cfg, source = launch.resolve_config(inp)
    assert source == "default" and cfg["GATHER_ROWS"] == 1
    assert launch.plan(inp, cfg)["KEPT_CHUNK"] == rec["config"]["KEPT_CHUNK"]
    assert launch.sm_count(inp.device) == dict(launch.SM_COUNTS)[soc]


# ---------------------------------------------------------------- the kernels' Ascend shapes, on the interpreter

triton = pytest.importorskip("triton")
from attention.backends.triton import BACKEND, launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not BACKEND.test_devices(), reason="triton backend cannot run here")
@pytest.mark.parametrize("case_name", ["gqa_separate_v", "deepseek_split_rope", "paged_latent_rope_sink_causal",
                                       "block4_causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_row_gather_and_rope_chunk_match_oracle(case_name, dtype):
    """The general kernel with the Ascend records' shapes: keys gathered as rows and transposed on chip,
    a rope chunk (BLOCK_DR 16) narrower than BLOCK_D, 16 x 16 tiles, split candidates."""
    args = CASES_BY_NAME[case_name].make(dtype, DEVICE)
    inp = attention.validate(**args)
    cfg = dict(LATENT=0, GATHER_ROWS=1, BLOCK_H=16, BLOCK_N=16, BLOCK_D=64, BLOCK_DR=16, BLOCK_DV=128, num_splits=2)
    p = launch.plan(inp, dict(tuning.FALLBACK_CONFIG, **cfg))
    assert p["kernel"] == "general" and p["GATHER_ROWS"] and (not inp.rope_dim or p["BLOCK_DR"] == 16)
    out, lse = launch.forward(inp, override=cfg, autotune=False)
    ref_out, ref_lse = oracle(args)
    tol_out, tol_lse = TOLERANCES[dtype]
    eo, el = _max_err(out, ref_out), _max_err(lse, ref_lse)
    assert eo <= tol_out and el <= tol_lse, f"{case_name}/{DTYPE_NAMES[dtype]}: out {eo:.3g} lse {el:.3g}"


_COVERAGE = """
import json, sys
import triton
from triton.runtime.jit import JITFunction
from attention.backends.triton import backward_kernels, kernels, merge, selection_kernels
from bench import triton_ascend_check as tac
defined = sorted({f.__name__ for m in (kernels, merge, selection_kernels, backward_kernels)
                  for f in vars(m).values() if isinstance(f, JITFunction) and f.__name__.endswith("kernel")})
seen, rows = set(), []
for p in tac.PROBLEMS:
    for fn, args, kwargs in tac.launches(p, sys.argv[1]):
        seen.add(fn.__name__)
        if fn.__name__ == "selective_attention_fwd_kernel":
            rows.append(bool(kwargs.get("GATHER_ROWS")))
print(json.dumps(dict(defined=defined, seen=sorted(seen), gather_rows=rows)))
"""


@pytest.mark.parametrize("soc", tac.SOCS[:1])
def test_check_compiles_every_kernel_of_the_package(soc):
    """What the check compiles (recorded from the launchers, no compile here) is every @triton.jit kernel
    the backend defines, and the general kernel is launched with the row gather the SoC record asks for.
    A kernel added later without a problem that launches it fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # record real JIT launches
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _COVERAGE, soc], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert got["seen"] == got["defined"] and len(got["defined"]) >= 8, got
    assert got["gather_rows"] and all(got["gather_rows"]), got


@pytest.mark.skipif(not BACKEND.test_devices(), reason="triton backend cannot run here")
@pytest.mark.parametrize("case_name", ["k_large_odd", "block4_causal", "block_causal_varlen"])
def test_latent_kernel_with_a_short_kept_chunk_matches_oracle(case_name):
    """The latent kernel with the Ascend records' 16 x 16 tiles and a kept-end pass in chunks (KEPT_CHUNK)
    shorter than the candidate list, so the pass takes several steps."""
    args = CASES_BY_NAME[case_name].make(torch.float32, DEVICE)
    inp = attention.validate(**args)
    cfg = dict(BLOCK_H=16, BLOCK_N=16, KEPT_CHUNK=16)
    p = launch.plan(inp, dict(tuning.FALLBACK_CONFIG, **cfg))
    assert p["kernel"] == "latent" and p["KEPT_CHUNK"] == 16 and inp.topk * inp.block_size > 16
    out, lse = launch.forward(inp, override=cfg, autotune=False)
    ref_out, ref_lse = oracle(args)
    tol_out, tol_lse = TOLERANCES[torch.float32]
    assert _max_err(out, ref_out) <= tol_out and _max_err(lse, ref_lse) <= tol_lse


# ---------------------------------------------------------------- triton-ascend's 65535-program limit


def test_token_chunks_fit_the_npu_program_limit():
    """A DeepSeek prefill over 8191 tokens (8 head blocks of 16 per token on Ascend) is launched in
    pieces of at most 65535 programs, chunks of a multiple of 16 tokens (one t_start specialization)."""
    from types import SimpleNamespace

    from attention.backends.triton import limits

    assert limits.max_programs("npu") == 65535 and limits.max_programs("cuda") is None
    npu = SimpleNamespace(type="npu")
    chunks = launch.token_chunks(8200, 8, npu)
    assert chunks == [(0, 8176), (8176, 24)] and all(n * 8 <= 65535 for _, n in chunks)
    assert launch.token_chunks(8200, 8, torch.device("cpu")) == [(0, 8200)]
    # Not refused: the limit is per launch; only one token's programs must fit one launch.
    inp = SimpleNamespace(num_tokens=8200, num_heads=128, num_kv_heads=1, d_v=512, topk=2048, block_size=1,
                          device=npu)
    assert limits.reasons(inp) == []
    inp.num_kv_heads, inp.num_heads = 2 ** 16, 2 ** 16  # 65536 programs for one token
    assert any("programs per launch on npu" in r for r in limits.reasons(inp))


def test_backward_over_the_npu_program_limit_is_declined():
    """The backward's launch is not split: on npu a DeepSeek prefill backward of 8192 tokens (8 head
    blocks of 16) is declined with the limit named (the registry runs the reference's backward); 8191
    tokens and cuda are not."""
    from types import SimpleNamespace

    args = CASES_BY_NAME["deepseek_widths"].make(torch.float32, "cpu")
    real = attention.validate(**args)
    fields = {n: getattr(real, n) for n in ("v", "d_v", "head_dim", "rope_dim", "num_kv_heads", "block_size",
                                            "topk", "features", "kv_quantized")}
    inp = SimpleNamespace(**fields, op="attention_backward", num_tokens=8192, num_heads=128,
                          device=SimpleNamespace(type="npu"))
    from attention.backends.triton.backward import plan as backward_plan

    assert backward_plan(inp)["NUM_HB"] == 8
    assert any("65536 programs > 65535 per launch on npu" in r for r in BACKEND.limit_reasons(inp))
    assert not any("per launch" in r for r in BACKEND.limit_reasons(SimpleNamespace(**{**vars(inp), "num_tokens": 8191})))
    assert not any("per launch" in r for r in BACKEND.limit_reasons(
        SimpleNamespace(**{**vars(inp), "device": SimpleNamespace(type="cuda")})))


@pytest.mark.skipif(not BACKEND.test_devices(), reason="triton backend cannot run here")
@pytest.mark.parametrize("case_name,override", [
    # 8 tokens of 3 causal sequences, 20 candidates in 2 splits (+ the combine): latent and general kernel
    ("block_causal_varlen", dict(num_splits=2, BLOCK_N=16)),
    ("block_causal_varlen", dict(LATENT=0, num_splits=2, BLOCK_H=16, BLOCK_N=16)),
], ids=["latent", "general"])
def test_forward_split_under_a_program_limit_is_exact(case_name, override, monkeypatch):
    """A program limit on the CPU (as triton-ascend's on npu, lowered to a few tokens per launch): the
    launches' boundaries cut sequences, and the result is bit for bit the one-launch result."""
    from attention.backends.triton import limits

    args = CASES_BY_NAME[case_name].make(torch.float32, DEVICE)
    inp = attention.validate(**args)
    whole = launch.forward(inp, override=override, autotune=False)
    calls = []
    real = launch.token_chunks
    monkeypatch.setattr(launch, "token_chunks", lambda *a: calls.append(real(*a)) or calls[-1])
    p = launch.plan(inp, launch.resolve_config(inp, override)[0])
    per_token = inp.num_kv_heads * p["NUM_HB"] * p["NUM_DVB"] * p["num_splits"]
    monkeypatch.setitem(limits.MAX_PROGRAMS, DEVICE, 2 * per_token)  # two tokens per launch
    out, lse = launch.forward(inp, override=override, autotune=False)
    assert p["num_splits"] == 2 and len(calls[0]) == -(-inp.num_tokens // 2) and len(calls) == 2  # + combine
    assert torch.equal(out, whole[0]) and torch.equal(lse, whole[1])
    ref_out, ref_lse = oracle(args)
    assert _max_err(out, ref_out) <= TOLERANCES[torch.float32][0] and _max_err(lse, ref_lse) <= TOLERANCES[torch.float32][1]


# ---------------------------------------------------------------- registry and info


def test_npu_is_offered_only_with_triton_ascend_and_torch_npu(monkeypatch):
    from attention.backends.triton import backend as tb

    monkeypatch.setattr(tb, "triton_ascend_version", lambda: "")
    assert "npu" not in BACKEND.device_types()
    monkeypatch.setattr(tb, "triton_ascend_version", lambda: "3.2.0")
    real = tb.importlib.util.find_spec
    monkeypatch.setattr(tb.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_npu" else real(name, *a))
    assert "npu" in BACKEND.device_types()
    # Behind the hand-written AscendC kernel, which stays first on npu.
    assert BACKEND.priority_for("npu") > attention.get_backend("ascendc").priority_for("npu")
    info = BACKEND.info()
    assert "compile-checked on x86, never ran on an NPU" in info["triton-ascend"]
    assert "npu offered" in info["triton-ascend"]
    assert "declined on npu: fp8 (" in info["triton-ascend"] and "kv_fp8 (" in info["triton-ascend"]


def test_int8_latent_cache_is_declined_on_npu():
    """The latent kernel over an int8 cache overflows Ascend's UB (275.2 KiB): declined on npu with the
    reason; an int8 separate-v cache (the general kernel, compiled) and cuda are not."""
    from types import SimpleNamespace

    inp = SimpleNamespace(op="attention", features=frozenset({"kv_int8"}), v=None, device=SimpleNamespace(type="npu"),
                          num_tokens=4, num_heads=128, num_kv_heads=1, d_v=512, topk=2048, block_size=1)
    assert any("int8 latent cache on npu" in r and "275.2 KiB" in r for r in BACKEND.limit_reasons(inp))
    assert BACKEND.limit_reasons(SimpleNamespace(**{**vars(inp), "v": torch.empty(0)})) == []
    assert BACKEND.limit_reasons(SimpleNamespace(**{**vars(inp), "device": SimpleNamespace(type="cuda")})) == []


@pytest.mark.parametrize("op,feature", [("attention", "kv_fp8"), ("select", "fp8"), ("lightning_indexer", "fp8")])
def test_fp8_is_declined_on_npu_with_the_reason(op, feature):
    """A2/A3 have no FP8 type (triton-ascend: "unexpected type fp8"): fp8 caches and indexer inputs are
    declined on npu (the registry takes the next backend); the same inputs on cuda are not, and int8
    ones (compile-checked) are not on npu."""
    from types import SimpleNamespace

    npu = SimpleNamespace(type="npu")
    inp = SimpleNamespace(op=op, features=frozenset({feature}), device=npu, v=torch.empty(0), num_tokens=4, num_heads=128,
                          num_kv_heads=1, d_v=512, topk=2048, block_size=1, k=2048, quantized=True)
    assert any("no FP8 type" in r for r in BACKEND.limit_reasons(inp))
    assert BACKEND.limit_reasons(SimpleNamespace(**{**vars(inp), "device": SimpleNamespace(type="cuda")})) == []
    int8 = SimpleNamespace(**{**vars(inp), "features": frozenset({feature.replace("fp8", "int8")})})
    assert not any("FP8" in r for r in BACKEND.limit_reasons(int8))  # (the int8 select: its own UB reason)


# ---------------------------------------------------------------- make triton-ascend-check without PyPI


def test_check_skips_cleanly_when_packages_cannot_install(tmp_path):
    """No index and an empty wheel cache (what a machine without PyPI sees): SKIPPED, exit 0; with
    TRITON_ASCEND_REQUIRED=1 a skip fails."""
    env = dict(os.environ, TA_VENV=str(tmp_path / "venv"), TA_WHEELS=str(tmp_path / "wheels"),
               PIP_NO_INDEX="1", PIP_FIND_LINKS="", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "triton_ascend_check.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "triton-ascend-check: SKIPPED (pip could not install" in r.stdout
    # Required: any skip fails (here the cheaper one, a Python that cannot make the venv).
    env.update(TRITON_ASCEND_REQUIRED="1", PYTHON="false")
    r = subprocess.run(["bash", str(ROOT / "bench" / "triton_ascend_check.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "SKIPPED (could not create" in r.stdout

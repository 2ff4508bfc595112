"""Bad input gets a clear ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import attention
from attention.registry import ATTENTION_FEATURES

i32 = torch.int32


def base(**over):
    T, H, Hkv, D, S, K = 3, 4, 2, 16, 20, 5
    args = dict(q=torch.randn(T, H, D), kv=torch.randn(S, Hkv, D),
                indices=torch.randint(0, S, (T, Hkv, K), dtype=i32))
    args.update(over)
    return args


def paged(**over):
    P, page, Hkv, D = 6, 4, 1, 16
    args = dict(q=torch.randn(2, 4, D), kv=torch.randn(P, page, Hkv, D),
                indices=torch.randint(0, 8, (2, 1, 3), dtype=i32),
                block_table=torch.tensor([[0, 3, -1]], dtype=i32), seqlens_k=torch.tensor([7], dtype=i32))
    args.update(over)
    return args


CASES = [
    # (id, args, exception, words the message must contain)
    ("q_rank", base(q=torch.randn(3, 16)), ValueError, ["q", "[T, H, Dqk]"]),
    ("q_not_tensor", base(q=[1.0]), TypeError, ["q", "torch.Tensor"]),
    ("q_int", base(q=torch.ones(3, 4, 16, dtype=torch.int32)), TypeError, ["q", "int32"]),
    ("q_float64", base(q=torch.randn(3, 4, 16, dtype=torch.float64)), TypeError, ["q", "float64"]),
    ("kv_rank", base(kv=torch.randn(20, 16)), ValueError, ["kv"]),
    ("kv_mixed_dtype", base(kv=torch.randn(20, 2, 16, dtype=torch.float16)), TypeError, ["kv", "float16"]),
    ("kv_width", base(kv=torch.randn(20, 2, 8)), ValueError, ["kv", "Dqk=16"]),
    ("heads_not_multiple", base(kv=torch.randn(20, 3, 16), indices=torch.zeros(3, 3, 5, dtype=i32)),
     ValueError, ["H=4", "Hkv=3"]),
    ("indices_float", base(indices=torch.zeros(3, 2, 5)), TypeError, ["indices", "int32 or int64", "float32"]),
    ("indices_rank", base(indices=torch.zeros(3, 5, dtype=i32)), ValueError, ["indices"]),
    ("indices_rows", base(indices=torch.zeros(4, 2, 5, dtype=i32)), ValueError, ["indices", "T=3"]),
    ("indices_heads", base(indices=torch.zeros(3, 3, 5, dtype=i32)), ValueError, ["indices", "Hkv=2"]),
    ("v_shape", base(v=torch.randn(19, 2, 8)), ValueError, ["v"]),
    ("v_dtype", base(v=torch.randn(20, 2, 8, dtype=torch.bfloat16)), TypeError, ["v", "bfloat16"]),
    ("d_v_with_v", base(v=torch.randn(20, 2, 8), d_v=4), ValueError, ["d_v", "8"]),
    ("d_v_too_big", base(d_v=17), ValueError, ["d_v", "Dqk=16"]),
    ("d_v_zero", base(d_v=0), ValueError, ["d_v"]),
    ("d_v_type", base(d_v=4.0), TypeError, ["d_v"]),
    ("rope_one_side_q", base(q_rope=torch.randn(3, 4, 8)), ValueError, ["kv_rope", "q_rope"]),
    ("rope_one_side_kv", base(kv_rope=torch.randn(20, 2, 8)), ValueError, ["q_rope", "kv_rope"]),
    ("rope_width", base(q_rope=torch.randn(3, 4, 8), kv_rope=torch.randn(20, 2, 4)), ValueError, ["kv_rope"]),
    ("rope_rows", base(q_rope=torch.randn(2, 4, 8), kv_rope=torch.randn(20, 2, 8)), ValueError, ["q_rope"]),
    ("rope_dtype", base(q_rope=torch.randn(3, 4, 8, dtype=torch.float16), kv_rope=torch.randn(20, 2, 8)),
     TypeError, ["q_rope"]),
    ("block_size_zero", base(block_size=0), ValueError, ["block_size", ">= 1"]),
    ("block_size_float", base(block_size=2.0), TypeError, ["block_size"]),
    ("sm_scale_nan", base(sm_scale=float("nan")), ValueError, ["sm_scale", "finite"]),
    ("sm_scale_inf", base(sm_scale=float("inf")), ValueError, ["sm_scale", "finite"]),
    ("sm_scale_str", base(sm_scale="0.1"), TypeError, ["sm_scale"]),
    ("sink_length", base(attn_sink=torch.zeros(3)), ValueError, ["attn_sink", "(4,)"]),
    ("sink_int", base(attn_sink=torch.zeros(4, dtype=torch.int32)), TypeError, ["attn_sink"]),
    ("causal_type", base(causal=1), TypeError, ["causal"]),
    ("cu_q_not_starting_at_zero", base(cu_seqlens_q=torch.tensor([1, 3], dtype=i32)), ValueError,
     ["cu_seqlens_q", "start at 0"]),
    ("cu_q_not_ending_at_T", base(cu_seqlens_q=torch.tensor([0, 2], dtype=i32)), ValueError,
     ["cu_seqlens_q", "T=3"]),
    ("cu_q_decreasing", base(cu_seqlens_q=torch.tensor([0, 2, 1, 3], dtype=i32),
                             cu_seqlens_k=torch.tensor([0, 5, 10, 20], dtype=i32)), ValueError,
     ["cu_seqlens_q", "non-decreasing"]),
    ("cu_q_dtype", base(cu_seqlens_q=torch.tensor([0.0, 3.0])), TypeError, ["cu_seqlens_q"]),
    ("cu_k_decreasing", base(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=i32),
                             cu_seqlens_k=torch.tensor([0, 9, 5], dtype=i32)), ValueError,
     ["cu_seqlens_k", "non-decreasing"]),
    ("cu_k_beyond_S", base(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=i32),
                           cu_seqlens_k=torch.tensor([0, 9, 21], dtype=i32)), ValueError, ["cu_seqlens_k", "S=20"]),
    ("cu_k_length", base(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=i32),
                         cu_seqlens_k=torch.tensor([0, 20], dtype=i32)), ValueError, ["cu_seqlens_k", "B+1=3"]),
    ("cu_k_missing_for_batch", base(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=i32)), ValueError,
     ["cu_seqlens_k", "B=2"]),
    ("cu_k_without_q_two_seqs", base(cu_seqlens_k=torch.tensor([0, 5, 20], dtype=i32)), ValueError,
     ["cu_seqlens_k"]),
    ("paged_without_table", paged(block_table=None), ValueError, ["block_table", "required"]),
    ("paged_without_seqlens", paged(seqlens_k=None), ValueError, ["seqlens_k", "required"]),
    ("paged_with_cu_k", paged(cu_seqlens_k=torch.tensor([0, 7], dtype=i32)), ValueError, ["cu_seqlens_k"]),
    ("table_with_contiguous", base(block_table=torch.zeros(1, 2, dtype=i32)), ValueError, ["block_table"]),
    ("seqlens_with_contiguous", base(seqlens_k=torch.tensor([5], dtype=i32)), ValueError, ["seqlens_k"]),
    ("table_entry_outside_cache", paged(block_table=torch.tensor([[0, 6, -1]], dtype=i32)), ValueError,
     ["block_table[0, 1]", "6"]),
    ("table_negative_entry_needed", paged(block_table=torch.tensor([[0, -1, -1]], dtype=i32)), ValueError,
     ["block_table[0, 1]"]),
    ("seqlens_beyond_table", paged(seqlens_k=torch.tensor([13], dtype=i32)), ValueError,
     ["seqlens_k", "capacity"]),
    ("seqlens_negative", paged(seqlens_k=torch.tensor([-1], dtype=i32)), ValueError, ["seqlens_k", ">= 0"]),
    ("table_rows", paged(block_table=torch.tensor([[0, 3, -1], [1, 2, -1]], dtype=i32)), ValueError,
     ["block_table", "B=1"]),
    ("table_dtype", paged(block_table=torch.tensor([[0.0, 3.0]])), TypeError, ["block_table"]),
    ("unknown_backend", base(backend="no_such_backend"), ValueError, ["backend", "no_such_backend"]),
    ("backend_type", base(backend=3), TypeError, ["backend"]),
    ("device_mismatch", base(indices=torch.zeros(3, 2, 5, dtype=i32, device="meta")), ValueError,
     ["indices", "device"]),
    # quantized caches: kv [20, 2, 16] int8 / float8_e4m3fn with kv_scale [20, 2, ceil(16 / b)]
    ("quant_kv_without_scale", base(kv=torch.zeros(20, 2, 16, dtype=torch.int8)), ValueError,
     ["kv_scale", "required", "(20, 2, 1)"]),
    ("quant_scale_with_float_kv", base(kv_scale=torch.ones(20, 2, 1)), ValueError, ["kv_scale", "quantized"]),
    ("quant_scale_dtype", base(kv=torch.zeros(20, 2, 16, dtype=torch.int8),
                               kv_scale=torch.ones(20, 2, 1, dtype=torch.float16)), TypeError,
     ["kv_scale", "float32", "float16"]),
    ("quant_scale_shape", base(kv=torch.zeros(20, 2, 16, dtype=torch.float8_e4m3fn), kv_scale=torch.ones(20, 2, 2)),
     ValueError, ["kv_scale", "(20, 2, 1)", "(20, 2, 2)"]),
    ("quant_scale_shape_block", base(kv=torch.zeros(20, 2, 16, dtype=torch.int8), kv_scale=torch.ones(20, 2, 1),
                                     scale_block=5), ValueError, ["kv_scale", "(20, 2, 4)", "scale_block=5"]),
    ("quant_scale_device", base(kv=torch.zeros(20, 2, 16, dtype=torch.int8),
                                kv_scale=torch.ones(20, 2, 1, device="meta")), ValueError, ["kv_scale", "device"]),
    ("quant_scale_not_tensor", base(kv=torch.zeros(20, 2, 16, dtype=torch.int8), kv_scale=1.0), TypeError,
     ["kv_scale", "torch.Tensor"]),
    ("quant_scale_block_zero", base(kv=torch.zeros(20, 2, 16, dtype=torch.int8), kv_scale=torch.ones(20, 2, 1),
                                    scale_block=0), ValueError, ["scale_block", ">= 1"]),
    ("quant_scale_block_float", base(scale_block=128.0), TypeError, ["scale_block", "int"]),
    ("quant_v_without_scale", base(v=torch.zeros(20, 2, 8, dtype=torch.int8)), ValueError, ["v_scale", "required"]),
    ("quant_v_scale_without_v", base(v_scale=torch.ones(20, 2, 1)), ValueError, ["v_scale", "v is None"]),
    ("quant_v_scale_shape", base(v=torch.zeros(20, 2, 8, dtype=torch.int8), v_scale=torch.ones(20, 2)), ValueError,
     ["v_scale", "(20, 2, 1)"]),
    ("quant_kv_e5m2", base(kv=torch.zeros(20, 2, 16, dtype=torch.float8_e5m2)), TypeError,
     ["kv", "float8_e5m2", "int8"]),
    ("quant_kv_rope_int8", base(q_rope=torch.randn(3, 4, 8), kv_rope=torch.zeros(20, 2, 8, dtype=torch.int8)),
     TypeError, ["kv_rope", "int8"]),
    ("quant_q_int8", base(q=torch.zeros(3, 4, 16, dtype=torch.int8)), TypeError, ["q", "int8"]),
]


@pytest.mark.parametrize("args,exc,words", [pytest.param(a, e, w, id=i) for i, a, e, w in CASES])
def test_bad_input(args, exc, words):
    with pytest.raises(exc) as info:
        attention.selective_attention(**args)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} lacks {w!r}"


@pytest.mark.parametrize("args,exc,words", [pytest.param(a, e, w, id=i) for i, a, e, w in CASES[:14]
                                             if i != "q_not_tensor"])
def test_bad_input_through_torch_ops(args, exc, words):
    """torch.ops.attention.selective_attention raises the same errors (a non-tensor where the
    schema wants a Tensor is refused by the dispatcher itself, with its own RuntimeError)."""
    a = dict(args)
    q, kv, idx = a.pop("q"), a.pop("kv"), a.pop("indices")
    with pytest.raises(exc):
        torch.ops.attention.selective_attention(q, kv, idx, **a)


def test_unused_table_entries_may_hold_anything():
    """Entries beyond what seqlens_k needs are never read (tables are padded with -1 or junk)."""
    a = paged(block_table=torch.tensor([[0, 3, 999]], dtype=i32))
    out = attention.selective_attention(**a)
    assert torch.isfinite(out).all()


def test_strided_inputs_are_accepted():
    a = base()
    q = torch.randn(4, 3, 16).transpose(0, 1)  # [3, 4, 16], non-contiguous
    kv = torch.randn(2, 20, 16).transpose(0, 1)
    out = attention.selective_attention(q, kv, a["indices"])
    ref = attention.selective_attention(q.contiguous(), kv.contiguous(), a["indices"])
    torch.testing.assert_close(out, ref)


def test_sink_of_other_float_dtype_is_converted():
    a = base()
    out1 = attention.selective_attention(**a, attn_sink=torch.zeros(4, dtype=torch.float16))
    out2 = attention.selective_attention(**a, attn_sink=torch.zeros(4))
    torch.testing.assert_close(out1, out2)


def test_forced_backend_that_cannot_run_lists_reasons():
    class Picky(attention.Backend):
        name = "picky_test_only"
        priorities = {"cpu": 100}
        ops = {"attention": ATTENTION_FEATURES}
        dtypes = frozenset({torch.float16})

        def forward(self, inp):  # pragma: no cover - never reached
            raise AssertionError("kernel ran on unsupported inputs")

    attention.register_backend(Picky())
    try:
        with pytest.raises(ValueError, match="picky_test_only.*dtype float32 not supported"):
            attention.selective_attention(**base(), backend="picky_test_only")
    finally:
        attention.unregister_backend("picky_test_only")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("ATTENTION_BACKEND", "no_such_backend")
    with pytest.raises(ValueError, match="no_such_backend"):
        attention.selective_attention(**base())
    monkeypatch.setenv("ATTENTION_BACKEND", "reference")
    attention.selective_attention(**base())

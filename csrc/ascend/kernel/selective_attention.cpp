// Kernel entry points, one per input dtype. Device code only (see selective_attention_kernel.h).
// A mixed cube + vector kernel: on A2/A3 each launched block is one AIC with its two AIVs (1:2).
#include "selective_attention_kernel.h"

namespace {
template <typename T>
__aicore__ inline void RunSelectiveAttention(GM_ADDR q, GM_ADDR qRope, GM_ADDR kv, GM_ADDR kvRope, GM_ADDR v,
                                             GM_ADDR kvScale, GM_ADDR vScale, GM_ADDR indices, GM_ADDR cuSeqlensQ,
                                             GM_ADDR cuSeqlensK, GM_ADDR blockTable, GM_ADDR seqlensK,
                                             GM_ADDR attnSink, GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                             GM_ADDR tiling)
{
    // the tiling struct is plain data written by the host; read it once into registers/stack
    const __gm__ selattn::SelectiveAttentionTiling* src =
        reinterpret_cast<const __gm__ selattn::SelectiveAttentionTiling*>(tiling);
    selattn::SelectiveAttentionTiling td = *src;
    selattn::SelectiveAttentionKernel<T> op;
    op.Init(q, qRope, kv, kvRope, v, kvScale, vScale, indices, cuSeqlensQ, cuSeqlensK, blockTable, seqlensK,
            attnSink, out, lse, workspace, td);
    op.Process();
}

// the combine launch (numSplits > 1; vector cores only): reads the partial results the main launch left in
// the workspace, writes out and lse. Same arguments as the main entry, so one launch helper serves both.
template <typename T>
__aicore__ inline void RunSelectiveAttentionCombine(GM_ADDR attnSink, GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                                    GM_ADDR tiling)
{
    const __gm__ selattn::SelectiveAttentionTiling* src =
        reinterpret_cast<const __gm__ selattn::SelectiveAttentionTiling*>(tiling);
    selattn::SelectiveAttentionTiling td = *src;
    selattn::SelectiveAttentionCombine<T> op;
    op.Init(attnSink, out, lse, workspace, td);
    op.Process();
}
}  // namespace

// kv (and v) hold the compute dtype, or int8 with kvScale (vScale) when the tiling says so (kvInt8, vInt8)
// Both launches (attention, then the split combine) take the same arguments, so the host launches either the same way.
#define SELATTN_ENTRY_PARAMS                                                                                        \
    GM_ADDR q, GM_ADDR qRope, GM_ADDR kv, GM_ADDR kvRope, GM_ADDR v, GM_ADDR kvScale, GM_ADDR vScale,               \
        GM_ADDR indices, GM_ADDR cuSeqlensQ, GM_ADDR cuSeqlensK, GM_ADDR blockTable, GM_ADDR seqlensK,              \
        GM_ADDR attnSink, GM_ADDR out, GM_ADDR lse, GM_ADDR workspace, GM_ADDR tiling
#define SELATTN_ENTRY(NAME, TYPE)                                                                                   \
    extern "C" __global__ __aicore__ void NAME(SELATTN_ENTRY_PARAMS)                                                \
    {                                                                                                               \
        KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);                                                          \
        RunSelectiveAttention<TYPE>(q, qRope, kv, kvRope, v, kvScale, vScale, indices, cuSeqlensQ, cuSeqlensK,     \
                                    blockTable, seqlensK, attnSink, out, lse, workspace, tiling);                   \
    }

#define SELATTN_COMBINE_ENTRY(NAME, TYPE)                                                                           \
    extern "C" __global__ __aicore__ void NAME(SELATTN_ENTRY_PARAMS)                                                \
    {                                                                                                               \
        KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);                                                             \
        RunSelectiveAttentionCombine<TYPE>(attnSink, out, lse, workspace, tiling);                                 \
    }

SELATTN_ENTRY(selective_attention_f16, half)
SELATTN_COMBINE_ENTRY(selective_attention_combine_f16, half)
#ifndef SELATTN_F16_ONLY  // the planted-bug test builds one dtype per variant (tests/test_ascendc_planted.py)
SELATTN_ENTRY(selective_attention_f32, float)
SELATTN_ENTRY(selective_attention_bf16, bfloat16_t)
SELATTN_COMBINE_ENTRY(selective_attention_combine_f32, float)
SELATTN_COMBINE_ENTRY(selective_attention_combine_bf16, bfloat16_t)
#endif

// Tiling data shared by the host (csrc/ascend/host/tiling.cpp fills it) and the kernel (reads it).
// Plain integers only: the same struct is copied byte for byte to the device, and this header is
// compiled both by the host compiler and, through the kernel, by the AscendC conformance check.
#pragma once
#include <cstdint>

namespace selattn {

// Bounds of the decode split, shared by the host planner and the kernel.
constexpr uint32_t MAX_SPLITS = 64;     // splits per (token, kv head): the combine reads all their statistics at once
constexpr uint32_t MAX_KV_SLOTS = 8;    // hand-over slots a split may keep (workspace; the kernel's kept counts)
constexpr uint32_t COMBINE_HEADS = 8;   // heads per combine step: one 32-byte row of fp32 statistics per split

// Parts P is handed to the cube in: 1 for float32; 2 for float16 / bfloat16, where P = P_hi + P_lo, both in
// the input dtype, and the cube accumulates P_hi.V + P_lo.V in fp32 in L0C. One 16-bit rounding of P costs
// a relative 2^-9 (bf16) per weight, which put 4-10% of bf16 outputs outside CANN's check_result tolerance
// (rtol 2^-7); with the residual part P is good to about 2^-17 (docs/ascendc.md, "bf16 accuracy").
// Shared by the kernel (buffer sizes, Mmads) and the host (the memory it charges, the workspace).
constexpr uint32_t ProbabilityParts(uint32_t elementBytes) { return elementBytes == 4 ? 1u : 2u; }

struct SelectiveAttentionTiling {
    // ---- problem (validated on the host; the kernel trusts these) ----
    uint32_t numTokens;      // T
    uint32_t numHeads;       // H
    uint32_t numKvHeads;     // Hkv
    uint32_t headsPerKv;     // H / Hkv: query heads packed into one cube M dimension
    uint32_t headDim;        // Dqk
    uint32_t ropeDim;        // Dr (0 = no rope)
    uint32_t valueDim;       // Dv
    uint32_t separateV;      // 1: values from v [.., Hkv, Dv]; 0: latent, value = kv[..., :Dv]
    uint32_t topk;           // K
    uint32_t indexHeads;     // indices' middle dimension: 1 (shared) or Hkv
    uint32_t blockSize;      // positions per index (1 = token selection)
    uint32_t blockSpan;      // min(blockSize, longest possible sequence): slots per index that can be kept
    uint32_t paged;          // 1: kv is [P, page, Hkv, D] with block_table / seqlens_k
    uint32_t pageSize;
    uint32_t maxPages;       // block_table's row length
    uint32_t numSeqs;        // B
    uint32_t kvRows;         // rows of the cache: S (contiguous) or P * page (paged)
    uint32_t causal;
    uint32_t hasSink;
    float smScale;
    // quantized caches (docs/contract.md "Quantized caches"): an int8 kv / v with float32 scales of shape
    // [rows, Hkv, tiles], value of column c = stored[c] * scale[c / scaleBlock]; dequantized on the vector
    // cores after the gather (only kept rows are read), rounded once to the compute dtype for the cube
    uint32_t kvInt8;         // 1: kv is int8 (kv_rope stays in the compute dtype)
    uint32_t vInt8;          // 1: the separate v is int8
    uint32_t scaleBlock;     // columns per scale
    uint32_t kvScaleTiles;   // ceil(Dqk / scaleBlock): kv_scale's last dimension
    uint32_t vScaleTiles;    // ceil(Dv / scaleBlock): v_scale's last dimension
    uint32_t quantPad;       // widest quantized row rounded up to 16 (UB staging of one row; 0 = none)
    // ---- tiling (host/tiling.cpp: chosen per SoC from its on-chip capacities) ----
    uint32_t mTile;          // query heads per cube tile (multiple of 16)
    uint32_t nTile;          // candidate positions per tile (multiple of 16)
    uint32_t dqkPad;         // Dqk rounded up to 16; rope columns start here in the packed rows
    uint32_t dkPad;          // dqkPad + Dr rounded up to 16: the contracted width of QK^T
    uint32_t dvPad;          // Dv rounded up to 16
    uint32_t dkChunk;        // QK^T contraction columns per L0A/L0B load (head-dim split)
    uint32_t dvChunk;        // PV output columns per L0B/L0C pass
    uint32_t vecBufNum;      // UB gather buffers (2 = double buffering)
    uint32_t kvBufNum;       // L1 buffers for the K and V^T tiles
    uint32_t l0BufNum;       // L0A/L0B ping-pong buffers
    uint32_t vecSubBlocks;   // vector cores per cube core (2 on A2/A3): they split the heads of a tile
    uint32_t headTiles;      // ceil(headsPerKv / mTile)
    uint32_t blockDim;       // blocks launched (cube cores used)
    // ---- decode split (docs/ascendc.md "Work per core") ----
    // A work item is (token, kv head, split): split s owns a contiguous range of the candidate tiles and
    // loops over the head tiles itself, so its kv rows are gathered once for all query heads of the kv
    // head. With numSplits > 1 each item writes a partial result (unnormalised O, running max m and sum
    // l, kept flag) to the partial region, and a second, vector-only launch combines the splits in order.
    uint32_t numSplits;      // splits of every (token, kv head): 1 .. MAX_SPLITS (1 = no combine launch)
    uint32_t kvSlots;        // K / V^T hand-over slots per block (a split's tiles, or 2 for a ping-pong)
    uint32_t gatherOnce;     // 1: the slots hold a whole split, gathered once and reused by every head tile
    uint32_t combineBlockDim;  // vector cores of the combine launch (0 when numSplits == 1)
    uint32_t combineHeads;   // query heads one combine step handles (a group of one token's heads)
    uint32_t combineGroups;  // T * ceil(H / combineHeads): the combine launch's work items
    // 64-bit: topk * blockSpan reaches 2^55 and T * Hkv * headTiles 2^62 on legal inputs
    uint64_t numTiles;       // ceil(topk * blockSpan / nTile)
    uint64_t numItems;       // T * Hkv * numSplits work items, spread over the blocks
    uint64_t workspacePerBlock;  // bytes of global scratch each block owns (cube <-> vector hand-over)
    uint64_t wsQ, wsK, wsVt, wsS, wsP, wsO;  // byte offsets of the hand-over buffers inside one block's part
    // partial results, after every block's part of the workspace (numSplits > 1 only):
    // O [T, numSplits, H, dvPad] fp32 at partialO, statistics [T, numSplits, 3, H] fp32 (m, l, kept) at
    // partialStat, both byte offsets from the workspace's start
    uint64_t partialO, partialStat, partialBytes;
};

}  // namespace selattn

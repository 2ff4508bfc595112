// Tiling data shared by the host (csrc/ascend/host/tiling.cpp fills it) and the kernel (reads it).
// Plain integers only: the same struct is copied byte for byte to the device, and this header is
// compiled both by the host compiler and, through the kernel, by the AscendC conformance check.
#pragma once
#include <cstdint>

namespace selattn {

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
    // 64-bit: topk * blockSpan reaches 2^55 and T * Hkv * headTiles 2^62 on legal inputs
    uint64_t numTiles;       // ceil(topk * blockSpan / nTile)
    uint64_t numItems;       // T * Hkv * headTiles work items, spread over the blocks
    uint64_t workspacePerBlock;  // bytes of global scratch each block owns (cube <-> vector hand-over)
    uint64_t wsQ, wsK, wsVt, wsS, wsP, wsO;  // byte offsets of the hand-over buffers inside one block's part
};

}  // namespace selattn

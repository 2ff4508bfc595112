// Host tiling for the AscendC selective-attention kernel: per-SoC capacities and the choice of tile
// sizes and buffer counts. Host code only (plain C++; no torch, no CANN), shared by the CPU twin's
// binding and the NPU binding.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "selective_attention_tiling.h"

namespace selattn {

// On-chip sizes of one SoC. Numbers from CANN's platform config files (the SoC table of
// docs/ascendc.md); on a real machine the NPU binding replaces them with the device's own report.
struct SocSpec {
    std::string name;
    std::string family;     // "A2" (910B), "A3" (910C dies), "310P"
    uint32_t aicNum;        // cube cores = blocks of the 1:2 mix launch
    uint32_t aivNum;        // vector cores
    uint32_t cubeMHz;
    uint64_t ubBytes;       // unified buffer of one vector core
    uint64_t ubReserved;    // kept back for the runtime / system use (about 8 KB on A2/A3)
    uint64_t l1Bytes;
    uint64_t l0aBytes;
    uint64_t l0bBytes;
    uint64_t l0cBytes;
    bool bf16;              // cube and vector handle bfloat16
    bool fp32Cube;          // Mmad with float operands
    uint64_t UbUsable() const { return ubBytes - ubReserved; }
    // vector cores working with one cube core in the mix launch (2 on A2/A3; 1 on 310P3's AI cores)
    uint32_t VecPerCube() const { return aivNum >= 2 * aicNum ? 2 : 1; }
};

const std::vector<SocSpec>& SocTable();
// nullptr when unknown
const SocSpec* FindSoc(const std::string& name);

struct ProblemShape {
    uint32_t T = 0, H = 0, Hkv = 1, Dqk = 0, Dr = 0, Dv = 0, K = 0, indexHeads = 1, blockSize = 1;
    uint32_t dtypeBytes = 2;
    bool isFloat32 = false, isBf16 = false;
    bool separateV = false, paged = false, causal = false, hasSink = false;
    uint32_t pageSize = 0, maxPages = 0, numSeqs = 1, kvRows = 0;
    // an int8 kv / separate v with float32 tile scales of scaleBlock columns (dequantized in the kernel)
    bool kvInt8 = false, vInt8 = false;
    uint32_t scaleBlock = 128;
    uint32_t KvScaleTiles() const { return kvInt8 ? (Dqk + scaleBlock - 1) / scaleBlock : 0; }
    uint32_t VScaleTiles() const { return separateV && vInt8 ? (Dv + scaleBlock - 1) / scaleBlock : 0; }
    // Upper bound of every sequence length L_b: the cache rows (contiguous) or max_pages * page (paged);
    // UINT64_MAX when unknown (plan() without it). Positions >= it are dropped by the contract.
    uint64_t maxSeqLen = UINT64_MAX;
    float smScale = 1.0f;
    // Candidate slots of one index that can ever be kept: r < min(block_size, maxSeqLen), since
    // position = index * block_size + r >= r. The kernel scans K * BlockSpan() slots, never K * block_size,
    // so a huge block over a small cache costs the cache, not the block.
    uint32_t BlockSpan() const { return static_cast<uint32_t>(blockSize < maxSeqLen ? blockSize : maxSeqLen); }
    uint64_t Candidates() const { return uint64_t(K) * BlockSpan(); }
};

struct TileChoice {
    uint32_t mTile = 16, nTile = 16, dkChunk = 16, dvChunk = 16, vecBufNum = 1, kvBufNum = 1, l0BufNum = 1;
    uint32_t numSplits = 0;  // splits per (token, kv head); 0 = the planner's choice (SplitsFor)
};

// How the candidate tiles of a (token, kv head) are split over cores (docs/ascendc.md "Work per core").
struct SplitPlan {
    uint32_t numSplits = 1;   // 1 .. MAX_SPLITS, never more than the tiles
    uint64_t splitTiles = 0;  // the most tiles one split holds (splits differ by at most one tile)
    uint32_t kvSlots = 1;     // K / V^T hand-over slots per block
    bool gatherOnce = false;  // the slots hold a whole split: its rows are gathered once for every head tile
};
// Splits that fill the cube cores (floor(aicNum / (T * Hkv)) per (token, kv head), so that no core runs
// two items while others idle), at least enough for a split to fit the hand-over slots when there are
// several head tiles, at most one per tile and MAX_SPLITS; tc.numSplits > 0 asks for that many instead
// (still clipped to the tiles and MAX_SPLITS).
SplitPlan SplitsFor(const ProblemShape& shape, const TileChoice& tiles, const SocSpec& soc);

// Bytes each on-chip memory needs for a tile choice: the exact InitBuffer sizes of the kernel
// (selective_attention_kernel.h, Init), each rounded up to 32 bytes as TPipe does.
struct MemoryUse {
    uint64_t ub = 0, l1 = 0, l0a = 0, l0b = 0, l0c = 0;
};
// UB of one vector core in the combine launch (selective_attention_kernel.h, SelectiveAttentionCombine::Init)
uint64_t CombineUbBytes(const ProblemShape& shape, uint32_t numSplits);
// UB is per vector core: each of the `vecSubBlocks` vector cores of a block holds its share of the heads.
MemoryUse MemoryFor(const ProblemShape& shape, const TileChoice& tiles, uint32_t vecSubBlocks);

// Why this tile choice cannot run on this SoC ("" when it can): capacity, dtype, API field limits.
std::string FitProblems(const ProblemShape& shape, const TileChoice& tiles, const SocSpec& soc);
// Reasons the SoC cannot run this dtype at all ("" when it can).
std::string DtypeProblems(const ProblemShape& shape, const SocSpec& soc);

// Best tile choice for the shape on the SoC; throws std::runtime_error when nothing fits.
TileChoice ChooseTiles(const ProblemShape& shape, const SocSpec& soc);

// The struct the kernel reads, for a checked or unchecked choice.
SelectiveAttentionTiling MakeTiling(const ProblemShape& shape, const TileChoice& tiles, const SocSpec& soc);

}  // namespace selattn

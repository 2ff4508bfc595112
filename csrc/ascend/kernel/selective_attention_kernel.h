// Selective (sparse / latent) attention for Ascend A2/A3, written against the AscendC basic API.
// Device code only: no host code, no torch. The same source compiles for the chip (bisheng, never
// run yet: no NPU was available to us) and for the CPU twin (csrc/ascend/twin, -I only), and it
// type-checks against Huawei's open AscendC headers (`make ascendc-check`).
//
// Organisation (the way production sparse-MLA kernels on A2/A3 split work; written from scratch):
// one work item = (query token t, kv head g, split s: a contiguous range of the candidate tiles). All
// query heads of a kv head share one candidate list, so they are packed into the cube's M dimension, a
// tile of mTile heads at a time; the item runs its head tiles one after another over the same tiles
// (with gatherOnce, re-using the rows the first head tile gathered). Splitting the candidates (flash-
// decoding) is what puts decode (T = 1..4, one kv head) on every core; with numSplits > 1 each item
// writes a partial result and a second, vector-only launch (SelectiveAttentionCombine) merges the
// splits in order. For each tile of nTile candidate slots:
//   AIV  gather:  scan the indices (scalar), keep the candidates the contract keeps (index >= 0,
//                 position < L_b, causal bottom-right, duplicates kept), compact them to the front of
//                 the tile, DataCopyPad the kept kv rows (and rope rows) into UB, zero the rest, write
//                 K [nTile, dkPad] and V^T [dvPad, nTile] to this block's global workspace. Dropped
//                 candidates are never read: only kept rows are addressed at all.
//   AIC  scores:  Nd2Nz Q and K into L1, LoadData to L0A/L0B chunk by chunk over the head dim, Mmad
//                 into L0C (fp32), Fixpipe S [mTile, nTile] to the workspace.
//   AIV  softmax: online softmax over the first nvalid columns of each row, in fp32: running max m,
//                 running sum l, rescale of the accumulator by exp(m_old - m_new); P in the input dtype
//                 (16-bit dtypes: two parts P_hi + P_lo, see SoftmaxTile) written to the workspace, zero
//                 beyond nvalid.
//   AIC  values:  Nd2Nz P and V^T into L1, Mmad per dvChunk of output columns (one per part of P, summed
//                 in L0C), Fixpipe O to workspace.
//   AIV  accumulate O into the fp32 accumulator in UB.
// Then AIV divides by l (+ exp(sink - m)), writes out (cast once) and lse; rows with no kept
// candidate get out = 0 and lse = -inf.
//
// Layout choice: the cube contracts over the innermost ("C0") axis of both L0A (Zz) and L0B (Zn).
// K rows [n, d] loaded as Nz into L1 are already in the Zn order of K^T, and V^T (built by the vector
// core with Gather) loaded as Nz is already the Zn order of V: every LoadData here is a plain
// (non-transposing) fractal copy, which is the same for fp16, bf16 and fp32.
//
// The vector cores of a block (two on A2/A3) split the work: each gathers every other 16-row chunk of
// the tile and owns mTile / vecSubBlocks of the packed heads for softmax, accumulation and output.
// The K / V^T hand-over has kvSlots slots: the vector cores gather tile i+1 while the cube computes the
// scores of tile i, and the cube computes the scores of tile i + 1 (a second S buffer) while the vector
// cores run the softmax of tile i. Not done (see csrc/ascend/README.md): P.V of tile i waits for P(i),
// and the vector cores wait for O(i) before the softmax of tile i + 1.
#pragma once

#include "kernel_operator.h"
#include "selective_attention_tiling.h"

namespace selattn {

using namespace AscendC;

// cross-core handshake flags (AIV -> AIC: KV, P; AIC -> AIV: S, O)
constexpr uint16_t FLAG_KV = 1;
constexpr uint16_t FLAG_S = 2;
constexpr uint16_t FLAG_P = 3;
constexpr uint16_t FLAG_O = 4;
constexpr uint16_t FLAG_UNWAITED = 5;  // only PLANT_CROSS_FLAG_OVERFLOW sets it
constexpr uint8_t SYNC_MODE = 2;       // AIC <-> both AIVs of its group
constexpr uint32_t GATHER_ROWS = 16;   // kv rows gathered per vector step: one fractal of positions
constexpr uint32_t STAT_SLOTS = 10;    // per-row fp32 statistics vectors in UB
constexpr uint32_t COMBINE_VEC_SLOTS = 8;  // per-head fp32 vectors of the combine launch (host/tiling.cpp charges them)
constexpr float NEG_BIG = -3.0e38f;    // "no maximum yet": finite, so m_old - m_new never forms inf - inf
constexpr uint32_t NEG_INF_BITS = 0xFF800000u;
constexpr float P_HI_SHRINK = 0.99999988079071044921875f;  // 1 - 2^-23: the float just below 1

// Planted-bug switch, for tests/test_ascendc_planted.py only: a build with SELATTN_PLANTED_BUG = one of
// these values gets exactly that deliberate bug, so that the test can prove the CPU twin catches it.
// Every real build (chip, twin extension, conformance check) leaves it at PLANT_NONE, where each
// `if constexpr (Planted(...))` below compiles to nothing.
#ifndef SELATTN_PLANTED_BUG
#define SELATTN_PLANTED_BUG 0
#endif
enum PlantedBug : int {
    PLANT_NONE = 0,
    PLANT_EVENT_ID0,             // Sync<> on a fixed EVENT_ID0, colliding with the TQue's own event ids
    PLANT_NO_PIPE_M_BARRIER,     // accumulating small Mmads without PipeBarrier<PIPE_M>
    PLANT_NO_MTE2_V_WAIT,        // vector Add reads an O row before its DataCopyPad landed
    PLANT_NO_V_MTE3_WAIT,        // P copied out before the vector unit finished writing it
    PLANT_DOUBLE_SET,            // SetFlag twice on one id without a wait
    PLANT_WAIT_WITHOUT_SET,      // WaitFlag with no SetFlag
    PLANT_CROSS_FLAG_OVERFLOW,   // a cross-core flag set once per tile and never waited for
    PLANT_MISALIGNED_COPY,       // DataCopyPad into UB at an address that is not 32-byte aligned
    PLANT_BLOCK_COUNT_4096,      // DataCopyPad with blockCount 4096
    PLANT_MMAD_K_UNALIGNED,      // Mmad with k not a multiple of C0
    PLANT_UB_OVERFLOW,           // on-chip buffers beyond the SoC's UB
    PLANT_UNPADDED_TAIL,         // rows copied without padding, their unspecified tail read as data
    PLANT_NO_V_MTE2_WAIT,        // gather overwrites the zero-filled buffer before the vector fill is done
    PLANT_CROSS_FLAG_WRONG_PIPE, // the K/V hand-over flag set on PIPE_S instead of the MTE3 pipe that wrote
    PLANT_COUNT
};
__aicore__ inline constexpr bool Planted(PlantedBug b) { return SELATTN_PLANTED_BUG == b; }

template <typename T>
struct BitsOf {
    using type = uint16_t;
};
template <>
struct BitsOf<float> {
    using type = uint32_t;
};

template <typename T>
class SelectiveAttentionKernel {
public:
    static constexpr uint32_t C0 = 32 / sizeof(T);   // elements in one 32-byte fractal row
    static constexpr uint32_t FR = 16 * C0;          // elements in one 512-byte fractal
    // P in parts for the cube: [P_hi; P_lo] stacked in M (selective_attention_tiling.h, ProbabilityParts)
    static constexpr uint32_t P_PARTS = ProbabilityParts(sizeof(T));
    using Bits = typename BitsOf<T>::type;

    __aicore__ inline void Init(GM_ADDR q, GM_ADDR qRope, GM_ADDR kv, GM_ADDR kvRope, GM_ADDR v, GM_ADDR kvScale,
                                GM_ADDR vScale, GM_ADDR indices,
                                GM_ADDR cuSeqlensQ, GM_ADDR cuSeqlensK, GM_ADDR blockTable, GM_ADDR seqlensK,
                                GM_ADDR attnSink, GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                const SelectiveAttentionTiling& tiling)
    {
        t_ = tiling;
        const uint64_t T_ = t_.numTokens, H = t_.numHeads, Hkv = t_.numKvHeads, rows = t_.kvRows;
        qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(q), T_ * H * t_.headDim);
        if (t_.kvInt8) {
            kvI8Gm_.SetGlobalBuffer(reinterpret_cast<__gm__ int8_t*>(kv), rows * Hkv * t_.headDim);
            kvScaleGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(kvScale), rows * Hkv * t_.kvScaleTiles);
        } else {
            kvGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(kv), rows * Hkv * t_.headDim);
        }
        if (t_.ropeDim > 0) {
            qRopeGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(qRope), T_ * H * t_.ropeDim);
            kvRopeGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(kvRope), rows * Hkv * t_.ropeDim);
        }
        if (t_.separateV && t_.vInt8) {
            vI8Gm_.SetGlobalBuffer(reinterpret_cast<__gm__ int8_t*>(v), rows * Hkv * t_.valueDim);
            vScaleGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(vScale), rows * Hkv * t_.vScaleTiles);
        } else if (t_.separateV) {
            vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(v), rows * Hkv * t_.valueDim);
        }
        idxGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(indices), T_ * t_.indexHeads * t_.topk);
        cuQGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cuSeqlensQ), t_.numSeqs + 1);
        if (t_.paged) {
            tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(blockTable),
                                     uint64_t(t_.numSeqs) * t_.maxPages);
            seqKGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(seqlensK), t_.numSeqs);
        } else {
            cuKGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cuSeqlensK), t_.numSeqs + 1);
        }
        if (t_.hasSink) {
            sinkGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(attnSink), H);
        }
        outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), T_ * H * t_.valueDim);
        lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), T_ * H);

        // this block's slice of the global workspace: the cube <-> vector hand-over buffers
        __gm__ uint8_t* ws = workspace + t_.workspacePerBlock * static_cast<uint64_t>(BlockOfCore());
        sub_ = 0;
        if ASCEND_IS_AIV {
            sub_ = static_cast<uint32_t>(GetSubBlockIdx());
        }
        rowsPer_ = t_.mTile / t_.vecSubBlocks;
        rowBegin_ = sub_ * rowsPer_;
        const uint32_t mT = t_.mTile, nT = t_.nTile;
        qWs_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(ws + t_.wsQ), mT * t_.dkPad);
        kWs_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(ws + t_.wsK), uint64_t(t_.kvSlots) * nT * t_.dkPad);
        vtWs_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(ws + t_.wsVt), uint64_t(t_.kvSlots) * t_.dvPad * nT);
        sWs_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(ws + t_.wsS), 2 * mT * nT);  // two tiles
        pWs_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(ws + t_.wsP), P_PARTS * mT * nT);
        oWs_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(ws + t_.wsO), mT * t_.dvPad);
        if (t_.numSplits > 1) {
            // the partial results of every split, shared by all blocks (each writes only its own rows)
            const uint64_t rowsSplit = uint64_t(T_) * t_.numSplits * H;
            partOGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(workspace + t_.partialO), rowsSplit * t_.dvPad);
            partStatGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(workspace + t_.partialStat), rowsSplit * 3);
        }

        // On-chip buffers. host/tiling.cpp charges exactly these sizes against the SoC's capacities
        // (keep the two in step; the twin re-checks every InitBuffer at run time).
        if ASCEND_IS_AIC {
            pipe_.InitBuffer(qA1_, 1, mT * t_.dkPad * sizeof(T));
            pipe_.InitBuffer(kB1_, t_.kvBufNum, nT * t_.dkPad * sizeof(T));
            pipe_.InitBuffer(pA1_, 1, P_PARTS * mT * nT * sizeof(T));
            pipe_.InitBuffer(vB1_, t_.kvBufNum, t_.dvPad * nT * sizeof(T));
            pipe_.InitBuffer(a2_, t_.l0BufNum, Max32(mT * t_.dkChunk, P_PARTS * mT * nT) * sizeof(T));
            pipe_.InitBuffer(b2_, t_.l0BufNum, Max32(nT * t_.dkChunk, nT * t_.dvChunk) * sizeof(T));
            pipe_.InitBuffer(c1_, 1, Max32(mT * nT, mT * t_.dvChunk) * sizeof(float));
        }
        if ASCEND_IS_AIV {
            pipe_.InitBuffer(gatherQue_, t_.vecBufNum, GATHER_ROWS * t_.dkPad * sizeof(T));
            if (t_.separateV) {
                pipe_.InitBuffer(vRowsBuf_, GATHER_ROWS * t_.dvPad * sizeof(T));
            }
            pipe_.InitBuffer(vtBuf_, t_.dvPad * GATHER_ROWS * sizeof(T));
            pipe_.InitBuffer(offBuf_, t_.dvPad * GATHER_ROWS * sizeof(uint32_t));
            pipe_.InitBuffer(rowBuf_, nT * sizeof(int32_t));
            // S, P, the accumulator and the row statistics hold only this vector core's heads
            pipe_.InitBuffer(sBuf_, rowsPer_ * nT * sizeof(float));
            pipe_.InitBuffer(pBuf_, rowsPer_ * nT * sizeof(T));
            pipe_.InitBuffer(accBuf_, rowsPer_ * t_.dvPad * sizeof(float));
            pipe_.InitBuffer(statBuf_, STAT_SLOTS * rowsPer_ * sizeof(float));
            pipe_.InitBuffer(oRowBuf_, t_.dvPad * sizeof(float));
            pipe_.InitBuffer(outRowBuf_, t_.dvPad * sizeof(T));
            pipe_.InitBuffer(workBuf_, nT * sizeof(float) + (Planted(PLANT_UB_OVERFLOW) ? 256 * 1024 : 0));
            if (t_.quantPad > 0) {
                // one quantized row at a time: its int8 bytes, fp32 values, fp32 scratch (the int8 -> half
                // step, then the per-column scales), its tile scales and the column -> scale offsets
                const uint32_t w = t_.quantPad;
                pipe_.InitBuffer(q8Buf_, w);
                pipe_.InitBuffer(deqBuf_, w * sizeof(float));
                pipe_.InitBuffer(deqAuxBuf_, w * sizeof(float));
                pipe_.InitBuffer(scaleRowBuf_, Max32(t_.kvScaleTiles, t_.vScaleTiles) * sizeof(float));
                pipe_.InitBuffer(scaleOffBuf_, w * sizeof(uint32_t));
            }
        }
    }

    __aicore__ inline void Process()
    {
        if ASCEND_IS_AIV {
            BuildTransposeOffsets();
        }
        const uint32_t blockNum = static_cast<uint32_t>(GetBlockNum());
        for (uint64_t item = BlockOfCore(); item < t_.numItems; item += blockNum) {
            Decode(item);
            // the head tiles of the kv head run one after another on this block, over the same candidates:
            // with gatherOnce the first head tile gathers the split's rows into the hand-over slots and the
            // later ones re-use them, so each kept row is read from GM once per split, not once per head tile
            for (uint32_t headTile = 0; headTile < t_.headTiles; ++headTile) {
                SetHeadTile(headTile);
                const bool gather = headTile == 0 || !t_.gatherOnce;
                if ASCEND_IS_AIV {
                    BeginItemVec();
                    if (gather) {
                        keptTotal_ = 0;
                    }
                }
                // K / V^T hand-over: the vector cores gather tile i + 1 while the cube core computes the
                // scores of tile i. Slot i % kvSlots is written again (ping-pong of two slots) only for
                // tile i + 2, after FLAG_O of tile i, when the cube core has finished reading it. FLAG_KV
                // also hands over Q: a head tile that gathers nothing still sets it once.
                if ASCEND_IS_AIV {
                    if (tileEnd_ > tileBegin_) {
                        if (gather) {
                            GatherTile(tileBegin_);
                        }
                        CrossCoreSetFlag<SYNC_MODE, Planted(PLANT_CROSS_FLAG_WRONG_PIPE) ? PIPE_S : PIPE_MTE3>(FLAG_KV);
                    }
                }
                for (uint64_t tile = tileBegin_; tile < tileEnd_; ++tile) {
                    if ASCEND_IS_AIV {
                        if (gather && tile + 1 < tileEnd_) {
                            GatherTile(tile + 1);
                            CrossCoreSetFlag<SYNC_MODE, Planted(PLANT_CROSS_FLAG_WRONG_PIPE) ? PIPE_S : PIPE_MTE3>(FLAG_KV);
                            if constexpr (Planted(PLANT_CROSS_FLAG_OVERFLOW)) {
                                // a flag nobody waits for: an extra set of FLAG_KV would instead let the
                                // cube's preload read a tile before it is gathered (caught as a race first)
                                CrossCoreSetFlag<SYNC_MODE, PIPE_MTE3>(FLAG_UNWAITED);
                            }
                        }
                    }
                    if ASCEND_IS_AIC {
                        // preload (as Huawei's kernel does): the cube computes the scores of tile i + 1 into
                        // the other S buffer while the vector cores run the softmax of tile i, so FLAG_S has
                        // up to two sets pending. S buffer i % 2 is written again for tile i + 2 only after
                        // FLAG_P of tile i, when the vector cores have read it.
                        if (tile == tileBegin_) {
                            CrossCoreWaitFlag(FLAG_KV);
                            ScoreTile(tile);
                            CrossCoreSetFlag<SYNC_MODE, PIPE_FIX>(FLAG_S);
                        }
                        if (tile + 1 < tileEnd_) {
                            if (gather) {
                                CrossCoreWaitFlag(FLAG_KV);
                            }
                            ScoreTile(tile + 1);
                            CrossCoreSetFlag<SYNC_MODE, PIPE_FIX>(FLAG_S);
                        }
                    }
                    if ASCEND_IS_AIV {
                        CrossCoreWaitFlag(FLAG_S);
                        SoftmaxTile(tile);
                        CrossCoreSetFlag<SYNC_MODE, PIPE_MTE3>(FLAG_P);
                    }
                    if ASCEND_IS_AIC {
                        CrossCoreWaitFlag(FLAG_P);
                        ValueTile(tile);
                        CrossCoreSetFlag<SYNC_MODE, PIPE_FIX>(FLAG_O);
                    }
                    if ASCEND_IS_AIV {
                        CrossCoreWaitFlag(FLAG_O);
                        AccumulateTile();
                    }
                }
                if ASCEND_IS_AIC {
                    if (tileEnd_ > tileBegin_) {
                        qA1_.FreeTensor(qL1_);
                    }
                }
                if ASCEND_IS_AIV {
                    if (t_.numSplits > 1) {
                        WritePartial();
                    } else {
                        FinishItem();
                    }
                }
            }
        }
    }

private:
    __aicore__ inline static uint32_t Max32(uint32_t a, uint32_t b) { return a > b ? a : b; }
    __aicore__ inline static uint32_t Min32(uint32_t a, uint32_t b) { return a < b ? a : b; }
    // the block this core belongs to: on a vector core GetBlockIdx() counts vector cores
    __aicore__ inline uint32_t BlockOfCore() const
    {
        if ASCEND_IS_AIV {
            return static_cast<uint32_t>(GetBlockIdx() / GetTaskRatio());
        }
        return static_cast<uint32_t>(GetBlockIdx());
    }
    // S hand-over buffer of a tile of the current split (two: the cube scores tile i + 1 during softmax i)
    __aicore__ inline uint64_t SOffset(uint64_t tile) const
    {
        return ((tile - tileBegin_) & 1) * static_cast<uint64_t>(t_.mTile) * t_.nTile;
    }
    // hand-over slot of a tile of the current split
    __aicore__ inline uint32_t Slot(uint64_t tile) const { return static_cast<uint32_t>((tile - tileBegin_) % t_.kvSlots); }
    // 16-row chunks are dealt round-robin to the vector cores of the block
    __aicore__ inline bool MyChunk(uint32_t row0) const { return (row0 / GATHER_ROWS) % t_.vecSubBlocks == sub_; }

    // set-then-wait on one event: the consumer pipe waits for everything the producer pipe issued. The id
    // is fetched from TPipe's pool, never a fixed EVENT_ID0: the TQues hold ids of their own (FreeTensor
    // leaves its V_MTE2 id set until the next AllocTensor), and setting a set flag can hang the chip
    // (SetFlag-WaitFlag(ISASI).md).
    template <HardEvent evt>
    __aicore__ inline void Sync()
    {
        const int32_t id = Planted(PLANT_EVENT_ID0) ? EVENT_ID0 : static_cast<int32_t>(pipe_.template FetchEventID<evt>());
        if constexpr (!Planted(PLANT_WAIT_WITHOUT_SET)) {
            SetFlag<evt>(id);
        }
        if constexpr (Planted(PLANT_DOUBLE_SET)) {
            SetFlag<evt>(id);
        }
        WaitFlag<evt>(id);
    }

    // ---------------------------------------------------------------- work item
    __aicore__ inline void Decode(uint64_t item)
    {
        split_ = static_cast<uint32_t>(item % t_.numSplits);
        const uint64_t tg = item / t_.numSplits;
        kvHead_ = static_cast<uint32_t>(tg % t_.numKvHeads);
        token_ = static_cast<uint32_t>(tg / t_.numKvHeads);
        // split s owns tiles [s * base + min(s, rem), ...): sizes differ by at most one tile, and no product
        // of two 64-bit counts is formed
        const uint64_t base = t_.numTiles / t_.numSplits, rem = t_.numTiles % t_.numSplits;
        tileBegin_ = split_ * base + (split_ < rem ? split_ : rem);
        tileEnd_ = tileBegin_ + base + (split_ < rem ? 1 : 0);
        idxRow_ = (static_cast<uint64_t>(token_) * t_.indexHeads + (t_.indexHeads == 1 ? 0 : kvHead_)) * t_.topk;
        // sequence of the token: the largest b with cu_seqlens_q[b] <= t (empty sequences are skipped over)
        uint32_t lo = 0, hi = t_.numSeqs;
        while (hi - lo > 1) {
            uint32_t mid = (lo + hi) / 2;
            if (static_cast<uint32_t>(cuQGm_.GetValue(mid)) <= token_) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        seq_ = lo;
        const int64_t qStart = cuQGm_.GetValue(seq_);
        const int64_t qLen = cuQGm_.GetValue(seq_ + 1) - qStart;
        if (t_.paged) {
            seqLen_ = seqKGm_.GetValue(seq_);
            kvStart_ = 0;
        } else {
            kvStart_ = cuKGm_.GetValue(seq_);
            seqLen_ = cuKGm_.GetValue(seq_ + 1) - kvStart_;
        }
        qPos_ = seqLen_ - qLen + (static_cast<int64_t>(token_) - qStart);  // bottom-right aligned
    }

    __aicore__ inline void SetHeadTile(uint32_t headTile)
    {
        headTile_ = headTile;
        head0_ = kvHead_ * t_.headsPerKv + headTile_ * t_.mTile;
        mCount_ = Min32(t_.mTile, t_.headsPerKv - headTile_ * t_.mTile);
        ownCount_ = mCount_ > rowBegin_ ? Min32(rowsPer_, mCount_ - rowBegin_) : 0;
    }

    // cache row of logical position pos of the current sequence (pos already checked < seqLen_)
    __aicore__ inline int64_t RowOf(int64_t pos) const
    {
        if (t_.paged) {
            const int64_t page = tableGm_.GetValue(static_cast<uint64_t>(seq_) * t_.maxPages + pos / t_.pageSize);
            return page * t_.pageSize + pos % t_.pageSize;
        }
        return kvStart_ + pos;
    }

    // one row of `width` elements from GM into UB, zero-padded to the next 32-byte boundary
    __aicore__ inline void CopyRowIn(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t width)
    {
        const uint32_t bytes = width * sizeof(T);
        const uint32_t padded = (bytes + 31) / 32 * 32;
        DataCopyExtParams cp(1, bytes, 0, 0, 0);
        DataCopyPadExtParams<T> pad(!Planted(PLANT_UNPADDED_TAIL), 0, static_cast<uint8_t>((padded - bytes) / sizeof(T)),
                                    static_cast<T>(0.0f));
        DataCopyPad(dst, src, cp, pad);
    }

    // ---------------------------------------------------------------- vector side
    __aicore__ inline void BuildTransposeOffsets()
    {
        // V^T chunk [dvPad, 16] from 16 gathered rows: element (d, s) comes from row s, column d of the
        // source rows (kv rows in latent mode, v rows otherwise). Gather takes byte offsets.
        LocalTensor<uint32_t> off = offBuf_.Get<uint32_t>();
        const uint32_t stride = t_.separateV ? t_.dvPad : t_.dkPad;
        for (uint32_t d = 0; d < t_.dvPad; ++d) {
            for (uint32_t s = 0; s < GATHER_ROWS; ++s) {
                off.SetValue(d * GATHER_ROWS + s, static_cast<uint32_t>((s * stride + d) * sizeof(T)));
            }
        }
        if (t_.quantPad > 0) {
            // column c of a quantized row takes the scale of its tile: byte offset (c / scaleBlock) * 4
            LocalTensor<uint32_t> soff = scaleOffBuf_.Get<uint32_t>();
            for (uint32_t c = 0; c < t_.quantPad; ++c) {
                soff.SetValue(c, (c / t_.scaleBlock) * static_cast<uint32_t>(sizeof(float)));
            }
        }
        Sync<HardEvent::S_V>();
    }

    // One int8 row of `width` columns from GM, dequantized into `dst` (compute dtype T): value of column c
    // = float(stored[c]) * scales[c / scaleBlock], formed in fp32 and rounded once to T (the contract's
    // float64 value up to that rounding). int8 -> half -> float are exact (A2/A3 Cast has no int8 -> float);
    // the per-column scales come from one Gather of the row's tile scales, so any scaleBlock works without
    // 32-byte-aligned tile starts. Columns past `width` of dst are left as they are (zero in the gather).
    __aicore__ inline void DequantRowIn(const LocalTensor<T>& dst, const GlobalTensor<int8_t>& src,
                                        const GlobalTensor<float>& scales, uint32_t width, uint32_t tiles)
    {
        LocalTensor<int8_t> raw = q8Buf_.Get<int8_t>();
        LocalTensor<float> f = deqBuf_.Get<float>();
        LocalTensor<float> aux = deqAuxBuf_.Get<float>();
        LocalTensor<float> sc = scaleRowBuf_.Get<float>();
        LocalTensor<uint32_t> soff = scaleOffBuf_.Get<uint32_t>();
        Sync<HardEvent::V_MTE2>();  // the previous row's vector reads of raw / sc are done
        DataCopyPad(raw, src, DataCopyExtParams(1, width, 0, 0, 0), DataCopyPadExtParams<int8_t>(false, 0, 0, 0));
        DataCopyPad(sc, scales, DataCopyExtParams(1, tiles * sizeof(float), 0, 0, 0),
                    DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
        Sync<HardEvent::MTE2_V>();
        LocalTensor<half> h = aux.template ReinterpretCast<half>();
        Cast(h, raw, RoundMode::CAST_NONE, width);
        Cast(f, h, RoundMode::CAST_NONE, width);
        Gather(aux.template ReinterpretCast<uint32_t>(), sc.template ReinterpretCast<uint32_t>(), soff, 0, width);
        if constexpr (IsSameType<T, float>::value) {
            Mul(dst, f, aux, static_cast<int32_t>(width));
        } else {
            Mul(f, f, aux, static_cast<int32_t>(width));
            Cast(dst, f, RoundMode::CAST_RINT, width);
        }
    }

    __aicore__ inline void BeginItemVec()
    {
        LocalTensor<float> acc = accBuf_.Get<float>();
        LocalTensor<float> st = statBuf_.Get<float>();
        const uint32_t mT = t_.mTile, rp = rowsPer_;
        Duplicate(acc, 0.0f, static_cast<int32_t>(rp * t_.dvPad));
        Duplicate(st[0 * rp], NEG_BIG, static_cast<int32_t>(rp));  // m (running max of scaled scores)
        Duplicate(st[2 * rp], 0.0f, static_cast<int32_t>(rp));     // l (running sum)
        if (tileEnd_ == tileBegin_) {
            return;  // K = 0: every row is empty, Q is never needed
        }
        // Q of the packed heads, [mTile, dkPad]: q at columns [0, Dqk), q_rope at [dqkPad, dqkPad + Dr),
        // zeros elsewhere, so the contraction over dkPad equals q . k + q_rope . k_rope.
        for (uint32_t r0 = 0; r0 < mT; r0 += GATHER_ROWS) {
            if (!MyChunk(r0)) {
                continue;
            }
            LocalTensor<T> kb = gatherQue_.AllocTensor<T>();
            Duplicate(kb, static_cast<T>(0.0f), static_cast<int32_t>(GATHER_ROWS * t_.dkPad));
            Sync<HardEvent::V_MTE2>();
            for (uint32_t r = 0; r < GATHER_ROWS; ++r) {
                if (r0 + r >= mCount_) {
                    break;
                }
                const uint64_t qRow = static_cast<uint64_t>(token_) * t_.numHeads + head0_ + r0 + r;
                CopyRowIn(kb[r * t_.dkPad], qGm_[qRow * t_.headDim], t_.headDim);
                if (t_.ropeDim > 0) {
                    CopyRowIn(kb[r * t_.dkPad + t_.dqkPad], qRopeGm_[qRow * t_.ropeDim], t_.ropeDim);
                }
            }
            gatherQue_.EnQue(kb);
            kb = gatherQue_.DeQue<T>();
            Sync<HardEvent::MTE2_MTE3>();
            DataCopyPad(qWs_[r0 * t_.dkPad], kb, DataCopyExtParams(1, GATHER_ROWS * t_.dkPad * sizeof(T), 0, 0, 0));
            Sync<HardEvent::MTE3_V>();
            gatherQue_.FreeTensor(kb);
        }
    }

    __aicore__ inline void GatherTile(uint64_t tile)
    {
        // 1. scan this tile's candidate slots; keep what the contract keeps, compacted to the front.
        //    Slot c is offset r = c % blockSpan of index c / blockSpan: offsets >= blockSpan of a block
        //    lie past every sequence (the host clips them), so they are not scanned at all.
        LocalTensor<int32_t> rows = rowBuf_.Get<int32_t>();
        const uint64_t total = static_cast<uint64_t>(t_.topk) * t_.blockSpan;
        const uint64_t c0 = tile * t_.nTile;
        const uint64_t c1 = c0 + t_.nTile < total ? c0 + t_.nTile : total;
        uint32_t kept = 0;
        for (uint64_t c = c0; c < c1; ++c) {
            const int64_t index = idxGm_.GetValue(idxRow_ + c / t_.blockSpan);
            if (index < 0) {
                continue;
            }
            const int64_t pos = index * static_cast<int64_t>(t_.blockSize) + static_cast<int64_t>(c % t_.blockSpan);
            if (pos >= seqLen_ || (t_.causal && pos > qPos_)) {
                continue;
            }
            rows.SetValue(kept, static_cast<int32_t>(RowOf(pos)));
            ++kept;
        }
        nValid_[Slot(tile)] = kept;
        keptTotal_ += kept;
        const uint32_t nValid = kept;
        const uint64_t kBase = Slot(tile) * static_cast<uint64_t>(t_.nTile) * t_.dkPad;
        const uint64_t vBase = Slot(tile) * static_cast<uint64_t>(t_.dvPad) * t_.nTile;

        // 2. gather kept rows 16 at a time into K [nTile, dkPad] and V^T [dvPad, nTile]; slots past
        //    nValid are written as zeros so no stale or uninitialised workspace reaches the cube
        const uint64_t Hkv = t_.numKvHeads;
        LocalTensor<T> vt = vtBuf_.Get<T>();
        LocalTensor<uint32_t> off = offBuf_.Get<uint32_t>();
        for (uint32_t s0 = 0; s0 < t_.nTile; s0 += GATHER_ROWS) {
            if (!MyChunk(s0)) {
                continue;
            }
            LocalTensor<T> kb = gatherQue_.AllocTensor<T>();
            LocalTensor<T> vrows;
            Duplicate(kb, static_cast<T>(0.0f), static_cast<int32_t>(GATHER_ROWS * t_.dkPad));
            if (t_.separateV) {
                vrows = vRowsBuf_.Get<T>();
                Duplicate(vrows, static_cast<T>(0.0f), static_cast<int32_t>(GATHER_ROWS * t_.dvPad));
            }
            if constexpr (!Planted(PLANT_NO_V_MTE2_WAIT)) {
                Sync<HardEvent::V_MTE2>();
            }
            for (uint32_t s = 0; s < GATHER_ROWS && s0 + s < nValid; ++s) {
                const uint64_t row = static_cast<uint64_t>(rows.GetValue(s0 + s)) * Hkv + kvHead_;
                if (t_.kvInt8) {
                    DequantRowIn(kb[s * t_.dkPad], kvI8Gm_[row * t_.headDim], kvScaleGm_[row * t_.kvScaleTiles],
                                 t_.headDim, t_.kvScaleTiles);
                } else {
                    CopyRowIn(kb[s * t_.dkPad + (Planted(PLANT_MISALIGNED_COPY) ? 1 : 0)], kvGm_[row * t_.headDim],
                              t_.headDim);
                }
                if (t_.ropeDim > 0) {
                    CopyRowIn(kb[s * t_.dkPad + t_.dqkPad], kvRopeGm_[row * t_.ropeDim], t_.ropeDim);
                }
                if (t_.separateV && t_.vInt8) {
                    DequantRowIn(vrows[s * t_.dvPad], vI8Gm_[row * t_.valueDim], vScaleGm_[row * t_.vScaleTiles],
                                 t_.valueDim, t_.vScaleTiles);
                } else if (t_.separateV) {
                    CopyRowIn(vrows[s * t_.dvPad], vGm_[row * t_.valueDim], t_.valueDim);
                }
            }
            gatherQue_.EnQue(kb);
            kb = gatherQue_.DeQue<T>();
            if (t_.separateV) {
                Sync<HardEvent::MTE2_V>();
            }
            // V^T block: latent values are the first Dv columns of the kv rows just gathered
            const LocalTensor<T>& vsrc = t_.separateV ? vrows : kb;
            Gather(vt.template ReinterpretCast<Bits>(), vsrc.template ReinterpretCast<Bits>(), off, 0,
                   t_.dvPad * GATHER_ROWS);
            Sync<HardEvent::MTE2_MTE3>();
            if (t_.kvInt8) {
                Sync<HardEvent::V_MTE3>();  // the dequantized K rows were written by the vector unit
            }
            DataCopyPad(kWs_[kBase + s0 * t_.dkPad], kb, DataCopyExtParams(1, GATHER_ROWS * t_.dkPad * sizeof(T), 0, 0, 0));
            Sync<HardEvent::V_MTE3>();
            DataCopyPad(vtWs_[vBase + s0], vt,
                        DataCopyExtParams(static_cast<uint16_t>(Planted(PLANT_BLOCK_COUNT_4096) ? 4096 : t_.dvPad),
                                          GATHER_ROWS * sizeof(T), 0,
                                          (t_.nTile - GATHER_ROWS) * sizeof(T), 0));
            Sync<HardEvent::MTE3_V>();
            gatherQue_.FreeTensor(kb);
        }
    }

    __aicore__ inline void SoftmaxTile(uint64_t tile)
    {
        const uint32_t rp = rowsPer_, nT = t_.nTile;
        LocalTensor<float> s = sBuf_.Get<float>();
        LocalTensor<T> p = pBuf_.Get<T>();
        LocalTensor<float> acc = accBuf_.Get<float>();
        LocalTensor<float> st = statBuf_.Get<float>();
        LocalTensor<float> work = workBuf_.Get<float>();
        LocalTensor<float> mOld = st[0 * rp], mNew = st[1 * rp], l = st[2 * rp], alpha = st[3 * rp];
        LocalTensor<float> rowMax = st[4 * rp], rowSum = st[5 * rp], tmp = st[9 * rp];
        // P_lo of row m lives in the first nT elements of S row m (2 * nT elements of T per fp32 row)
        LocalTensor<T> pLo = s.template ReinterpretCast<T>();

        // this core's rows of S; P rows it does not compute (padded heads) are written as zeros
        DataCopyPad(s, sWs_[SOffset(tile) + rowBegin_ * nT], DataCopyExtParams(1, rp * nT * sizeof(float), 0, 0, 0),
                    DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
        Duplicate(p, static_cast<T>(0.0f), static_cast<int32_t>(rp * nT));
        Sync<HardEvent::MTE2_V>();
        const int32_t nv = static_cast<int32_t>(nValid_[Slot(tile)]);
        if (nv > 0 && ownCount_ > 0) {
            // pass 1: scaled scores and row maxima (padded head rows keep NEG_BIG)
            Duplicate(rowMax, NEG_BIG, static_cast<int32_t>(rp));
            Duplicate(rowSum, 0.0f, static_cast<int32_t>(rp));
            for (uint32_t m = 0; m < ownCount_; ++m) {
                LocalTensor<float> row = s[m * nT];
                Muls(row, row, t_.smScale, nv);
                ReduceMax(tmp, row, work, nv);
                Sync<HardEvent::V_S>();
                rowMax.SetValue(m, tmp.GetValue(0));
                Sync<HardEvent::S_V>();
            }
            Max(mNew, mOld, rowMax, static_cast<int32_t>(rp));
            Sub(alpha, mOld, mNew, static_cast<int32_t>(rp));
            Exp(alpha, alpha, static_cast<int32_t>(rp));  // exp(m_old - m_new): rescales l and acc
            Sync<HardEvent::V_S>();
            // pass 2: p = exp(s - m_new), row sums, P in the input dtype for the cube
            for (uint32_t m = 0; m < ownCount_; ++m) {
                LocalTensor<float> row = s[m * nT];
                const float mRow = mNew.GetValue(m);
                Adds(row, row, -mRow, nv);
                Exp(row, row, nv);
                ReduceSum(tmp, row, work, nv);
                if constexpr (IsSameType<T, float>::value) {
                    Muls(p[m * nT], row, 1.0f, nv);
                } else {
                    // P = P_hi + P_lo, both in T. P_hi is P * (1 - 2^-23) (just below P) rounded down, so
                    // P_lo = P - P_hi is exact in fp32 and strictly positive wherever P > 0; rounded up it stays
                    // so. Then a kept value of +-inf meets two weights of one sign and gives +-inf, as in
                    // float64, never inf - inf or 0 * inf = NaN (round-to-nearest would make P_lo 0 or
                    // negative). P_lo is written over the first half of this row's own fp32 scores (dead from
                    // here on: no UB of its own). Past nv P_hi is zero (the Duplicate above), so the widened
                    // copy and P_lo are zero there too.
                    Muls(work, row, P_HI_SHRINK, nv);
                    Cast(p[m * nT], work, RoundMode::CAST_FLOOR, static_cast<uint32_t>(nv));
                    Cast(work, p[m * nT], RoundMode::CAST_NONE, nT);
                    Sub(work, row, work, nv);
                    Cast(pLo[m * 2 * nT], work, RoundMode::CAST_CEIL, nT);
                }
                Sync<HardEvent::V_S>();
                rowSum.SetValue(m, tmp.GetValue(0));
                const float a = alpha.GetValue(m);
                Sync<HardEvent::S_V>();
                Muls(acc[m * t_.dvPad], acc[m * t_.dvPad], a, static_cast<int32_t>(t_.dvPad));
            }
            Mul(l, l, alpha, static_cast<int32_t>(rp));
            Add(l, l, rowSum, static_cast<int32_t>(rp));
            Adds(mOld, mNew, 0.0f, static_cast<int32_t>(rp));
            if (P_PARTS > 1 && ownCount_ < rp) {
                Duplicate(s[ownCount_ * nT], 0.0f, static_cast<int32_t>((rp - ownCount_) * nT));  // P_lo of padded heads
            }
        } else if (P_PARTS > 1) {
            Duplicate(s, 0.0f, static_cast<int32_t>(rp * nT));  // no kept candidate in this tile: P_lo = 0
        }
        if constexpr (!Planted(PLANT_NO_V_MTE3_WAIT)) {
            Sync<HardEvent::V_MTE3>();
        }
        DataCopyPad(pWs_[rowBegin_ * nT], p, DataCopyExtParams(1, rp * nT * sizeof(T), 0, 0, 0));
        if constexpr (P_PARTS > 1) {
            // P_lo rows go below all mTile rows of P_hi: the cube reads [P_hi; P_lo] as one [2 mTile, nTile]
            DataCopyPad(pWs_[(t_.mTile + rowBegin_) * nT], pLo,
                        DataCopyExtParams(static_cast<uint16_t>(rp), nT * sizeof(T), nT * sizeof(T) / 32, 0, 0));
        }
    }

    __aicore__ inline void AccumulateTile()
    {
        LocalTensor<float> acc = accBuf_.Get<float>();
        LocalTensor<float> o = oRowBuf_.Get<float>();
        for (uint32_t m = 0; m < ownCount_; ++m) {
            DataCopyPad(o, oWs_[(rowBegin_ + m) * t_.dvPad], DataCopyExtParams(1, t_.dvPad * sizeof(float), 0, 0, 0),
                        DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
            if constexpr (!Planted(PLANT_NO_MTE2_V_WAIT)) {
                Sync<HardEvent::MTE2_V>();
            }
            Add(acc[m * t_.dvPad], acc[m * t_.dvPad], o, static_cast<int32_t>(t_.dvPad));
            Sync<HardEvent::V_MTE2>();
        }
    }

    __aicore__ inline void FinishItem()
    {
        if (ownCount_ == 0) {
            return;
        }
        const uint32_t rp = rowsPer_;
        const uint32_t h0 = head0_ + rowBegin_;  // first head this core writes
        LocalTensor<float> acc = accBuf_.Get<float>();
        LocalTensor<float> st = statBuf_.Get<float>();
        LocalTensor<float> mOld = st[0 * rp], l = st[2 * rp], lnL = st[6 * rp], denom = st[7 * rp];
        LocalTensor<float> lseRow = st[8 * rp], sinkTerm = st[3 * rp];
        LocalTensor<T> outRow = outRowBuf_.Get<T>();

        Ln(lnL, l, static_cast<int32_t>(rp));
        if (t_.hasSink) {
            // out = acc / (l + exp(sink - m)): the sink joins the denominator only
            Sync<HardEvent::V_S>();
            for (uint32_t m = 0; m < rp; ++m) {
                sinkTerm.SetValue(m, m < ownCount_ ? sinkGm_.GetValue(h0 + m) : 0.0f);
            }
            Sync<HardEvent::S_V>();
            Sub(sinkTerm, sinkTerm, mOld, static_cast<int32_t>(rp));
            Exp(sinkTerm, sinkTerm, static_cast<int32_t>(rp));
            Add(denom, l, sinkTerm, static_cast<int32_t>(rp));
        } else {
            Adds(denom, l, 0.0f, static_cast<int32_t>(rp));
        }
        Sync<HardEvent::V_S>();
        LocalTensor<uint32_t> lseBits = lseRow.template ReinterpretCast<uint32_t>();
        for (uint32_t m = 0; m < ownCount_; ++m) {
            LocalTensor<float> a = acc[m * t_.dvPad];
            // "empty" is decided by the indices and lengths (keptTotal_), never by the scores: a kept
            // candidate holding NaN/inf makes l NaN and must propagate to out and lse (SPEC section 1)
            if (keptTotal_ > 0) {
                lseRow.SetValue(m, mOld.GetValue(m) + lnL.GetValue(m));
                const float inv = 1.0f / denom.GetValue(m);
                Sync<HardEvent::S_V>();
                Muls(a, a, inv, static_cast<int32_t>(t_.dvPad));
            } else {
                // no kept candidate: out = 0, lse = -inf (never NaN)
                lseBits.SetValue(m, NEG_INF_BITS);
                Sync<HardEvent::S_V>();
                Duplicate(a, 0.0f, static_cast<int32_t>(t_.dvPad));
            }
            const uint64_t outOff = (static_cast<uint64_t>(token_) * t_.numHeads + h0 + m) * t_.valueDim;
            if constexpr (IsSameType<T, float>::value) {
                Sync<HardEvent::V_MTE3>();
                DataCopyPad(outGm_[outOff], a, DataCopyExtParams(1, t_.valueDim * sizeof(T), 0, 0, 0));
            } else {
                Cast(outRow, a, RoundMode::CAST_RINT, t_.dvPad);
                Sync<HardEvent::V_MTE3>();
                DataCopyPad(outGm_[outOff], outRow, DataCopyExtParams(1, t_.valueDim * sizeof(T), 0, 0, 0));
            }
            Sync<HardEvent::MTE3_V>();
        }
        Sync<HardEvent::S_MTE3>();
        DataCopyPad(lseGm_[static_cast<uint64_t>(token_) * t_.numHeads + h0], lseRow,
                    DataCopyExtParams(1, ownCount_ * sizeof(float), 0, 0, 0));
        Sync<HardEvent::MTE3_V>();
    }

    // a split's part of the result (numSplits > 1): unnormalised O = sum exp(s - m) v, the running max m
    // and sum l of its heads, and whether the split kept any candidate at all (from the indices, never
    // from the scores, so that NaN propagates through the combine as it would in float64)
    __aicore__ inline void WritePartial()
    {
        if (ownCount_ == 0) {
            return;
        }
        const uint32_t rp = rowsPer_;
        const uint64_t H = t_.numHeads, h0 = head0_ + rowBegin_, ts = uint64_t(token_) * t_.numSplits + split_;
        LocalTensor<float> acc = accBuf_.Get<float>();
        LocalTensor<float> st = statBuf_.Get<float>();
        LocalTensor<float> mOld = st[0 * rp], l = st[2 * rp], kept = st[9 * rp];
        Duplicate(kept, keptTotal_ > 0 ? 1.0f : 0.0f, static_cast<int32_t>(rp));
        Sync<HardEvent::V_MTE3>();
        // this core's heads are consecutive rows of the [T, numSplits, H, dvPad] and [T, numSplits, 3, H] layouts
        DataCopyPad(partOGm_[(ts * H + h0) * t_.dvPad], acc,
                    DataCopyExtParams(1, ownCount_ * t_.dvPad * sizeof(float), 0, 0, 0));
        const DataCopyExtParams row(1, ownCount_ * sizeof(float), 0, 0, 0);
        DataCopyPad(partStatGm_[ts * 3 * H + h0], mOld, row);
        DataCopyPad(partStatGm_[ts * 3 * H + H + h0], l, row);
        DataCopyPad(partStatGm_[ts * 3 * H + 2 * H + h0], kept, row);
        Sync<HardEvent::MTE3_V>();
    }

    // ---------------------------------------------------------------- cube side
    __aicore__ inline void ScoreTile(uint64_t tile)
    {
        const uint32_t mT = t_.mTile, nT = t_.nTile, Mf = mT / 16, Nf = nT / 16;
        if (tile == tileBegin_) {
            // Q stays in L1 for all tiles of the split
            qL1_ = qA1_.AllocTensor<T>();
            DataCopy(qL1_, qWs_, NdToNz(mT, t_.dkPad));
            qA1_.EnQue(qL1_);
            qL1_ = qA1_.DeQue<T>();
        }
        LocalTensor<T> kL1 = kB1_.AllocTensor<T>();
        DataCopy(kL1, kWs_[Slot(tile) * static_cast<uint64_t>(nT) * t_.dkPad], NdToNz(nT, t_.dkPad));
        kB1_.EnQue(kL1);
        kL1 = kB1_.DeQue<T>();

        LocalTensor<float> c = c1_.AllocTensor<float>();
        for (uint32_t d0 = 0; d0 < t_.dkPad; d0 += t_.dkChunk) {
            const uint32_t w = Min32(t_.dkChunk, t_.dkPad - d0);
            const uint32_t kf = w / C0, kStart = d0 / C0;
            LocalTensor<T> a2 = a2_.AllocTensor<T>();
            LocalTensor<T> b2 = b2_.AllocTensor<T>();
            // L1 Nz -> L0A Zz: one row of fractals (fixed mi) per LoadData
            for (uint32_t mi = 0; mi < Mf; ++mi) {
                LoadData(a2[mi * kf * FR], qL1_[(kStart * Mf + mi) * FR],
                         LoadData2DParams(0, static_cast<uint8_t>(kf), static_cast<uint16_t>(Mf), 0, 0, false, 0));
            }
            // L1 Nz of K rows [n, d] is already Zn of K^T: contiguous fractal copy, one k-row at a time
            for (uint32_t kj = 0; kj < kf; ++kj) {
                LoadData(b2[kj * Nf * FR], kL1[(kStart + kj) * Nf * FR],
                         LoadData2DParams(0, static_cast<uint8_t>(Nf), 1, 0, 0, false, 0));
            }
            a2_.EnQue(a2);
            b2_.EnQue(b2);
            a2 = a2_.DeQue<T>();
            b2 = b2_.DeQue<T>();
            if (d0 > 0 && (mT / 16) * (nT / 16) < 10 && !Planted(PLANT_NO_PIPE_M_BARRIER)) {
                // Mmad.md: a small Mmad accumulating into the L0C tile of the previous one must wait for it
                PipeBarrier<PIPE_M>();
            }
            Mmad(c, a2, b2,
                 MmadParams(static_cast<uint16_t>(mT), static_cast<uint16_t>(nT),
                            static_cast<uint16_t>(w + (Planted(PLANT_MMAD_K_UNALIGNED) ? 1 : 0)), 0, false, d0 == 0));
            a2_.FreeTensor(a2);
            b2_.FreeTensor(b2);
        }
        kB1_.FreeTensor(kL1);
        c1_.EnQue(c);
        c = c1_.DeQue<float>();
        Fixpipe<float, float, CFG_ROW_MAJOR>(sWs_[SOffset(tile)], c,
                                             FixpipeParamsV220(static_cast<uint16_t>(nT), static_cast<uint16_t>(mT),
                                                               static_cast<uint16_t>(mT), nT, false));
        c1_.FreeTensor(c);
    }

    __aicore__ inline void ValueTile(uint64_t tile)
    {
        const uint32_t mT = t_.mTile, nT = t_.nTile, nKf = nT / C0, Dvf = t_.dvPad / 16;
        const uint32_t pMf = P_PARTS * mT / 16;  // fractal rows of [P_hi; P_lo]
        LocalTensor<T> pL1 = pA1_.AllocTensor<T>();
        LocalTensor<T> vL1 = vB1_.AllocTensor<T>();
        DataCopy(pL1, pWs_, NdToNz(P_PARTS * mT, nT));
        DataCopy(vL1, vtWs_[Slot(tile) * static_cast<uint64_t>(t_.dvPad) * nT], NdToNz(t_.dvPad, nT));
        pA1_.EnQue(pL1);
        vB1_.EnQue(vL1);
        pL1 = pA1_.DeQue<T>();
        vL1 = vB1_.DeQue<T>();

        LocalTensor<T> a2 = a2_.AllocTensor<T>();
        for (uint32_t mi = 0; mi < pMf; ++mi) {
            LoadData(a2[mi * nKf * FR], pL1[mi * FR],
                     LoadData2DParams(0, static_cast<uint8_t>(nKf), static_cast<uint16_t>(pMf), 0, 0, false, 0));
        }
        a2_.EnQue(a2);
        a2 = a2_.DeQue<T>();
        for (uint32_t e0 = 0; e0 < t_.dvPad; e0 += t_.dvChunk) {
            const uint32_t w = Min32(t_.dvChunk, t_.dvPad - e0);
            const uint32_t nf = w / 16, dStart = e0 / 16;
            LocalTensor<T> b2 = b2_.AllocTensor<T>();
            // L1 Nz of V^T [d, n] is already Zn of V: copy the fractals of this column chunk
            for (uint32_t kj = 0; kj < nKf; ++kj) {
                LoadData(b2[kj * nf * FR], vL1[(kj * Dvf + dStart) * FR],
                         LoadData2DParams(0, static_cast<uint8_t>(nf), 1, 0, 0, false, 0));
            }
            b2_.EnQue(b2);
            b2 = b2_.DeQue<T>();
            LocalTensor<float> c = c1_.AllocTensor<float>();
            Mmad(c, a2, b2,
                 MmadParams(static_cast<uint16_t>(mT), static_cast<uint16_t>(w), static_cast<uint16_t>(nT), 0, false,
                            true));
            if constexpr (P_PARTS > 1) {
                // + P_lo . V into the same L0C tile: the sum is formed in fp32, never rounded to T
                if ((mT / 16) * (w / 16) < 10) {
                    PipeBarrier<PIPE_M>();  // Mmad.md: a small accumulating Mmad waits for the previous one
                }
                Mmad(c, a2[mT * nT], b2,
                     MmadParams(static_cast<uint16_t>(mT), static_cast<uint16_t>(w), static_cast<uint16_t>(nT), 0,
                                false, false));
            }
            b2_.FreeTensor(b2);
            c1_.EnQue(c);
            c = c1_.DeQue<float>();
            Fixpipe<float, float, CFG_ROW_MAJOR>(oWs_[e0], c,
                                                 FixpipeParamsV220(static_cast<uint16_t>(w), static_cast<uint16_t>(mT),
                                                                   static_cast<uint16_t>(mT), t_.dvPad, false));
            c1_.FreeTensor(c);
        }
        a2_.FreeTensor(a2);
        pA1_.FreeTensor(pL1);
        vB1_.FreeTensor(vL1);
    }

    // an ND [rows, cols] matrix in GM to Nz in L1: C0-wide column blocks, each `rows` rows tall
    __aicore__ inline static Nd2NzParams NdToNz(uint32_t rows, uint32_t cols)
    {
        Nd2NzParams p;
        p.ndNum = 1;
        p.nValue = static_cast<uint16_t>(rows);
        p.dValue = static_cast<uint16_t>(cols);
        p.srcNdMatrixStride = 0;
        p.srcDValue = static_cast<uint16_t>(cols);
        p.dstNzC0Stride = static_cast<uint16_t>(rows);
        p.dstNzNStride = 1;
        p.dstNzMatrixStride = 0;
        return p;
    }

    SelectiveAttentionTiling t_;
    TPipe pipe_;
    // cube (AIC) buffers
    TQue<TPosition::A1, 1> qA1_;
    TQue<TPosition::B1, 2> kB1_;
    TQue<TPosition::A1, 1> pA1_;
    TQue<TPosition::B1, 2> vB1_;
    TQue<TPosition::A2, 2> a2_;
    TQue<TPosition::B2, 2> b2_;
    TQue<TPosition::CO1, 1> c1_;
    LocalTensor<T> qL1_;
    // vector (AIV) buffers
    TQue<TPosition::VECIN, 2> gatherQue_;
    TBuf<TPosition::VECCALC> vRowsBuf_, vtBuf_, offBuf_, rowBuf_, sBuf_, pBuf_, accBuf_, statBuf_, oRowBuf_,
        outRowBuf_, workBuf_;
    TBuf<TPosition::VECCALC> q8Buf_, deqBuf_, deqAuxBuf_, scaleRowBuf_, scaleOffBuf_;  // int8 dequantization

    GlobalTensor<T> qGm_, qRopeGm_, kvGm_, kvRopeGm_, vGm_, outGm_;
    GlobalTensor<int32_t> idxGm_, cuQGm_, cuKGm_, tableGm_, seqKGm_;
    GlobalTensor<float> sinkGm_, lseGm_;
    GlobalTensor<int8_t> kvI8Gm_, vI8Gm_;        // an int8 kv / v (then kvGm_ / vGm_ are unused)
    GlobalTensor<float> kvScaleGm_, vScaleGm_;   // their tile scales [rows, Hkv, tiles]
    GlobalTensor<T> qWs_, kWs_, vtWs_, pWs_;
    GlobalTensor<float> sWs_, oWs_;
    GlobalTensor<float> partOGm_, partStatGm_;  // partial results of the splits (numSplits > 1)

    // current work item
    uint32_t token_ = 0, kvHead_ = 0, headTile_ = 0, head0_ = 0, mCount_ = 0, seq_ = 0, split_ = 0;
    uint64_t tileBegin_ = 0, tileEnd_ = 0;  // the split's candidate tiles
    uint32_t nValid_[MAX_KV_SLOTS] = {};    // kept candidates of the tiles in the hand-over slots
    // this vector core's share of the packed heads: rows [rowBegin_, rowBegin_ + ownCount_) of the tile
    uint32_t sub_ = 0, rowsPer_ = 0, rowBegin_ = 0, ownCount_ = 0;
    uint64_t idxRow_ = 0;
    uint64_t keptTotal_ = 0;  // kept candidates of the current item over all its tiles (vector cores)
    int64_t seqLen_ = 0, kvStart_ = 0, qPos_ = 0;
};

// The combine launch (numSplits > 1): vector cores only, one step per (token, group of combineHeads
// consecutive heads). docs/spec.md section 6 over the splits, in split order whatever core ran them, so the
// result is deterministic: M = max_s m_s, w_s = exp(m_s - M), L = sum_s w_s l_s, out = sum_s w_s O_s /
// (L + exp(sink - M)), lse = M + ln L. A split that kept nothing holds m = NEG_BIG, l = 0, O = 0 and adds
// nothing; a head whose splits all kept nothing gets out = 0 and lse = -inf (decided by the kept flags).
template <typename T>
class SelectiveAttentionCombine {
public:
    __aicore__ inline void Init(GM_ADDR attnSink, GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                const SelectiveAttentionTiling& tiling)
    {
        t_ = tiling;
        const uint64_t T_ = t_.numTokens, H = t_.numHeads, rowsSplit = T_ * t_.numSplits * H;
        outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), T_ * H * t_.valueDim);
        lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), T_ * H);
        if (t_.hasSink) {
            sinkGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(attnSink), H);
        }
        partOGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(workspace + t_.partialO), rowsSplit * t_.dvPad);
        partStatGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(workspace + t_.partialStat), rowsSplit * 3);
        // host/tiling.cpp (CombineUbBytes) charges exactly these sizes
        const uint32_t g = t_.combineHeads;
        pipe_.InitBuffer(mBuf_, t_.numSplits * g * sizeof(float));
        pipe_.InitBuffer(lBuf_, t_.numSplits * g * sizeof(float));
        pipe_.InitBuffer(keptBuf_, t_.numSplits * g * sizeof(float));
        pipe_.InitBuffer(wBuf_, t_.numSplits * g * sizeof(float));
        pipe_.InitBuffer(vecBuf_, COMBINE_VEC_SLOTS * g * sizeof(float));
        pipe_.InitBuffer(accBuf_, g * t_.dvPad * sizeof(float));
        pipe_.InitBuffer(oBuf_, g * t_.dvPad * sizeof(float));
        pipe_.InitBuffer(outRowBuf_, t_.dvPad * sizeof(T));
    }

    __aicore__ inline void Process()
    {
        const uint64_t groupsPerToken = (t_.numHeads + t_.combineHeads - 1) / t_.combineHeads;
        for (uint64_t grp = GetBlockIdx(); grp < t_.combineGroups; grp += GetBlockNum()) {
            const uint32_t h0 = static_cast<uint32_t>(grp % groupsPerToken) * t_.combineHeads;
            CombineGroup(static_cast<uint32_t>(grp / groupsPerToken), h0,
                         t_.numHeads - h0 < t_.combineHeads ? t_.numHeads - h0 : t_.combineHeads);
        }
    }

private:
    template <HardEvent evt>
    __aicore__ inline void Sync()
    {
        const int32_t id = static_cast<int32_t>(pipe_.template FetchEventID<evt>());
        SetFlag<evt>(id);
        WaitFlag<evt>(id);
    }

    __aicore__ inline void CombineGroup(uint32_t token, uint32_t h0, uint32_t gc)
    {
        const uint32_t g = t_.combineHeads, S = t_.numSplits, dv = t_.dvPad;
        const uint64_t H = t_.numHeads;
        const int32_t n = static_cast<int32_t>(gc);
        LocalTensor<float> mS = mBuf_.Get<float>(), lS = lBuf_.Get<float>(), kS = keptBuf_.Get<float>();
        LocalTensor<float> w = wBuf_.Get<float>(), vec = vecBuf_.Get<float>();
        LocalTensor<float> M = vec[0 * g], L = vec[1 * g], any = vec[2 * g], lnL = vec[3 * g], denom = vec[4 * g];
        LocalTensor<float> sinkT = vec[5 * g], tmp = vec[6 * g], lseRow = vec[7 * g];
        LocalTensor<float> acc = accBuf_.Get<float>(), o = oBuf_.Get<float>();
        LocalTensor<T> outRow = outRowBuf_.Get<T>();

        // m, l and kept of these heads in every split: S blocks of gc floats, 3H floats apart in GM, one
        // g-float (32-byte) row per split in UB
        const uint32_t ubRow = (gc * sizeof(float) + 31) / 32 * 32;
        const DataCopyExtParams cp(static_cast<uint16_t>(S), gc * sizeof(float),
                                   static_cast<uint32_t>((3 * H - gc) * sizeof(float)), (g * sizeof(float) - ubRow) / 32, 0);
        const DataCopyPadExtParams<float> noPad(false, 0, 0, 0.0f);
        const uint64_t st0 = uint64_t(token) * S * 3 * H + h0;
        DataCopyPad(mS, partStatGm_[st0], cp, noPad);
        DataCopyPad(lS, partStatGm_[st0 + H], cp, noPad);
        DataCopyPad(kS, partStatGm_[st0 + 2 * H], cp, noPad);
        Sync<HardEvent::MTE2_V>();
        Adds(M, mS, 0.0f, n);
        Adds(any, kS, 0.0f, n);
        for (uint32_t s = 1; s < S; ++s) {
            Max(M, M, mS[s * g], n);
            Add(any, any, kS[s * g], n);
        }
        Duplicate(L, 0.0f, n);
        for (uint32_t s = 0; s < S; ++s) {
            Sub(w[s * g], mS[s * g], M, n);
            Exp(w[s * g], w[s * g], n);  // <= 1: M is the largest m (an empty split's NEG_BIG gives 0)
            Mul(tmp, w[s * g], lS[s * g], n);
            Add(L, L, tmp, n);
        }
        Ln(lnL, L, n);
        Add(lseRow, M, lnL, n);
        if (t_.hasSink) {
            // the sink joins the denominator only
            Sync<HardEvent::V_S>();
            for (uint32_t i = 0; i < gc; ++i) {
                sinkT.SetValue(i, sinkGm_.GetValue(h0 + i));
            }
            Sync<HardEvent::S_V>();
            Sub(sinkT, sinkT, M, n);
            Exp(sinkT, sinkT, n);
            Add(denom, L, sinkT, n);
        } else {
            Adds(denom, L, 0.0f, n);
        }
        Duplicate(acc, 0.0f, static_cast<int32_t>(g * dv));
        Sync<HardEvent::V_S>();  // the scalar unit reads w, any, denom and lse below
        // O rows of the group, split by split in order: acc += w_s * O_s
        for (uint32_t s = 0; s < S; ++s) {
            DataCopyPad(o, partOGm_[((uint64_t(token) * S + s) * H + h0) * dv],
                        DataCopyExtParams(1, gc * dv * sizeof(float), 0, 0, 0), noPad);
            Sync<HardEvent::MTE2_V>();
            for (uint32_t i = 0; i < gc; ++i) {
                Muls(o[i * dv], o[i * dv], w.GetValue(s * g + i), static_cast<int32_t>(dv));
            }
            Add(acc, acc, o, static_cast<int32_t>(gc * dv));
            Sync<HardEvent::V_MTE2>();
        }
        LocalTensor<uint32_t> lseBits = lseRow.template ReinterpretCast<uint32_t>();
        for (uint32_t i = 0; i < gc; ++i) {
            LocalTensor<float> a = acc[i * dv];
            if (any.GetValue(i) > 0.0f) {
                const float inv = 1.0f / denom.GetValue(i);
                Muls(a, a, inv, static_cast<int32_t>(dv));
            } else {
                lseBits.SetValue(i, NEG_INF_BITS);  // no kept candidate in any split: out = 0, lse = -inf
                Duplicate(a, 0.0f, static_cast<int32_t>(dv));
            }
            const uint64_t outOff = (uint64_t(token) * H + h0 + i) * t_.valueDim;
            if constexpr (IsSameType<T, float>::value) {
                Sync<HardEvent::V_MTE3>();
                DataCopyPad(outGm_[outOff], a, DataCopyExtParams(1, t_.valueDim * sizeof(T), 0, 0, 0));
            } else {
                Cast(outRow, a, RoundMode::CAST_RINT, dv);
                Sync<HardEvent::V_MTE3>();
                DataCopyPad(outGm_[outOff], outRow, DataCopyExtParams(1, t_.valueDim * sizeof(T), 0, 0, 0));
            }
            Sync<HardEvent::MTE3_V>();
        }
        Sync<HardEvent::S_MTE3>();
        DataCopyPad(lseGm_[uint64_t(token) * H + h0], lseRow, DataCopyExtParams(1, gc * sizeof(float), 0, 0, 0));
        // the next group rewrites what the scalar unit and MTE3 read here
        Sync<HardEvent::MTE3_V>();
        Sync<HardEvent::S_V>();
    }

    SelectiveAttentionTiling t_;
    TPipe pipe_;
    TBuf<TPosition::VECCALC> mBuf_, lBuf_, keptBuf_, wBuf_, vecBuf_, accBuf_, oBuf_, outRowBuf_;
    GlobalTensor<T> outGm_;
    GlobalTensor<float> lseGm_, sinkGm_, partOGm_, partStatGm_;
};

}  // namespace selattn

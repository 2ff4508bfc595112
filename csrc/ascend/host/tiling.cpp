// Host tiling: see tiling.h. The kernel has never run on an NPU; the cost model below is a capacity-
// driven heuristic, not a measurement. Tuned values must come from bench/npu_check.sh on a device.
#include "tiling.h"

#include <algorithm>
#include <stdexcept>

namespace selattn {

namespace {
constexpr uint64_t KB = 1024;
constexpr uint32_t GATHER_ROWS = 16;  // = selattn::GATHER_ROWS in the kernel
constexpr uint32_t STAT_SLOTS = 10;   // = selattn::STAT_SLOTS in the kernel
constexpr uint32_t COMBINE_VEC_SLOTS = 8;  // = selattn::COMBINE_VEC_SLOTS in the kernel

uint64_t Align32(uint64_t x) { return (x + 31) / 32 * 32; }
uint64_t Align512(uint64_t x) { return (x + 511) / 512 * 512; }
uint32_t Up16(uint32_t x) { return (x + 15) / 16 * 16; }
uint64_t CeilDiv(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }  // no a + b - 1 overflow
// widest quantized row (Dqk of an int8 kv, Dv of an int8 v) rounded up to 16: the kernel's staging width
uint32_t QuantPad(const ProblemShape& sh)
{
    return std::max(sh.kvInt8 ? Up16(sh.Dqk) : 0u, sh.separateV && sh.vInt8 ? Up16(sh.Dv) : 0u);
}
}  // namespace

const std::vector<SocSpec>& SocTable()
{
    // name, family, AIC, AIV, cube MHz, UB, UB reserved, L1, L0A, L0B, L0C, bf16, fp32 cube
    static const std::vector<SocSpec> table = {
        {"Ascend910B1", "A2", 24, 48, 1850, 192 * KB, 8 * KB, 512 * KB, 64 * KB, 64 * KB, 128 * KB, true, true},
        {"Ascend910B2", "A2", 24, 48, 1800, 192 * KB, 8 * KB, 512 * KB, 64 * KB, 64 * KB, 128 * KB, true, true},
        {"Ascend910B3", "A2", 20, 40, 1800, 192 * KB, 8 * KB, 512 * KB, 64 * KB, 64 * KB, 128 * KB, true, true},
        {"Ascend910B4", "A2", 20, 40, 1500, 192 * KB, 8 * KB, 512 * KB, 64 * KB, 64 * KB, 128 * KB, true, true},
        {"Ascend910_9391", "A3", 24, 48, 1850, 192 * KB, 8 * KB, 512 * KB, 64 * KB, 64 * KB, 128 * KB, true, true},
        {"Ascend910_9362", "A3", 20, 40, 1500, 192 * KB, 8 * KB, 512 * KB, 64 * KB, 64 * KB, 128 * KB, true, true},
        // 310P3: 8 AI cores (cube + vector on one core) plus 7 vector-only cores; no bfloat16 anywhere and
        // no float32 Mmad on its cube. The mix kernel uses one block per AI core.
        {"Ascend310P3", "310P", 8, 8, 1060, 256 * KB, 8 * KB, 1024 * KB, 64 * KB, 64 * KB, 256 * KB, false, false},
    };
    return table;
}

const SocSpec* FindSoc(const std::string& name)
{
    for (const SocSpec& s : SocTable()) {
        if (s.name == name) {
            return &s;
        }
    }
    return nullptr;
}

MemoryUse MemoryFor(const ProblemShape& sh, const TileChoice& tc, uint32_t vecSubBlocks)
{
    const uint64_t sz = sh.dtypeBytes;
    const uint64_t dqkPad = Up16(sh.Dqk), dkPad = dqkPad + Up16(sh.Dr), dvPad = Up16(sh.Dv);
    const uint64_t m = tc.mTile, n = tc.nTile, pParts = ProbabilityParts(sh.dtypeBytes);
    MemoryUse u;
    // AIC: Q, K (kvBufNum), P (its parts), V^T (kvBufNum) in L1; L0A/L0B ping-pong; one L0C tile
    u.l1 = Align32(m * dkPad * sz) + tc.kvBufNum * Align32(n * dkPad * sz) + Align32(pParts * m * n * sz) +
           tc.kvBufNum * Align32(dvPad * n * sz);
    u.l0a = tc.l0BufNum * Align32(std::max(m * tc.dkChunk, pParts * m * n) * sz);
    u.l0b = tc.l0BufNum * Align32(std::max(n * tc.dkChunk, n * tc.dvChunk) * sz);
    u.l0c = Align32(std::max(m * n, m * tc.dvChunk) * 4);
    // AIV (each of them): gather queue, v rows (separate v only), V^T block, Gather offsets, kept rows, and
    // for its share of the heads S, P, accumulator, row statistics; one O row, one output row, reduce work
    // (P_lo, in 16-bit dtypes, lives inside S: no UB of its own)
    const uint64_t r = m / std::max<uint32_t>(1, vecSubBlocks);
    u.ub = tc.vecBufNum * Align32(GATHER_ROWS * dkPad * sz) + (sh.separateV ? Align32(GATHER_ROWS * dvPad * sz) : 0) +
           Align32(dvPad * GATHER_ROWS * sz) + Align32(dvPad * GATHER_ROWS * 4) + Align32(n * 4) + Align32(r * n * 4) +
           Align32(r * n * sz) + Align32(r * dvPad * 4) + Align32(STAT_SLOTS * r * 4) + Align32(dvPad * 4) +
           Align32(dvPad * sz) + Align32(n * 4);
    if (const uint64_t w = QuantPad(sh)) {
        // int8 dequantization of one row: its bytes, fp32 values, fp32 scratch, tile scales, scale offsets
        u.ub += Align32(w) + 2 * Align32(w * 4) + Align32(uint64_t(std::max(sh.KvScaleTiles(), sh.VScaleTiles())) * 4) +
                Align32(w * 4);
    }
    return u;
}

uint64_t CombineUbBytes(const ProblemShape& sh, uint32_t numSplits)
{
    const uint64_t dvPad = Up16(sh.Dv), g = COMBINE_HEADS;
    // m, l, kept and the weights: one 32-byte row of COMBINE_HEADS floats per split; the per-head vectors;
    // the fp32 accumulator and one split's O rows of the group; one output row in the input dtype
    return 4 * Align32(uint64_t(numSplits) * g * 4) + Align32(COMBINE_VEC_SLOTS * g * 4) + 2 * Align32(g * dvPad * 4) +
           Align32(dvPad * sh.dtypeBytes);
}

SplitPlan SplitsFor(const ProblemShape& sh, const TileChoice& tc, const SocSpec& soc)
{
    SplitPlan sp;
    const uint64_t tiles = tc.nTile ? CeilDiv(sh.Candidates(), tc.nTile) : 0;
    if (tiles == 0) {
        return sp;  // K = 0 (or a malformed nTile, refused by FitProblems): nothing to split
    }
    const uint32_t hg = std::max<uint32_t>(1, sh.H / std::max<uint32_t>(1, sh.Hkv));
    const uint64_t headTiles = tc.mTile ? CeilDiv(hg, tc.mTile) : 1;
    uint64_t want = tc.numSplits;
    if (want == 0) {
        const uint64_t pairs = std::max<uint64_t>(1, uint64_t(sh.T) * sh.Hkv);
        want = std::max<uint64_t>(1, soc.aicNum / pairs);
        if (headTiles > 1) {
            want = std::max<uint64_t>(want, CeilDiv(tiles, MAX_KV_SLOTS));
        }
    }
    sp.numSplits = static_cast<uint32_t>(std::min<uint64_t>({want, tiles, MAX_SPLITS}));
    sp.splitTiles = CeilDiv(tiles, sp.numSplits);
    // several head tiles re-use a split's rows when all of them fit the slots; otherwise (one head tile, or
    // a split longer than MAX_KV_SLOTS tiles) the hand-over is a ping-pong of two slots as before
    sp.gatherOnce = headTiles > 1 && sp.splitTiles <= MAX_KV_SLOTS;
    sp.kvSlots = static_cast<uint32_t>(sp.gatherOnce ? sp.splitTiles : std::min<uint64_t>(2, sp.splitTiles));
    return sp;
}

std::string DtypeProblems(const ProblemShape& sh, const SocSpec& soc)
{
    if (sh.isBf16 && !soc.bf16) {
        return soc.name + " has no bfloat16 support in hardware";
    }
    if (sh.isFloat32 && !soc.fp32Cube) {
        return soc.name + "'s cube unit has no float32 Mmad";
    }
    return "";
}

std::string FitProblems(const ProblemShape& sh, const TileChoice& tc, const SocSpec& soc)
{
    std::string why = DtypeProblems(sh, soc);
    if (!why.empty()) {
        return why;
    }
    const uint32_t c0 = 32 / sh.dtypeBytes;
    const uint32_t dqkPad = Up16(sh.Dqk), dkPad = dqkPad + Up16(sh.Dr), dvPad = Up16(sh.Dv);
    auto bad = [&](const std::string& s) { why += (why.empty() ? "" : "; ") + s; };
    if (tc.mTile == 0 || tc.mTile % 16 || tc.nTile == 0 || tc.nTile % 16) bad("mTile and nTile must be multiples of 16");
    if (tc.dkChunk == 0 || tc.dkChunk % 16 || tc.dvChunk == 0 || tc.dvChunk % 16) bad("dkChunk and dvChunk must be multiples of 16");
    if (tc.vecBufNum < 1 || tc.vecBufNum > 2 || tc.kvBufNum < 1 || tc.kvBufNum > 2 || tc.l0BufNum < 1 || tc.l0BufNum > 2)
        bad("buffer counts must be 1 or 2");
    if (!why.empty()) return why;
    // LoadData2DParams.repeatTimes is 8 bits; Nd2NzParams and MmadParams fields are 16 bits (A2/A3)
    if (tc.dkChunk / c0 > 255 || tc.nTile / 16 > 255 || tc.nTile / c0 > 255 || tc.dvChunk / 16 > 255)
        bad("a LoadData repeat count would exceed 255");
    // Mmad m, n, k <= 4095 (Mmad.md); the V^T write is one DataCopyPad of dvPad blocks, blockCount <= 4095
    // (DataCopyPad docs); Nd2Nz dValue <= 16384
    if (tc.mTile > 4095 || tc.nTile > 4095 || tc.dkChunk > 4095 || tc.dvChunk > 4095) bad("an Mmad dimension would exceed 4095");
    if (dvPad > 4095) bad("value width " + std::to_string(dvPad) + " > 4095: the V^T DataCopyPad blockCount limit");
    if (dkPad > 16384) bad("key width " + std::to_string(dkPad) + " > 16384: the Nd2Nz dValue limit");
    const MemoryUse u = MemoryFor(sh, tc, soc.VecPerCube());
    auto over = [&](const char* mem, uint64_t need, uint64_t cap) {
        if (need > cap) bad(std::string(mem) + " needs " + std::to_string(need) + " bytes > " + std::to_string(cap));
    };
    over("UB", u.ub, soc.UbUsable());
    over("L1", u.l1, soc.l1Bytes);
    over("L0A", u.l0a, soc.l0aBytes);
    over("L0B", u.l0b, soc.l0bBytes);
    over("L0C", u.l0c, soc.l0cBytes);
    const SplitPlan sp = SplitsFor(sh, tc, soc);
    if (sp.numSplits > 1) {
        over("UB (combine launch)", CombineUbBytes(sh, sp.numSplits), soc.UbUsable());
    }
    (void)dqkPad;
    return why;
}

TileChoice ChooseTiles(const ProblemShape& sh, const SocSpec& soc)
{
    std::string why = DtypeProblems(sh, soc);
    if (!why.empty()) {
        throw std::runtime_error(why);
    }
    const uint32_t c0 = 32 / sh.dtypeBytes, pParts = ProbabilityParts(sh.dtypeBytes);
    const uint32_t hg = std::max<uint32_t>(1, sh.H / std::max<uint32_t>(1, sh.Hkv));
    const uint32_t dkPad = Up16(sh.Dqk) + Up16(sh.Dr), dvPad = Up16(sh.Dv);
    const uint64_t candidates = std::max<uint64_t>(1, sh.Candidates());
    const uint32_t mMax = Up16(hg), nMax = static_cast<uint32_t>(std::min<uint64_t>(Up16(static_cast<uint32_t>(
                                                                      std::min<uint64_t>(candidates, 1u << 20))), 512));
    TileChoice best;
    double bestCost = -1.0;
    for (uint32_t m = 16; m <= std::max<uint32_t>(16, mMax) && m <= 256; m *= 2) {
        // every multiple of 16, not only powers of two: decode splits 2048 candidates over 24 cores best
        // with nTile = 96 (22 one-tile splits), where 64 and 128 leave cores idle or double a split
        for (uint32_t n = 16; n <= std::max<uint32_t>(16, nMax); n += 16) {
            for (uint32_t bufs = 0; bufs < 8; ++bufs) {
                TileChoice tc;
                tc.mTile = m;
                tc.nTile = n;
                tc.vecBufNum = (bufs & 1) ? 1 : 2;
                tc.kvBufNum = (bufs & 2) ? 1 : 2;
                tc.l0BufNum = (bufs & 4) ? 1 : 2;
                // widest head-dim split and output chunk that fit L0A/L0B/L0C with these buffers
                tc.dkChunk = 0;
                for (uint32_t d = std::min<uint32_t>(dkPad, 255 * c0) / 16 * 16; d >= 16; d -= 16) {
                    if (tc.l0BufNum * Align32(uint64_t(std::max(m * d, pParts * m * n)) * sh.dtypeBytes) <= soc.l0aBytes &&
                        tc.l0BufNum * Align32(uint64_t(n) * d * sh.dtypeBytes) <= soc.l0bBytes) {
                        tc.dkChunk = d;
                        break;
                    }
                }
                tc.dvChunk = 0;
                for (uint32_t d = dvPad; d >= 16; d -= 16) {
                    if (tc.l0BufNum * Align32(uint64_t(n) * std::max(d, tc.dkChunk) * sh.dtypeBytes) <= soc.l0bBytes &&
                        Align32(uint64_t(m) * std::max(n, d) * 4) <= soc.l0cBytes) {
                        tc.dvChunk = d;
                        break;
                    }
                }
                if (tc.dkChunk == 0 || tc.dvChunk == 0 || !FitProblems(sh, tc, soc).empty()) {
                    continue;
                }
                // cost per block, in rough cube-fractal units: rounds of work items x (gathers x scalar index
                // scan and row copies + tiles x head tiles x (cube fractal ops + per-tile handshakes + softmax
                // rows)), plus the combine launch when the candidates are split
                const SplitPlan sp = SplitsFor(sh, tc, soc);
                const uint64_t headTiles = CeilDiv(hg, m);
                const uint64_t items = uint64_t(std::max<uint32_t>(1, sh.T)) * sh.Hkv * sp.numSplits;
                const uint64_t rounds = CeilDiv(items, soc.aicNum);
                const uint64_t tiles = std::max<uint64_t>(1, sp.splitTiles);
                const uint64_t gathers = tiles * (sp.gatherOnce ? 1 : headTiles);
                const double cube =
                    double(m / 16) * (n / 16) * (dkPad / c0) + double(pParts * m / 16) * (dvPad / 16) * (n / c0);
                const double perTile = cube + 1500.0 + 60.0 * std::min(m, hg);
                const double buffered = 1.0 - 0.03 * ((tc.vecBufNum == 2) + (tc.kvBufNum == 2) + (tc.l0BufNum == 2));
                // combine: rounds of head groups over the vector cores x splits x (one copy of the group's
                // fp32 O rows, a few vector passes); about a tenth of a gathered tile per split
                const double combine = sp.numSplits > 1 ? double(CeilDiv(uint64_t(std::max<uint32_t>(1, sh.T)) *
                                                                         CeilDiv(sh.H, COMBINE_HEADS), soc.aivNum)) *
                                                              sp.numSplits * (200.0 + COMBINE_HEADS * dvPad / 64.0)
                                                        : 0.0;
                const double cost =
                    double(rounds) * (gathers * 40.0 * n + double(tiles) * headTiles * perTile) * buffered + combine;
                if (bestCost < 0 || cost < bestCost) {
                    bestCost = cost;
                    best = tc;
                }
            }
        }
    }
    if (bestCost < 0) {
        throw std::runtime_error("no tiling of this shape fits " + soc.name + " (even 16x16 tiles overflow its on-chip memory)");
    }
    return best;
}

SelectiveAttentionTiling MakeTiling(const ProblemShape& sh, const TileChoice& tc, const SocSpec& soc)
{
    SelectiveAttentionTiling t{};
    t.numTokens = sh.T;
    t.numHeads = sh.H;
    t.numKvHeads = sh.Hkv;
    t.headsPerKv = sh.H / sh.Hkv;
    t.headDim = sh.Dqk;
    t.ropeDim = sh.Dr;
    t.valueDim = sh.Dv;
    t.separateV = sh.separateV;
    t.topk = sh.K;
    t.indexHeads = sh.indexHeads;
    t.blockSize = sh.blockSize;
    t.blockSpan = sh.BlockSpan();
    t.paged = sh.paged;
    t.pageSize = sh.pageSize;
    t.maxPages = sh.maxPages;
    t.numSeqs = sh.numSeqs;
    t.kvRows = sh.kvRows;
    t.causal = sh.causal;
    t.hasSink = sh.hasSink;
    t.smScale = sh.smScale;
    t.kvInt8 = sh.kvInt8;
    t.vInt8 = sh.separateV && sh.vInt8;
    t.scaleBlock = sh.scaleBlock;
    t.kvScaleTiles = sh.KvScaleTiles();
    t.vScaleTiles = sh.VScaleTiles();
    t.quantPad = QuantPad(sh);
    t.mTile = tc.mTile;
    t.nTile = tc.nTile;
    t.dqkPad = Up16(sh.Dqk);
    t.dkPad = t.dqkPad + Up16(sh.Dr);
    t.dvPad = Up16(sh.Dv);
    t.dkChunk = tc.dkChunk;
    t.dvChunk = tc.dvChunk;
    t.vecBufNum = tc.vecBufNum;
    t.kvBufNum = tc.kvBufNum;
    t.l0BufNum = tc.l0BufNum;
    t.vecSubBlocks = soc.VecPerCube();
    t.headTiles = static_cast<uint32_t>(CeilDiv(t.headsPerKv, tc.mTile));
    t.numTiles = CeilDiv(sh.Candidates(), tc.nTile);
    const SplitPlan sp = SplitsFor(sh, tc, soc);
    t.numSplits = sp.numSplits;
    t.kvSlots = sp.kvSlots;
    t.gatherOnce = sp.gatherOnce;
    t.numItems = uint64_t(sh.T) * sh.Hkv * t.numSplits;
    t.blockDim = static_cast<uint32_t>(std::max<uint64_t>(1, std::min<uint64_t>(t.numItems, soc.aicNum)));
    t.combineHeads = COMBINE_HEADS;
    t.combineGroups = static_cast<uint32_t>(uint64_t(sh.T) * CeilDiv(sh.H, COMBINE_HEADS));
    t.combineBlockDim = t.numSplits > 1 ? std::min<uint32_t>(soc.aivNum, t.combineGroups) : 0;
    const uint64_t sz = sh.dtypeBytes;
    uint64_t off = 0;
    t.wsQ = off;
    off += Align512(uint64_t(tc.mTile) * t.dkPad * sz);
    // K and V^T: kvSlots tiles each (the kernel gathers tile i + 1 while the cube works on tile i; with
    // gatherOnce every tile of the split stays for the later head tiles)
    t.wsK = off;
    off += t.kvSlots * Align512(uint64_t(tc.nTile) * t.dkPad * sz);
    t.wsVt = off;
    off += t.kvSlots * Align512(uint64_t(t.dvPad) * tc.nTile * sz);
    t.wsS = off;
    // S: two tiles (the cube scores tile i + 1 while the vector cores run the softmax of tile i)
    off += 2 * Align512(uint64_t(tc.mTile) * tc.nTile * 4);
    t.wsP = off;
    off += Align512(uint64_t(ProbabilityParts(sh.dtypeBytes)) * tc.mTile * tc.nTile * sz);
    t.wsO = off;
    off += Align512(uint64_t(tc.mTile) * t.dvPad * 4);
    t.workspacePerBlock = off;
    if (t.numSplits > 1) {
        const uint64_t rowsSplit = uint64_t(sh.T) * t.numSplits * sh.H;
        t.partialO = off * t.blockDim;
        t.partialStat = t.partialO + Align512(rowsSplit * t.dvPad * 4);
        t.partialBytes = t.partialStat + Align512(rowsSplit * 3 * 4) - t.partialO;
    }
    return t;
}

}  // namespace selattn

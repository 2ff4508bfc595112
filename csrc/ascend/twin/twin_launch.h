// Host side of a twin launch, shared by the pybind11 binding (twin_binding.cpp) and the planted-bug
// driver (tests/ascendc_planted/driver.cpp): blockDim blocks, one after another; inside a block one
// thread per core (1 AIC + vecSubBlocks AIVs) running concurrently and meeting only at the cross-core
// flags, as on the chip. No torch, no Python.
#pragma once

#include <array>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "kernel_operator.h"
#include "selective_attention_tiling.h"
#include "tiling.h"

namespace selattn {

using TwinKernel = void (*)(uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*,
                            uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*, uint8_t*);
struct KernelArgs {
    uint8_t *q = nullptr, *qRope = nullptr, *kv = nullptr, *kvRope = nullptr, *v = nullptr, *kvScale = nullptr,
            *vScale = nullptr, *indices = nullptr,
            *cuSeqlensQ = nullptr, *cuSeqlensK = nullptr, *blockTable = nullptr, *seqlensK = nullptr,
            *attnSink = nullptr, *out = nullptr, *lse = nullptr;
    // sizes in bytes of q and q_rope, for the twin's separate count of query reads (0: not counted apart)
    uint64_t qBytes = 0, qRopeBytes = 0;
};
// Per-launch counters of the twin (docs/ascendc.md "Work per core"), per launched block: bytes its
// cores' MTE2 read from the kernel's inputs in GM and from the workspace, and the part of the input
// bytes read from q / q_rope.
struct LaunchCounters {
    std::vector<uint64_t> blockInputBytes, blockWorkspaceBytes, blockQueryBytes;
};
struct LaunchReport {
    uint64_t peak[AscendC::twin::NUM_MEM] = {0, 0, 0, 0, 0};  // the most any one core's TPipe allocated (main launch)
    LaunchCounters main;     // the mix launch: blocks = cube cores, each with its vector cores
    LaunchCounters combine;  // the vector-only combine launch (numSplits > 1; empty otherwise)
    uint64_t combinePeakUb = 0;
};

inline AscendC::twin::SocLimits TwinLimits(const SocSpec& soc)
{
    AscendC::twin::SocLimits limits;
    limits.name = soc.name;
    limits.bytes[AscendC::twin::UB] = soc.UbUsable();
    limits.bytes[AscendC::twin::L1] = soc.l1Bytes;
    limits.bytes[AscendC::twin::L0A] = soc.l0aBytes;
    limits.bytes[AscendC::twin::L0B] = soc.l0bBytes;
    limits.bytes[AscendC::twin::L0C] = soc.l0cBytes;
    return limits;
}

// One launch of `blockDim` blocks, one after another. A mix block is a cube core and `ratio` vector cores
// (threads meeting at the cross-core flags); a vector-only launch (aicCores = false) has one vector core
// per block. `tracked(b)` is the GM region the twin checks for races between the block's cores.
template <typename Tracked>
inline LaunchCounters RunBlocks(TwinKernel kernel, const KernelArgs& a, uint8_t* workspace, uint8_t* tilingBytes,
                                uint32_t blockDim, bool aicCores, int ratio, const AscendC::twin::SocLimits& limits,
                                Tracked tracked, uint64_t peak[AscendC::twin::NUM_MEM])
{
    LaunchCounters c;
    c.blockInputBytes.assign(blockDim, 0);
    c.blockWorkspaceBytes.assign(blockDim, 0);
    c.blockQueryBytes.assign(blockDim, 0);
    for (uint32_t b = 0; b < blockDim; ++b) {
        AscendC::twin::Group group;
        group.soc = limits;
        group.ratio = ratio;
        const auto [base, size] = tracked(b);
        AscendC::twin::SetWorkspace(group, base, size);
        group.queryInputs[0] = {a.q, a.qBytes};
        group.queryInputs[1] = {a.qRope, a.qRopeBytes};
        std::mutex errMu;
        std::exception_ptr firstError;
        std::vector<std::array<uint64_t, AscendC::twin::NUM_MEM>> corePeak(AscendC::twin::MAX_SLOTS);
        auto core = [&](int coreType, int sub, int slot) {
            try {
                AscendC::twin::EnterCore(coreType, b, blockDim, sub, &group);
                kernel(a.q, a.qRope, a.kv, a.kvRope, a.v, a.kvScale, a.vScale, a.indices, a.cuSeqlensQ, a.cuSeqlensK, a.blockTable,
                       a.seqlensK, a.attnSink, a.out, a.lse, workspace, tilingBytes);
                for (int m = 0; m < AscendC::twin::NUM_MEM; ++m) corePeak[slot][m] = AscendC::twin::S().peak[m];
            } catch (...) {
                {
                    std::lock_guard<std::mutex> lk(errMu);
                    if (!firstError) firstError = std::current_exception();
                }
                AscendC::twin::Abort(group);
            }
        };
        std::vector<std::thread> threads;
        for (int sub = 0; sub < ratio; ++sub) threads.emplace_back(core, AscendC::AIV, sub, sub + 1);
        if (aicCores) core(AscendC::AIC, 0, 0);
        for (auto& th : threads) th.join();
        if (firstError) std::rethrow_exception(firstError);
        AscendC::twin::CheckQuiescent(group);
        for (const auto& cp : corePeak)
            for (int m = 0; m < AscendC::twin::NUM_MEM; ++m) peak[m] = std::max(peak[m], cp[m]);
        for (int s = 0; s < AscendC::twin::MAX_SLOTS; ++s) {
            c.blockInputBytes[b] += group.mte2InputBytes[s];
            c.blockWorkspaceBytes[b] += group.mte2WorkspaceBytes[s];
            c.blockQueryBytes[b] += group.mte2QueryBytes[s];
        }
    }
    return c;
}

// Runs the kernel, then (numSplits > 1) the combine kernel on the partial results the first launch left in
// the workspace, as one stream would order the two launches on the chip. Rethrows the first core's error
// (twin::MisuseError, twin::CapacityError, ...).
inline LaunchReport LaunchTwin(TwinKernel kernel, const KernelArgs& a, const SelectiveAttentionTiling& tiling,
                               const SocSpec& soc, TwinKernel combine = nullptr)
{
    // workspace starts as NaN bytes: the chip does not clear it, so neither do we. Every block's part, then
    // the partial results of the splits (written by the first launch, read by the combine).
    const uint64_t blocksBytes = tiling.workspacePerBlock * tiling.blockDim;
    std::vector<uint8_t> workspace(blocksBytes + tiling.partialBytes, 0xFF);
    std::vector<uint8_t> tilingBytes(sizeof(tiling));
    std::memcpy(tilingBytes.data(), &tiling, sizeof(tiling));
    // this launch's SoC travels with its core groups: concurrent launches for other SoCs do not see it
    const AscendC::twin::SocLimits limits = TwinLimits(soc);
    LaunchReport rep;
    uint8_t* ws = workspace.data();
    const uint64_t perBlock = tiling.workspacePerBlock;
    rep.main = RunBlocks(kernel, a, ws, tilingBytes.data(), tiling.blockDim, true, static_cast<int>(tiling.vecSubBlocks),
                         limits, [&](uint32_t b) { return std::pair<uint8_t*, uint64_t>(ws + uint64_t(b) * perBlock, perBlock); },
                         rep.peak);
    if (tiling.combineBlockDim > 0) {
        if (combine == nullptr) throw AscendC::twin::MisuseError("AscendC twin: the tiling splits the candidates but no combine kernel was given");
        uint64_t combinePeak[AscendC::twin::NUM_MEM] = {0, 0, 0, 0, 0};
        // the partial results are the combine's workspace: tracked, and its reads counted as workspace bytes
        rep.combine = RunBlocks(combine, a, ws, tilingBytes.data(), tiling.combineBlockDim, false, 1, limits,
                                [&](uint32_t) { return std::pair<uint8_t*, uint64_t>(ws + tiling.partialO, tiling.partialBytes); },
                                combinePeak);
        rep.combinePeakUb = combinePeak[AscendC::twin::UB];
    }
    return rep;
}

}  // namespace selattn

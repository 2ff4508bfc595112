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
struct LaunchReport {
    uint64_t peak[AscendC::twin::NUM_MEM] = {0, 0, 0, 0, 0};  // the most any one core's TPipe allocated
    // per block (its cube core and vector cores together): bytes MTE2 read from the kernel's inputs in
    // GM and from the workspace hand-over, and the work items the block ran
    std::vector<uint64_t> blockInputBytes, blockWorkspaceBytes;
    std::vector<uint64_t> blockQueryBytes;  // the part of blockInputBytes read from q and q_rope
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

// Runs the kernel; rethrows the first core's error (twin::MisuseError, twin::CapacityError, ...).
inline LaunchReport LaunchTwin(TwinKernel kernel, const KernelArgs& a, const SelectiveAttentionTiling& tiling,
                               const SocSpec& soc)
{
    // workspace starts as NaN bytes: the chip does not clear it, so neither do we
    std::vector<uint8_t> workspace(tiling.workspacePerBlock * tiling.blockDim, 0xFF);
    std::vector<uint8_t> tilingBytes(sizeof(tiling));
    std::memcpy(tilingBytes.data(), &tiling, sizeof(tiling));
    // this launch's SoC travels with its core groups: concurrent launches for other SoCs do not see it
    const AscendC::twin::SocLimits limits = TwinLimits(soc);
    LaunchReport rep;
    rep.blockInputBytes.assign(tiling.blockDim, 0);
    rep.blockWorkspaceBytes.assign(tiling.blockDim, 0);
    rep.blockQueryBytes.assign(tiling.blockDim, 0);
    const int ratio = static_cast<int>(tiling.vecSubBlocks);
    for (uint32_t b = 0; b < tiling.blockDim; ++b) {
        AscendC::twin::Group group;
        group.soc = limits;
        group.ratio = ratio;
        AscendC::twin::SetWorkspace(group, workspace.data() + uint64_t(b) * tiling.workspacePerBlock,
                                    tiling.workspacePerBlock);
        group.queryInputs[0] = {a.q, a.qBytes};
        group.queryInputs[1] = {a.qRope, a.qRopeBytes};
        std::mutex errMu;
        std::exception_ptr firstError;
        std::vector<std::array<uint64_t, AscendC::twin::NUM_MEM>> corePeak(ratio + 1);
        auto core = [&](int coreType, int sub, int slot) {
            try {
                AscendC::twin::EnterCore(coreType, b, tiling.blockDim, sub, &group);
                kernel(a.q, a.qRope, a.kv, a.kvRope, a.v, a.kvScale, a.vScale, a.indices, a.cuSeqlensQ, a.cuSeqlensK, a.blockTable,
                       a.seqlensK, a.attnSink, a.out, a.lse, workspace.data(), tilingBytes.data());
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
        core(AscendC::AIC, 0, 0);
        for (auto& th : threads) th.join();
        if (firstError) std::rethrow_exception(firstError);
        AscendC::twin::CheckQuiescent(group);
        for (const auto& cp : corePeak)
            for (int m = 0; m < AscendC::twin::NUM_MEM; ++m) rep.peak[m] = std::max(rep.peak[m], cp[m]);
        for (int s = 0; s <= ratio; ++s) {
            rep.blockInputBytes[b] += group.mte2InputBytes[s];
            rep.blockWorkspaceBytes[b] += group.mte2WorkspaceBytes[s];
            rep.blockQueryBytes[b] += group.mte2QueryBytes[s];
        }
    }
    return rep;
}

}  // namespace selattn

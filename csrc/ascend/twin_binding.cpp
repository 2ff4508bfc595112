// pybind11 module attention._ascendc_twin: the AscendC kernel (csrc/ascend/kernel) compiled for the CPU
// against the twin header (csrc/ascend/twin), run on CPU tensors. Host side only: it checks every
// argument (bad inputs never reach the kernel; errors are Python exceptions, never a crash), picks the
// tiling for the selected SoC (host/tiling.cpp), and launches the kernel once per block.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel_operator.h"  // the twin (include path csrc/ascend/twin): block index, SoC limits, errors
#include "tiling.h"
#include "twin_launch.h"
#include "binding_common.h"

using GmAddr = uint8_t*;
extern "C" {
#define SELATTN_DECL(NAME)                                                                                          \
    void NAME(GmAddr q, GmAddr qRope, GmAddr kv, GmAddr kvRope, GmAddr v, GmAddr kvScale, GmAddr vScale,          \
              GmAddr indices, GmAddr cuSeqlensQ, GmAddr cuSeqlensK, GmAddr blockTable, GmAddr seqlensK,             \
              GmAddr attnSink, GmAddr out, GmAddr lse, GmAddr workspace, GmAddr tiling);
SELATTN_DECL(selective_attention_f32)
SELATTN_DECL(selective_attention_f16)
SELATTN_DECL(selective_attention_bf16)
SELATTN_DECL(selective_attention_combine_f32)
SELATTN_DECL(selective_attention_combine_f16)
SELATTN_DECL(selective_attention_combine_bf16)
#undef SELATTN_DECL
}

namespace py = pybind11;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

[[noreturn]] void Bad(const std::string& msg) { throw py::value_error("ascendc twin: " + msg); }
[[noreturn]] void BadType(const std::string& msg) { throw py::type_error("ascendc twin: " + msg); }

// a Python value as T, or a TypeError naming it (pybind11's own cast error names neither side)
template <typename T>
T Cast(const py::handle& h, const std::string& what)
{
    try {
        return h.cast<T>();
    } catch (const py::cast_error&) {
        BadType(what + " has the wrong type (" + std::string(py::str(py::type::of(h))) + ")");
    }
}

void NeedCpuContiguous(const char* name, const Tensor& t)
{
    if (!t.device().is_cpu()) Bad(std::string(name) + " must be a CPU tensor for the twin");
    if (!t.is_contiguous()) Bad(std::string(name) + " must be contiguous");
}

const selattn::SocSpec& Soc(const std::string& name)
{
    const selattn::SocSpec* soc = selattn::FindSoc(name);
    if (soc == nullptr) {
        std::string names;
        for (const auto& s : selattn::SocTable()) names += (names.empty() ? "" : ", ") + s.name;
        Bad("unknown SoC '" + name + "' (known: " + names + ")");
    }
    return *soc;
}

selattn::TileChoice ApplyOverride(selattn::TileChoice tc, const py::object& override_)
{
    if (override_.is_none()) return tc;
    if (!py::isinstance<py::dict>(override_)) BadType("tiling must be a dict of tile sizes or None");
    py::dict d = override_.cast<py::dict>();
    for (auto item : d) {
        const std::string key = Cast<std::string>(item.first, "a tiling override key");
        const int64_t v = Cast<int64_t>(item.second, "tiling override " + key);
        if (v < 0 || v > 65535) Bad("tiling override " + key + " out of range");
        const uint32_t u = static_cast<uint32_t>(v);
        if (key == "mTile") tc.mTile = u;
        else if (key == "nTile") tc.nTile = u;
        else if (key == "dkChunk") tc.dkChunk = u;
        else if (key == "dvChunk") tc.dvChunk = u;
        else if (key == "vecBufNum") tc.vecBufNum = u;
        else if (key == "kvBufNum") tc.kvBufNum = u;
        else if (key == "l0BufNum") tc.l0BufNum = u;
        else if (key == "numSplits") tc.numSplits = u;  // clipped to the tiles and MAX_SPLITS (tiling.h)
        else Bad("unknown tiling override key '" + key + "'");
    }
    return tc;
}

py::dict TilingDict(const selattn::SelectiveAttentionTiling& t, const selattn::ProblemShape& shape,
                    const selattn::MemoryUse& mem, const selattn::SocSpec& soc)
{
    py::dict d;
    d["soc"] = soc.name;
    d["mTile"] = t.mTile;
    d["nTile"] = t.nTile;
    d["dkChunk"] = t.dkChunk;
    d["dvChunk"] = t.dvChunk;
    d["dkPad"] = t.dkPad;
    d["dvPad"] = t.dvPad;
    d["vecBufNum"] = t.vecBufNum;
    d["kvBufNum"] = t.kvBufNum;
    d["l0BufNum"] = t.l0BufNum;
    d["headTiles"] = t.headTiles;
    d["numTiles"] = t.numTiles;
    d["numItems"] = t.numItems;
    d["blockDim"] = t.blockDim;
    d["numSplits"] = t.numSplits;
    d["kvSlots"] = t.kvSlots;
    d["gatherOnce"] = bool(t.gatherOnce);
    d["combineBlockDim"] = t.combineBlockDim;
    d["workspacePerBlock"] = t.workspacePerBlock;
    d["partialBytes"] = t.partialBytes;
    py::dict m;
    m["UB"] = py::make_tuple(mem.ub, soc.UbUsable());
    m["L1"] = py::make_tuple(mem.l1, soc.l1Bytes);
    m["L0A"] = py::make_tuple(mem.l0a, soc.l0aBytes);
    m["L0B"] = py::make_tuple(mem.l0b, soc.l0bBytes);
    m["L0C"] = py::make_tuple(mem.l0c, soc.l0cBytes);
    d["memory"] = m;  // bytes needed, bytes available
    // UB of one vector core of the combine launch (0: no combine)
    d["combine_ub"] = py::make_tuple(t.numSplits > 1 ? selattn::CombineUbBytes(shape, t.numSplits) : 0, soc.UbUsable());
    return d;
}

selattn::ProblemShape ShapeFromDict(const py::dict& d)
{
    selattn::ProblemShape sh;
    auto get = [&](const char* k, int64_t dflt) -> uint32_t {
        int64_t v = d.contains(k) ? Cast<int64_t>(d[k], std::string("shape field ") + k) : dflt;
        if (v < 0 || v >= (int64_t(1) << 31)) Bad(std::string("shape field ") + k + " out of range [0, 2^31)");
        return static_cast<uint32_t>(v);
    };
    sh.T = get("T", 1);
    sh.H = get("H", 1);
    sh.Hkv = get("Hkv", 1);
    sh.Dqk = get("Dqk", 64);
    sh.Dr = get("Dr", 0);
    sh.Dv = get("Dv", sh.Dqk);
    sh.K = get("K", 64);
    sh.blockSize = get("block_size", 1);
    if (d.contains("max_seqlen") && !d["max_seqlen"].is_none()) sh.maxSeqLen = get("max_seqlen", 0);
    sh.indexHeads = 1;
    const std::string dt = d.contains("dtype") ? Cast<std::string>(d["dtype"], "shape field dtype") : "float16";
    if (dt == "float32") { sh.dtypeBytes = 4; sh.isFloat32 = true; }
    else if (dt == "bfloat16") { sh.dtypeBytes = 2; sh.isBf16 = true; }
    else if (dt == "float16") { sh.dtypeBytes = 2; }
    else Bad("dtype must be float32, float16 or bfloat16");
    sh.separateV = d.contains("separate_v") && Cast<bool>(d["separate_v"], "shape field separate_v");
    sh.kvInt8 = d.contains("kv_int8") && Cast<bool>(d["kv_int8"], "shape field kv_int8");
    sh.vInt8 = d.contains("v_int8") && Cast<bool>(d["v_int8"], "shape field v_int8");
    sh.scaleBlock = get("scale_block", 128);
    if (sh.scaleBlock == 0) Bad("scale_block must be positive");
    if (sh.H == 0 || sh.Hkv == 0 || sh.H % sh.Hkv) Bad("H must be a positive multiple of Hkv");
    if (sh.Dqk == 0 || sh.Dv == 0 || sh.blockSize == 0) Bad("Dqk, Dv and block_size must be positive");
    return sh;
}

// plan(soc, shape: dict, override: dict | None) -> tiling dict (+ "fits", "problems")
py::dict Plan(const std::string& socName, const py::dict& shapeDict, const py::object& override_)
{
    const selattn::SocSpec& soc = Soc(socName);
    selattn::ProblemShape sh = ShapeFromDict(shapeDict);
    selattn::TileChoice tc;
    std::string problems = selattn::DtypeProblems(sh, soc);
    if (problems.empty()) {
        try {
            tc = selattn::ChooseTiles(sh, soc);
        } catch (const std::runtime_error& e) {
            problems = e.what();
        }
    }
    tc = ApplyOverride(tc, override_);
    if (!override_.is_none() || problems.empty()) problems = selattn::FitProblems(sh, tc, soc);
    const bool malformed = tc.mTile == 0 || tc.nTile == 0;  // MakeTiling divides by both; FitProblems names it
    if (malformed) tc = selattn::TileChoice{};
    py::dict d = TilingDict(selattn::MakeTiling(sh, tc, soc), sh, selattn::MemoryFor(sh, tc, soc.VecPerCube()), soc);
    d["fits"] = problems.empty();
    d["problems"] = problems;
    return d;
}

py::list SocList()
{
    py::list out;
    for (const auto& s : selattn::SocTable()) {
        py::dict d;
        d["name"] = s.name;
        d["family"] = s.family;
        d["aic"] = s.aicNum;
        d["aiv"] = s.aivNum;
        d["cube_mhz"] = s.cubeMHz;
        d["ub"] = s.ubBytes;
        d["ub_usable"] = s.UbUsable();
        d["l1"] = s.l1Bytes;
        d["l0a"] = s.l0aBytes;
        d["l0b"] = s.l0bBytes;
        d["l0c"] = s.l0cBytes;
        d["bf16"] = s.bf16;
        d["fp32_cube"] = s.fp32Cube;
        out.append(d);
    }
    return out;
}

GmAddr Addr(const OptTensor& t) { return t ? static_cast<GmAddr>(t->data_ptr()) : nullptr; }

py::dict Forward(const Tensor& q, const OptTensor& qRope, const Tensor& kv, const OptTensor& kvRope, const OptTensor& v,
                 const Tensor& indices, const Tensor& cuSeqlensQ, const OptTensor& cuSeqlensK,
                 const OptTensor& blockTable, const OptTensor& seqlensK, const OptTensor& attnSink, Tensor& out,
                 Tensor& lse, double smScale, int64_t dV, int64_t blockSize, bool causal, const std::string& socName,
                 const py::object& override_, bool checkFit, const OptTensor& kvScale, const OptTensor& vScale,
                 int64_t scaleBlock)
{
    const selattn::SocSpec& soc = Soc(socName);
    // ---- every argument checked here (binding_common.h): the kernel trusts the tiling and the pointers ----
    const selattn::ArgChecker check("ascendc twin", NeedCpuContiguous);
    const selattn::ProblemShape sh = check.Check({q, qRope, kv, kvRope, v, kvScale, vScale, indices, cuSeqlensQ,
                                                  cuSeqlensK, blockTable, seqlensK, attnSink, out, lse, smScale, dV,
                                                  blockSize, scaleBlock, causal});
    // contents: a read of CPU tensors costs nothing here (the NPU build leaves them to the kernel's bounds)
    const int64_t B = sh.numSeqs, T = sh.T;
    const int32_t* cq = cuSeqlensQ.data_ptr<int32_t>();
    if (cq[0] != 0 || cq[B] != T) Bad("cu_seqlens_q must start at 0 and end at T");
    for (int64_t b = 0; b < B; ++b)
        if (cq[b + 1] < cq[b]) Bad("cu_seqlens_q must be non-decreasing");
    if (sh.paged) {
        const int64_t maxPages = sh.maxPages, pageSize = sh.pageSize;
        const int32_t* lens = seqlensK->data_ptr<int32_t>();
        const int32_t* table = blockTable->data_ptr<int32_t>();
        for (int64_t b = 0; b < B; ++b) {
            if (lens[b] < 0 || lens[b] > maxPages * pageSize) Bad("seqlens_k out of the block table's capacity");
            for (int64_t j = 0; j < (lens[b] + pageSize - 1) / pageSize; ++j)
                if (table[b * maxPages + j] < 0 || table[b * maxPages + j] >= kv.size(0))
                    Bad("block_table names a page outside the cache");
        }
    } else {
        const int32_t* ck = cuSeqlensK->data_ptr<int32_t>();
        if (ck[0] != 0 || ck[B] > int64_t(sh.kvRows)) Bad("cu_seqlens_k must start at 0 and end at or below S");
        for (int64_t b = 0; b < B; ++b)
            if (ck[b + 1] < ck[b]) Bad("cu_seqlens_k must be non-decreasing");
    }

    // ---- tiling ----
    std::string why = selattn::DtypeProblems(sh, soc);
    if (!why.empty()) Bad(why);
    // an override names only what it changes: start from the planner's choice
    selattn::TileChoice tc;
    try {
        tc = ApplyOverride(selattn::ChooseTiles(sh, soc), override_);
    } catch (const std::runtime_error& e) {
        Bad(e.what());  // nothing fits this SoC: a ValueError, as for every other refused argument
    }
    why = selattn::FitProblems(sh, tc, soc);
    if (checkFit && !why.empty()) Bad("tiling does not fit " + soc.name + ": " + why);
    // structural limits hold even when the capacity check is skipped (the twin checks capacity itself)
    if (tc.mTile == 0 || tc.mTile % 16 || tc.nTile == 0 || tc.nTile % 16 || tc.dkChunk == 0 || tc.dkChunk % 16 ||
        tc.dvChunk == 0 || tc.dvChunk % 16 || tc.vecBufNum < 1 || tc.vecBufNum > 2 || tc.kvBufNum < 1 ||
        tc.kvBufNum > 2 || tc.l0BufNum < 1 || tc.l0BufNum > 2)
        Bad("malformed tiling override");
    const selattn::SelectiveAttentionTiling tiling = selattn::MakeTiling(sh, tc, soc);

    // ---- launch (twin/twin_launch.h): one call per block, as the chip would run blockDim blocks ----
    const auto dt = q.scalar_type();
    auto kernel = dt == at::kFloat ? selective_attention_f32
                  : dt == at::kHalf ? selective_attention_f16
                                    : selective_attention_bf16;
    auto combine = dt == at::kFloat ? selective_attention_combine_f32
                   : dt == at::kHalf ? selective_attention_combine_f16
                                     : selective_attention_combine_bf16;
    selattn::KernelArgs args;
    args.q = static_cast<GmAddr>(q.data_ptr());
    args.qRope = Addr(qRope);
    args.kv = static_cast<GmAddr>(kv.data_ptr());
    args.kvRope = Addr(kvRope);
    args.v = Addr(v);
    args.kvScale = Addr(kvScale);
    args.vScale = Addr(vScale);
    args.indices = static_cast<GmAddr>(indices.data_ptr());
    args.cuSeqlensQ = static_cast<GmAddr>(cuSeqlensQ.data_ptr());
    args.cuSeqlensK = Addr(cuSeqlensK);
    args.blockTable = Addr(blockTable);
    args.seqlensK = Addr(seqlensK);
    args.attnSink = Addr(attnSink);
    args.out = static_cast<GmAddr>(out.data_ptr());
    args.lse = static_cast<GmAddr>(lse.data_ptr());
    args.qBytes = q.nbytes();
    args.qRopeBytes = qRope ? qRope->nbytes() : 0;
    selattn::LaunchReport rep;
    {
        py::gil_scoped_release nogil;
        rep = selattn::LaunchTwin(kernel, args, tiling, soc, combine);
    }
    py::dict d = TilingDict(tiling, sh, selattn::MemoryFor(sh, tc, soc.VecPerCube()), soc);
    py::dict peakDict;
    for (int m = 0; m < AscendC::twin::NUM_MEM; ++m) peakDict[AscendC::twin::MemName(m)] = rep.peak[m];
    d["twin_peak"] = peakDict;  // the most any one core's TPipe allocated, per memory (main launch)
    auto list = [](const std::vector<uint64_t>& v) {
        py::list l;
        for (uint64_t x : v) l.append(x);
        return l;
    };
    // per launched block (a cube core with its vector cores): MTE2 bytes read from the inputs in GM and
    // from the workspace hand-over; a block with no input reads did no work
    d["twin_mte2_input_bytes"] = list(rep.main.blockInputBytes);
    d["twin_mte2_workspace_bytes"] = list(rep.main.blockWorkspaceBytes);
    d["twin_mte2_query_bytes"] = list(rep.main.blockQueryBytes);  // the part read from q and q_rope
    // the combine launch (one vector core per block; empty lists when the candidates are not split): it
    // reads only the partial results, which count as workspace bytes
    d["twin_combine_mte2_input_bytes"] = list(rep.combine.blockInputBytes);
    d["twin_combine_mte2_workspace_bytes"] = list(rep.combine.blockWorkspaceBytes);
    d["twin_combine_peak_ub"] = rep.combinePeakUb;
    return d;
}

}  // namespace

PYBIND11_MODULE(_ascendc_twin, m)
{
    m.doc() = "AscendC selective-attention kernel compiled for the CPU against the twin header";
    py::register_exception<AscendC::twin::CapacityError>(m, "CapacityError", PyExc_RuntimeError);
    py::register_exception<AscendC::twin::MisuseError>(m, "KernelMisuseError", PyExc_RuntimeError);
    m.def("forward", &Forward, py::arg("q"), py::arg("q_rope"), py::arg("kv"), py::arg("kv_rope"), py::arg("v"),
          py::arg("indices"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("block_table"),
          py::arg("seqlens_k"), py::arg("attn_sink"), py::arg("out"), py::arg("lse"), py::arg("sm_scale"),
          py::arg("d_v"), py::arg("block_size"), py::arg("causal"), py::arg("soc"), py::arg("tiling") = py::none(),
          py::arg("check_fit") = true, py::arg("kv_scale") = py::none(), py::arg("v_scale") = py::none(),
          py::arg("scale_block") = 128,
          "Run the kernel on CPU tensors; writes out and lse; returns the tiling used and the twin's peak on-chip use.");
    m.def("plan", &Plan, py::arg("soc"), py::arg("shape"), py::arg("tiling") = py::none(),
          "The tiling the host picks for a shape on a SoC (no kernel run).");
    m.def("soc_table", &SocList, "The SoC capacity table the tiling uses.");
}

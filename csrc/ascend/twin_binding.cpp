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

using GmAddr = uint8_t*;
extern "C" {
#define SELATTN_DECL(NAME)                                                                                          \
    void NAME(GmAddr q, GmAddr qRope, GmAddr kv, GmAddr kvRope, GmAddr v, GmAddr indices, GmAddr cuSeqlensQ,        \
              GmAddr cuSeqlensK, GmAddr blockTable, GmAddr seqlensK, GmAddr attnSink, GmAddr out, GmAddr lse,       \
              GmAddr workspace, GmAddr tiling);
SELATTN_DECL(selective_attention_f32)
SELATTN_DECL(selective_attention_f16)
SELATTN_DECL(selective_attention_bf16)
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

std::string Shape(const Tensor& t)
{
    std::ostringstream s;
    s << t.sizes();
    return s.str();
}

void NeedCpuContiguous(const char* name, const Tensor& t)
{
    if (!t.device().is_cpu()) Bad(std::string(name) + " must be a CPU tensor for the twin");
    if (!t.is_contiguous()) Bad(std::string(name) + " must be contiguous");
}

void NeedDtype(const char* name, const Tensor& t, at::ScalarType dt)
{
    if (t.scalar_type() != dt)
        Bad(std::string(name) + " must be " + c10::toString(dt) + ", got " + c10::toString(t.scalar_type()));
}

void NeedShape(const char* name, const Tensor& t, std::vector<int64_t> want)
{
    if (t.sizes().vec() != want) {
        std::ostringstream s;
        s << name << " must have shape " << at::IntArrayRef(want) << ", got " << Shape(t);
        Bad(s.str());
    }
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
        else Bad("unknown tiling override key '" + key + "'");
    }
    return tc;
}

py::dict TilingDict(const selattn::SelectiveAttentionTiling& t, const selattn::MemoryUse& mem,
                    const selattn::SocSpec& soc)
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
    d["workspacePerBlock"] = t.workspacePerBlock;
    py::dict m;
    m["UB"] = py::make_tuple(mem.ub, soc.UbUsable());
    m["L1"] = py::make_tuple(mem.l1, soc.l1Bytes);
    m["L0A"] = py::make_tuple(mem.l0a, soc.l0aBytes);
    m["L0B"] = py::make_tuple(mem.l0b, soc.l0bBytes);
    m["L0C"] = py::make_tuple(mem.l0c, soc.l0cBytes);
    d["memory"] = m;  // bytes needed, bytes available
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
    py::dict d = TilingDict(selattn::MakeTiling(sh, tc, soc), selattn::MemoryFor(sh, tc, soc.VecPerCube()), soc);
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
                 const py::object& override_, bool checkFit)
{
    const selattn::SocSpec& soc = Soc(socName);
    // ---- every argument checked here: the kernel trusts the tiling struct and the pointers ----
    for (auto [name, t] : std::vector<std::pair<const char*, const Tensor*>>{
             {"q", &q}, {"kv", &kv}, {"indices", &indices}, {"cu_seqlens_q", &cuSeqlensQ}, {"out", &out}, {"lse", &lse}})
        NeedCpuContiguous(name, *t);
    for (auto [name, t] : std::vector<std::pair<const char*, const OptTensor*>>{
             {"q_rope", &qRope}, {"kv_rope", &kvRope}, {"v", &v}, {"cu_seqlens_k", &cuSeqlensK},
             {"block_table", &blockTable}, {"seqlens_k", &seqlensK}, {"attn_sink", &attnSink}})
        if (*t) NeedCpuContiguous(name, **t);
    const auto dt = q.scalar_type();
    if (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16) Bad("q must be float32, float16 or bfloat16");
    if (q.dim() != 3) Bad("q must be [T, H, Dqk], got " + Shape(q));
    const int64_t T = q.size(0), H = q.size(1), Dqk = q.size(2);
    const bool paged = kv.dim() == 4;
    if (kv.dim() != 3 && !paged) Bad("kv must be [S, Hkv, Dqk] or [P, page, Hkv, Dqk], got " + Shape(kv));
    NeedDtype("kv", kv, dt);
    const int64_t Hkv = kv.size(-2);
    if (Hkv < 1 || H < 1 || H % Hkv) Bad("H must be a positive multiple of Hkv");
    if (kv.size(-1) != Dqk || Dqk < 1) Bad("kv's last dimension must equal Dqk");
    const int64_t pageSize = paged ? kv.size(1) : 0;
    if (paged && pageSize < 1) Bad("a paged kv needs a page size (kv.shape[1]) >= 1, got " + Shape(kv));
    const int64_t kvRows = paged ? kv.size(0) * kv.size(1) : kv.size(0);
    std::vector<int64_t> lead = kv.sizes().vec();
    lead.pop_back();
    int64_t Dr = 0;
    if (qRope.has_value() != kvRope.has_value()) Bad("q_rope and kv_rope go together");
    if (qRope) {
        NeedDtype("q_rope", *qRope, dt);
        NeedDtype("kv_rope", *kvRope, dt);
        if (qRope->dim() != 3 || qRope->size(0) != T || qRope->size(1) != H) Bad("q_rope must be [T, H, Dr]");
        Dr = qRope->size(2);
        std::vector<int64_t> want = lead;
        want.push_back(Dr);
        NeedShape("kv_rope", *kvRope, want);
        if (Dr < 1) Bad("rope width must be >= 1");
    }
    int64_t Dv = dV;
    if (v) {
        NeedDtype("v", *v, dt);
        Dv = v->size(-1);
        std::vector<int64_t> want = lead;
        want.push_back(Dv);
        NeedShape("v", *v, want);
        if (dV != Dv) Bad("d_v must equal v's width");
    } else if (Dv < 1 || Dv > Dqk) {
        Bad("latent d_v must be in [1, Dqk]");
    }
    if (Dv < 1) Bad("value width must be >= 1");
    NeedDtype("indices", indices, at::kInt);
    if (indices.dim() != 3 || indices.size(0) != T || (indices.size(1) != 1 && indices.size(1) != Hkv))
        Bad("indices must be int32 [T, Hkv or 1, K], got " + Shape(indices));
    const int64_t K = indices.size(2);
    if (blockSize < 1 || blockSize > (int64_t(1) << 20)) Bad("block_size must be in [1, 2^20]");
    // the kernel computes in float32: a finite double beyond float32 would become inf there
    if (!std::isfinite(smScale) || std::fabs(smScale) > double(FLT_MAX)) Bad("sm_scale must be finite in float32");
    NeedDtype("cu_seqlens_q", cuSeqlensQ, at::kInt);
    if (cuSeqlensQ.dim() != 1 || cuSeqlensQ.size(0) < 2) Bad("cu_seqlens_q must be int32 [B+1]");
    const int64_t B = cuSeqlensQ.size(0) - 1;
    const int32_t* cq = cuSeqlensQ.data_ptr<int32_t>();
    if (cq[0] != 0 || cq[B] != T) Bad("cu_seqlens_q must start at 0 and end at T");
    for (int64_t b = 0; b < B; ++b)
        if (cq[b + 1] < cq[b]) Bad("cu_seqlens_q must be non-decreasing");
    int64_t maxPages = 0;
    if (paged) {
        if (cuSeqlensK) Bad("a paged kv takes block_table and seqlens_k, not cu_seqlens_k");
        if (!blockTable || !seqlensK) Bad("a paged kv needs block_table and seqlens_k");
        NeedDtype("block_table", *blockTable, at::kInt);
        NeedDtype("seqlens_k", *seqlensK, at::kInt);
        if (blockTable->dim() != 2 || blockTable->size(0) != B) Bad("block_table must be int32 [B, max_pages]");
        NeedShape("seqlens_k", *seqlensK, {B});
        maxPages = blockTable->size(1);
        const int32_t* lens = seqlensK->data_ptr<int32_t>();
        const int32_t* table = blockTable->data_ptr<int32_t>();
        for (int64_t b = 0; b < B; ++b) {
            if (lens[b] < 0 || lens[b] > maxPages * pageSize) Bad("seqlens_k out of the block table's capacity");
            for (int64_t j = 0; j < (lens[b] + pageSize - 1) / pageSize; ++j)
                if (table[b * maxPages + j] < 0 || table[b * maxPages + j] >= kv.size(0))
                    Bad("block_table names a page outside the cache");
        }
    } else {
        if (blockTable || seqlensK) Bad("block_table / seqlens_k are for a paged kv");
        if (!cuSeqlensK) Bad("cu_seqlens_k is required (the Python side passes [0, S] by default)");
        NeedDtype("cu_seqlens_k", *cuSeqlensK, at::kInt);
        NeedShape("cu_seqlens_k", *cuSeqlensK, {B + 1});
        const int32_t* ck = cuSeqlensK->data_ptr<int32_t>();
        if (ck[0] != 0 || ck[B] > kvRows) Bad("cu_seqlens_k must start at 0 and end at or below S");
        for (int64_t b = 0; b < B; ++b)
            if (ck[b + 1] < ck[b]) Bad("cu_seqlens_k must be non-decreasing");
    }
    if (attnSink) {
        NeedDtype("attn_sink", *attnSink, at::kFloat);
        NeedShape("attn_sink", *attnSink, {H});
    }
    NeedDtype("out", out, dt);
    NeedShape("out", out, {T, H, Dv});
    NeedDtype("lse", lse, at::kFloat);
    NeedShape("lse", lse, {T, H});
    // the tiling struct's 32-bit fields; every product of them (candidate slots, work items, offsets)
    // is formed in 64 bits by the host and the kernel
    const int64_t LIM = int64_t(1) << 31;
    if (T >= LIM) Bad("q: more than 2^31 - 1 tokens");
    if (kvRows >= LIM) Bad("kv: more than 2^31 - 1 cache rows");
    if (K >= LIM) Bad("indices: K beyond 2^31 - 1");
    if (maxPages >= LIM) Bad("block_table: more than 2^31 - 1 columns");
    if (H >= LIM || Dqk >= LIM || Dr >= LIM || Dv >= LIM) Bad("q/kv/v: a head count or width beyond 2^31 - 1");

    // ---- tiling ----
    selattn::ProblemShape sh;
    sh.T = T; sh.H = H; sh.Hkv = Hkv; sh.Dqk = Dqk; sh.Dr = Dr; sh.Dv = Dv; sh.K = K;
    sh.indexHeads = indices.size(1);
    sh.blockSize = blockSize;
    sh.dtypeBytes = q.element_size();
    sh.isFloat32 = dt == at::kFloat;
    sh.isBf16 = dt == at::kBFloat16;
    sh.separateV = v.has_value();
    sh.paged = paged;
    sh.pageSize = pageSize;
    sh.maxPages = maxPages;
    sh.numSeqs = B;
    sh.kvRows = kvRows;
    sh.maxSeqLen = paged ? uint64_t(maxPages) * uint64_t(pageSize) : uint64_t(kvRows);
    sh.causal = causal;
    sh.hasSink = attnSink.has_value();
    sh.smScale = static_cast<float>(smScale);
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
    auto kernel = dt == at::kFloat ? selective_attention_f32
                  : dt == at::kHalf ? selective_attention_f16
                                    : selective_attention_bf16;
    selattn::KernelArgs args;
    args.q = static_cast<GmAddr>(q.data_ptr());
    args.qRope = Addr(qRope);
    args.kv = static_cast<GmAddr>(kv.data_ptr());
    args.kvRope = Addr(kvRope);
    args.v = Addr(v);
    args.indices = static_cast<GmAddr>(indices.data_ptr());
    args.cuSeqlensQ = static_cast<GmAddr>(cuSeqlensQ.data_ptr());
    args.cuSeqlensK = Addr(cuSeqlensK);
    args.blockTable = Addr(blockTable);
    args.seqlensK = Addr(seqlensK);
    args.attnSink = Addr(attnSink);
    args.out = static_cast<GmAddr>(out.data_ptr());
    args.lse = static_cast<GmAddr>(lse.data_ptr());
    selattn::LaunchReport rep;
    {
        py::gil_scoped_release nogil;
        rep = selattn::LaunchTwin(kernel, args, tiling, soc);
    }
    py::dict d = TilingDict(tiling, selattn::MemoryFor(sh, tc, soc.VecPerCube()), soc);
    py::dict peakDict;
    for (int m = 0; m < AscendC::twin::NUM_MEM; ++m) peakDict[AscendC::twin::MemName(m)] = rep.peak[m];
    d["twin_peak"] = peakDict;  // the most any one core's TPipe allocated, per memory
    py::list mte2;
    for (uint64_t v : rep.blockMte2) mte2.append(v);
    d["twin_mte2_gm_bytes"] = mte2;  // per block (cube core and its vector cores): MTE2 reads from GM
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
          py::arg("check_fit") = true,
          "Run the kernel on CPU tensors; writes out and lse; returns the tiling used and the twin's peak on-chip use.");
    m.def("plan", &Plan, py::arg("soc"), py::arg("shape"), py::arg("tiling") = py::none(),
          "The tiling the host picks for a shape on a SoC (no kernel run).");
    m.def("soc_table", &SocList, "The SoC capacity table the tiling uses.");
}

// pybind11 module attention._ascendc_npu: runs the AscendC kernel on the current NPU stream.
// Built only where CANN and torch_npu exist (csrc/ascend/build_ext.py). NEVER COMPILED OR RUN BY ITS
// AUTHORS: no CANN toolkit, torch_npu headers or NPU were available. bench/npu_check.sh builds it.
//
// The SoC's capacities come from the device's own report (platform_ascendc), falling back to our
// table by SoC name; the tiling is chosen by the same host code as the CPU twin (host/tiling.cpp).
// Argument checks: shapes, dtypes and devices here (cheap, no sync); content checks (monotone
// cu_seqlens, table entries) are attention.inputs.validate's job under ATTENTION_DEBUG=1, and the
// kernel reads block tables / lengths only for positions it has already bounded.
#include <torch/extension.h>

#include <acl/acl.h>
#include <tiling/platform/platform_ascendc.h>
#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/core/npu/NPUCachingAllocator.h"

#include <cstring>
#include <optional>
#include <string>

#include "tiling.h"

extern "C" int selattn_launch(uint32_t blockDim, void* stream, int dtypeCode, uint8_t* q, uint8_t* qRope, uint8_t* kv,
                              uint8_t* kvRope, uint8_t* v, uint8_t* indices, uint8_t* cuSeqlensQ, uint8_t* cuSeqlensK,
                              uint8_t* blockTable, uint8_t* seqlensK, uint8_t* attnSink, uint8_t* out, uint8_t* lse,
                              uint8_t* workspace, uint8_t* tiling);

namespace py = pybind11;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

[[noreturn]] void Bad(const std::string& msg) { throw py::value_error("ascendc npu: " + msg); }

uint8_t* Addr(const OptTensor& t) { return t ? static_cast<uint8_t*>(t->data_ptr()) : nullptr; }

void NeedNpu(const char* name, const Tensor& t)
{
    if (t.device().type() != c10::DeviceType::PrivateUse1) Bad(std::string(name) + " must be an NPU tensor");
    if (!t.is_contiguous()) Bad(std::string(name) + " must be contiguous");
}

// the device's own report; the table supplies what the platform API does not
selattn::SocSpec DeviceSoc()
{
    const char* name = aclrtGetSocName();
    const selattn::SocSpec* known = name ? selattn::FindSoc(name) : nullptr;
    selattn::SocSpec soc = known ? *known : *selattn::FindSoc("Ascend910B2");
    if (name) soc.name = name;
    auto* plat = platform_ascendc::PlatformAscendCManager::GetInstance();
    if (plat != nullptr) {
        uint64_t v = 0;
        plat->GetCoreMemSize(platform_ascendc::CoreMemType::UB, v);
        if (v) soc.ubBytes = v;
        plat->GetCoreMemSize(platform_ascendc::CoreMemType::L1, v);
        if (v) soc.l1Bytes = v;
        plat->GetCoreMemSize(platform_ascendc::CoreMemType::L0_A, v);
        if (v) soc.l0aBytes = v;
        plat->GetCoreMemSize(platform_ascendc::CoreMemType::L0_B, v);
        if (v) soc.l0bBytes = v;
        plat->GetCoreMemSize(platform_ascendc::CoreMemType::L0_C, v);
        if (v) soc.l0cBytes = v;
        if (plat->GetCoreNumAic()) soc.aicNum = plat->GetCoreNumAic();
        if (plat->GetCoreNumAiv()) soc.aivNum = plat->GetCoreNumAiv();
    }
    return soc;
}

const selattn::SocSpec& CachedSoc()
{
    static const selattn::SocSpec soc = DeviceSoc();
    return soc;
}

void Forward(const Tensor& q, const OptTensor& qRope, const Tensor& kv, const OptTensor& kvRope, const OptTensor& v,
             const Tensor& indices, const Tensor& cuSeqlensQ, const OptTensor& cuSeqlensK, const OptTensor& blockTable,
             const OptTensor& seqlensK, const OptTensor& attnSink, Tensor& out, Tensor& lse, double smScale, int64_t dV,
             int64_t blockSize, bool causal)
{
    for (auto [n, t] : std::vector<std::pair<const char*, const Tensor*>>{
             {"q", &q}, {"kv", &kv}, {"indices", &indices}, {"cu_seqlens_q", &cuSeqlensQ}, {"out", &out}, {"lse", &lse}})
        NeedNpu(n, *t);
    for (auto [n, t] : std::vector<std::pair<const char*, const OptTensor*>>{
             {"q_rope", &qRope}, {"kv_rope", &kvRope}, {"v", &v}, {"cu_seqlens_k", &cuSeqlensK},
             {"block_table", &blockTable}, {"seqlens_k", &seqlensK}, {"attn_sink", &attnSink}})
        if (*t) NeedNpu(n, **t);
    const auto dt = q.scalar_type();
    const int dtypeCode = dt == at::kFloat ? 0 : dt == at::kHalf ? 1 : dt == at::kBFloat16 ? 2 : -1;
    if (dtypeCode < 0) Bad("q must be float32, float16 or bfloat16");
    if (q.dim() != 3 || (kv.dim() != 3 && kv.dim() != 4)) Bad("q must be [T, H, D], kv [S, Hkv, D] or paged");
    if (kv.scalar_type() != dt || out.scalar_type() != dt) Bad("kv and out must have q's dtype");
    if (indices.scalar_type() != at::kInt || cuSeqlensQ.scalar_type() != at::kInt) Bad("indices and cu_seqlens_q must be int32");
    if (lse.scalar_type() != at::kFloat) Bad("lse must be float32");
    const bool paged = kv.dim() == 4;
    if (paged ? !(blockTable && seqlensK) : !cuSeqlensK) Bad("sequence metadata missing");

    selattn::ProblemShape sh;
    sh.T = q.size(0);
    sh.H = q.size(1);
    sh.Hkv = kv.size(-2);
    sh.Dqk = q.size(2);
    sh.Dr = qRope ? qRope->size(2) : 0;
    sh.Dv = v ? v->size(-1) : dV;
    sh.K = indices.size(2);
    sh.indexHeads = indices.size(1);
    sh.blockSize = blockSize;
    sh.dtypeBytes = q.element_size();
    sh.isFloat32 = dtypeCode == 0;
    sh.isBf16 = dtypeCode == 2;
    sh.separateV = v.has_value();
    sh.paged = paged;
    sh.pageSize = paged ? kv.size(1) : 0;
    sh.maxPages = paged ? blockTable->size(1) : 0;
    sh.numSeqs = cuSeqlensQ.size(0) - 1;
    sh.kvRows = paged ? kv.size(0) * kv.size(1) : kv.size(0);
    sh.causal = causal;
    sh.hasSink = attnSink.has_value();
    sh.smScale = static_cast<float>(smScale);
    if (sh.H % sh.Hkv || out.size(0) != sh.T || out.size(1) != sh.H || out.size(2) != sh.Dv) Bad("inconsistent shapes");

    const selattn::SocSpec& soc = CachedSoc();
    if (soc.family == "310P") Bad("the kernel is built for A2/A3 (dav-c220) only, not " + soc.name);
    const selattn::TileChoice tc = selattn::ChooseTiles(sh, soc);  // throws (RuntimeError) when nothing fits
    const selattn::SelectiveAttentionTiling tiling = selattn::MakeTiling(sh, tc, soc);

    auto u8 = q.options().dtype(at::kByte);
    Tensor tilingCpu = at::empty({static_cast<int64_t>(sizeof(tiling))}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(tilingCpu.data_ptr(), &tiling, sizeof(tiling));
    Tensor tilingDev = tilingCpu.to(q.device(), /*non_blocking=*/false);
    Tensor workspace = at::empty({static_cast<int64_t>(tiling.workspacePerBlock * tiling.blockDim)}, u8);
    void* stream = c10_npu::getCurrentNPUStream().stream(false);
    const int rc = selattn_launch(tiling.blockDim, stream, dtypeCode, static_cast<uint8_t*>(q.data_ptr()), Addr(qRope),
                                  static_cast<uint8_t*>(kv.data_ptr()), Addr(kvRope), Addr(v),
                                  static_cast<uint8_t*>(indices.data_ptr()), static_cast<uint8_t*>(cuSeqlensQ.data_ptr()),
                                  Addr(cuSeqlensK), Addr(blockTable), Addr(seqlensK), Addr(attnSink),
                                  static_cast<uint8_t*>(out.data_ptr()), static_cast<uint8_t*>(lse.data_ptr()),
                                  static_cast<uint8_t*>(workspace.data_ptr()), static_cast<uint8_t*>(tilingDev.data_ptr()));
    if (rc != 0) Bad("kernel launch failed");
    // workspace and tiling must outlive the kernel: record them on the stream before they are freed
    c10_npu::NPUCachingAllocator::recordStream(workspace.storage().data_ptr(), c10_npu::getCurrentNPUStream());
    c10_npu::NPUCachingAllocator::recordStream(tilingDev.storage().data_ptr(), c10_npu::getCurrentNPUStream());
}

py::dict DeviceTiling(const py::dict& shapeDict)
{
    const selattn::SocSpec& soc = CachedSoc();
    py::dict d;
    d["soc"] = soc.name;
    d["aic"] = soc.aicNum;
    d["aiv"] = soc.aivNum;
    d["ub"] = soc.ubBytes;
    d["l1"] = soc.l1Bytes;
    d["l0a"] = soc.l0aBytes;
    d["l0b"] = soc.l0bBytes;
    d["l0c"] = soc.l0cBytes;
    (void)shapeDict;
    return d;
}

}  // namespace

PYBIND11_MODULE(_ascendc_npu, m)
{
    m.doc() = "AscendC selective-attention kernel on the NPU (never run by its authors)";
    m.def("forward", &Forward, py::arg("q"), py::arg("q_rope"), py::arg("kv"), py::arg("kv_rope"), py::arg("v"),
          py::arg("indices"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("block_table"),
          py::arg("seqlens_k"), py::arg("attn_sink"), py::arg("out"), py::arg("lse"), py::arg("sm_scale"),
          py::arg("d_v"), py::arg("block_size"), py::arg("causal"));
    m.def("device_soc", &DeviceTiling, py::arg("shape") = py::dict(), "The SoC capacities this device reports.");
}

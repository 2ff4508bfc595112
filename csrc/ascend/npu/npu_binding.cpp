// pybind11 module attention._ascendc_npu: runs the AscendC kernel on the NPU of its inputs.
// Built only where CANN and torch_npu exist (csrc/ascend/build_ext.py). NEVER COMPILED OR RUN BY ITS
// AUTHORS: no CANN toolkit, torch_npu headers or NPU were available. bench/npu_check.sh builds it.
//
// The SoC's capacities come from the device's own report (platform_ascendc), falling back to our
// table by SoC name; the tiling is chosen by the same host code as the CPU twin (host/tiling.cpp), and
// the arguments are checked by the same code (binding_common.h: shapes, dtypes, zero sizes, ranges;
// every tensor must be a contiguous tensor on q's NPU). Contents (monotone cu_seqlens, table entries) are
// attention.inputs.validate's job under ATTENTION_DEBUG=1: reading them here would sync the device on
// every call, and the kernel reads block tables / lengths only for positions it has already bounded.
// The call path has no host sync: the tiling struct is uploaded once per (device, tiling) and cached,
// the workspace comes from torch_npu's caching allocator, and the launch goes on q's current stream
// under an NPUGuard for q's device.
#include <torch/extension.h>

#include <acl/acl.h>
#include <tiling/platform/platform_ascendc.h>
#include "torch_npu/csrc/core/npu/NPUGuard.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/core/npu/NPUCachingAllocator.h"

#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "binding_common.h"
#include "tiling.h"

extern "C" int selattn_launch(uint32_t blockDim, uint32_t combineBlockDim, void* stream, int dtypeCode, uint8_t* q,
                              uint8_t* qRope, uint8_t* kv, uint8_t* kvRope, uint8_t* v, uint8_t* kvScale, uint8_t* vScale,
                              uint8_t* indices, uint8_t* cuSeqlensQ, uint8_t* cuSeqlensK,
                              uint8_t* blockTable, uint8_t* seqlensK, uint8_t* attnSink, uint8_t* out, uint8_t* lse,
                              uint8_t* workspace, uint8_t* tiling);

namespace py = pybind11;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

[[noreturn]] void Bad(const std::string& msg) { throw py::value_error("ascendc npu: " + msg); }

uint8_t* Addr(const OptTensor& t) { return t ? static_cast<uint8_t*>(t->data_ptr()) : nullptr; }

// every tensor on q's NPU, contiguous (the kernel reads raw pointers)
std::function<void(const char*, const Tensor&)> OnDeviceOf(const Tensor& q)
{
    const c10::Device dev = q.device();
    return [dev](const char* name, const Tensor& t) {
        if (t.device() != dev)
            Bad(std::string(name) + " must be on " + dev.str() + " (q's device), got " + t.device().str());
        if (!t.is_contiguous()) Bad(std::string(name) + " must be contiguous");
    };
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

// The tiling struct on the device, uploaded once per (device, tiling bytes): a per-call upload from
// pageable host memory would be a synchronous copy on every call.
const Tensor& DeviceTilingFor(const selattn::SelectiveAttentionTiling& tiling, const c10::Device& dev)
{
    static std::mutex mu;
    static std::unordered_map<std::string, Tensor> cache;
    std::string key(reinterpret_cast<const char*>(&tiling), sizeof(tiling));
    key += dev.str();
    std::lock_guard<std::mutex> lk(mu);
    auto it = cache.find(key);
    if (it == cache.end()) {
        if (cache.size() >= 4096) cache.clear();  // a bound on distinct shapes kept resident
        Tensor host = at::empty({static_cast<int64_t>(sizeof(tiling))}, at::TensorOptions().dtype(at::kByte));
        std::memcpy(host.data_ptr(), &tiling, sizeof(tiling));
        it = cache.emplace(key, host.to(dev)).first;  // once per shape: the only synchronous copy
    }
    return it->second;
}

void Forward(const Tensor& q, const OptTensor& qRope, const Tensor& kv, const OptTensor& kvRope, const OptTensor& v,
             const Tensor& indices, const Tensor& cuSeqlensQ, const OptTensor& cuSeqlensK, const OptTensor& blockTable,
             const OptTensor& seqlensK, const OptTensor& attnSink, Tensor& out, Tensor& lse, double smScale, int64_t dV,
             int64_t blockSize, bool causal, const OptTensor& kvScale, const OptTensor& vScale, int64_t scaleBlock)
{
    if (q.device().type() != c10::DeviceType::PrivateUse1) Bad("q must be an NPU tensor");
    c10_npu::NPUGuard guard(q.device());  // q on npu:1 while npu:0 is current: q's device and stream
    const selattn::ArgChecker check("ascendc npu", OnDeviceOf(q));
    const selattn::ProblemShape sh = check.Check({q, qRope, kv, kvRope, v, kvScale, vScale, indices, cuSeqlensQ,
                                                  cuSeqlensK, blockTable, seqlensK, attnSink, out, lse, smScale, dV,
                                                  blockSize, scaleBlock, causal});
    const auto dt = q.scalar_type();
    const int dtypeCode = dt == at::kFloat ? 0 : dt == at::kHalf ? 1 : 2;

    const selattn::SocSpec& soc = CachedSoc();
    if (soc.family == "310P") Bad("the kernel is built for A2/A3 (dav-c220) only, not " + soc.name);
    const std::string why = selattn::DtypeProblems(sh, soc);
    if (!why.empty()) Bad(why);
    selattn::TileChoice tc;
    try {
        tc = selattn::ChooseTiles(sh, soc);
    } catch (const std::runtime_error& e) {
        Bad(e.what());
    }
    const selattn::SelectiveAttentionTiling tiling = selattn::MakeTiling(sh, tc, soc);
    if (sh.T == 0 || sh.H == 0) return;  // nothing to launch

    const Tensor& tilingDev = DeviceTilingFor(tiling, q.device());
    // from torch_npu's caching allocator, on the current stream: freed memory is reused without a sync.
    // Every block's hand-over part, then the partial results of a decode split (read by the combine launch)
    Tensor workspace = at::empty({static_cast<int64_t>(tiling.workspacePerBlock * tiling.blockDim + tiling.partialBytes)},
                                 q.options().dtype(at::kByte));
    void* stream = c10_npu::getCurrentNPUStream().stream(false);
    const int rc = selattn_launch(tiling.blockDim, tiling.combineBlockDim, stream, dtypeCode, static_cast<uint8_t*>(q.data_ptr()), Addr(qRope),
                                  static_cast<uint8_t*>(kv.data_ptr()), Addr(kvRope), Addr(v), Addr(kvScale), Addr(vScale),
                                  static_cast<uint8_t*>(indices.data_ptr()), static_cast<uint8_t*>(cuSeqlensQ.data_ptr()),
                                  Addr(cuSeqlensK), Addr(blockTable), Addr(seqlensK), Addr(attnSink),
                                  static_cast<uint8_t*>(out.data_ptr()), static_cast<uint8_t*>(lse.data_ptr()),
                                  static_cast<uint8_t*>(workspace.data_ptr()), static_cast<uint8_t*>(tilingDev.data_ptr()));
    if (rc != 0) Bad("kernel launch failed");
    // the workspace is freed when this function returns, before the kernel ends: tell the allocator
    c10_npu::NPUCachingAllocator::recordStream(workspace.storage().data_ptr(), c10_npu::getCurrentNPUStream());
}

py::dict DeviceReport()
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
    return d;
}

}  // namespace

PYBIND11_MODULE(_ascendc_npu, m)
{
    m.doc() = "AscendC selective-attention kernel on the NPU (never run by its authors)";
    m.def("forward", &Forward, py::arg("q"), py::arg("q_rope"), py::arg("kv"), py::arg("kv_rope"), py::arg("v"),
          py::arg("indices"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("block_table"),
          py::arg("seqlens_k"), py::arg("attn_sink"), py::arg("out"), py::arg("lse"), py::arg("sm_scale"),
          py::arg("d_v"), py::arg("block_size"), py::arg("causal"), py::arg("kv_scale") = py::none(),
          py::arg("v_scale") = py::none(), py::arg("scale_block") = 128);
    m.def("device_soc", &DeviceReport, "The SoC capacities this device reports (what the NPU tiling uses).");
}

// Argument checks and the problem shape, shared by the two torch bindings of the kernel (the CPU twin,
// twin_binding.cpp, and the NPU build, npu/npu_binding.cpp): every shape, dtype, zero-size and range
// rule is checked here once, before any kernel runs, and raises a Python ValueError naming the argument.
// What differs per build is passed in: where tensors must live (CPU / the NPU of q). Rules on tensor
// contents (monotone cu_seqlens, table entries) need a host read, so only the twin checks them (on a
// device that would be a sync per call; there the kernel bounds every read instead).
#pragma once

#include <torch/extension.h>

#include <cfloat>
#include <cmath>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "tiling.h"

namespace selattn {

using OptTensor = std::optional<at::Tensor>;

// the tensors and scalars of one call, as both bindings receive them
struct CallArgs {
    const at::Tensor& q;
    const OptTensor& qRope;
    const at::Tensor& kv;
    const OptTensor& kvRope;
    const OptTensor& v;
    const OptTensor& kvScale;  // float32 tile scales of an int8 kv (None for a kv in q's dtype)
    const OptTensor& vScale;   // the same for an int8 separate v
    const at::Tensor& indices;
    const at::Tensor& cuSeqlensQ;
    const OptTensor& cuSeqlensK;
    const OptTensor& blockTable;
    const OptTensor& seqlensK;
    const OptTensor& attnSink;
    const at::Tensor& out;
    const at::Tensor& lse;
    double smScale;
    int64_t dV, blockSize, scaleBlock;
    bool causal;
};

class ArgChecker {
public:
    // `who` prefixes every message; `place` checks where one tensor lives (and that it is contiguous)
    ArgChecker(std::string who, std::function<void(const char*, const at::Tensor&)> place)
        : who_(std::move(who)), place_(std::move(place)) {}

    [[noreturn]] void Bad(const std::string& msg) const { throw pybind11::value_error(who_ + ": " + msg); }

    static std::string Shape(const at::Tensor& t)
    {
        std::ostringstream s;
        s << t.sizes();
        return s.str();
    }
    void NeedDtype(const char* name, const at::Tensor& t, at::ScalarType dt) const
    {
        if (t.scalar_type() != dt)
            Bad(std::string(name) + " must be " + c10::toString(dt) + ", got " + c10::toString(t.scalar_type()));
    }
    void NeedShape(const char* name, const at::Tensor& t, std::vector<int64_t> want) const
    {
        if (t.sizes().vec() != want) {
            std::ostringstream s;
            s << name << " must have shape " << at::IntArrayRef(want) << ", got " << Shape(t);
            Bad(s.str());
        }
    }

    // Every rule that needs no read of tensor contents; returns the problem shape for the host tiling.
    ProblemShape Check(const CallArgs& a) const
    {
        for (auto [name, t] : std::vector<std::pair<const char*, const at::Tensor*>>{
                 {"q", &a.q}, {"kv", &a.kv}, {"indices", &a.indices}, {"cu_seqlens_q", &a.cuSeqlensQ},
                 {"out", &a.out}, {"lse", &a.lse}})
            place_(name, *t);
        for (auto [name, t] : std::vector<std::pair<const char*, const OptTensor*>>{
                 {"q_rope", &a.qRope}, {"kv_rope", &a.kvRope}, {"v", &a.v}, {"cu_seqlens_k", &a.cuSeqlensK},
                 {"block_table", &a.blockTable}, {"seqlens_k", &a.seqlensK}, {"attn_sink", &a.attnSink},
                 {"kv_scale", &a.kvScale}, {"v_scale", &a.vScale}})
            if (*t) place_(name, **t);
        const at::Tensor& q = a.q;
        const at::Tensor& kv = a.kv;
        const auto dt = q.scalar_type();
        if (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16) Bad("q must be float32, float16 or bfloat16");
        if (q.dim() != 3) Bad("q must be [T, H, Dqk], got " + Shape(q));
        const int64_t T = q.size(0), H = q.size(1), Dqk = q.size(2);
        const bool paged = kv.dim() == 4;
        if (kv.dim() != 3 && !paged) Bad("kv must be [S, Hkv, Dqk] or [P, page, Hkv, Dqk], got " + Shape(kv));
        // an int8 kv / v carries float32 tile scales (docs/contract.md); the Ascend A2/A3 units have no FP8
        if (a.scaleBlock < 1 || a.scaleBlock >= (int64_t(1) << 31)) Bad("scale_block must be in [1, 2^31)");
        const bool kvInt8 = kv.scalar_type() == at::kChar;
        if (kv.scalar_type() == at::ScalarType::Float8_e4m3fn)
            Bad("kv: float8_e4m3fn caches are not supported (Ascend A2/A3 have no FP8 data type)");
        if (!kvInt8) NeedDtype("kv", kv, dt);
        if (kvInt8 != a.kvScale.has_value()) Bad(kvInt8 ? "an int8 kv needs kv_scale" : "kv_scale is only for an int8 kv");
        const int64_t Hkv = kv.size(-2);
        if (Hkv < 1 || H < 1 || H % Hkv) Bad("H must be a positive multiple of Hkv");
        if (kv.size(-1) != Dqk || Dqk < 1) Bad("kv's last dimension must equal Dqk");
        const int64_t pageSize = paged ? kv.size(1) : 0;
        if (paged && pageSize < 1) Bad("a paged kv needs a page size (kv.shape[1]) >= 1, got " + Shape(kv));
        const int64_t kvRows = paged ? kv.size(0) * kv.size(1) : kv.size(0);
        std::vector<int64_t> lead = kv.sizes().vec();
        lead.pop_back();
        int64_t Dr = 0;
        if (a.qRope.has_value() != a.kvRope.has_value()) Bad("q_rope and kv_rope go together");
        if (a.qRope) {
            NeedDtype("q_rope", *a.qRope, dt);
            NeedDtype("kv_rope", *a.kvRope, dt);
            if (a.qRope->dim() != 3 || a.qRope->size(0) != T || a.qRope->size(1) != H) Bad("q_rope must be [T, H, Dr]");
            Dr = a.qRope->size(2);
            std::vector<int64_t> want = lead;
            want.push_back(Dr);
            NeedShape("kv_rope", *a.kvRope, want);
            if (Dr < 1) Bad("rope width must be >= 1");
        }
        if (kvInt8) {
            std::vector<int64_t> want = lead;
            want.push_back((Dqk + a.scaleBlock - 1) / a.scaleBlock);
            NeedDtype("kv_scale", *a.kvScale, at::kFloat);
            NeedShape("kv_scale", *a.kvScale, want);
        }
        int64_t Dv = a.dV;
        const bool vInt8 = a.v && a.v->scalar_type() == at::kChar;
        if (a.v && a.v->scalar_type() == at::ScalarType::Float8_e4m3fn)
            Bad("v: float8_e4m3fn caches are not supported (Ascend A2/A3 have no FP8 data type)");
        if (vInt8 != a.vScale.has_value()) Bad(vInt8 ? "an int8 v needs v_scale" : "v_scale is only for an int8 v");
        if (a.v) {
            if (!vInt8) NeedDtype("v", *a.v, dt);
            Dv = a.v->size(-1);
            std::vector<int64_t> want = lead;
            want.push_back(Dv);
            NeedShape("v", *a.v, want);
            if (a.dV != Dv) Bad("d_v must equal v's width");
            if (vInt8) {
                want.back() = (Dv + a.scaleBlock - 1) / a.scaleBlock;
                NeedDtype("v_scale", *a.vScale, at::kFloat);
                NeedShape("v_scale", *a.vScale, want);
            }
        } else if (Dv < 1 || Dv > Dqk) {
            Bad("latent d_v must be in [1, Dqk]");
        }
        if (Dv < 1) Bad("value width must be >= 1");
        NeedDtype("indices", a.indices, at::kInt);
        if (a.indices.dim() != 3 || a.indices.size(0) != T || (a.indices.size(1) != 1 && a.indices.size(1) != Hkv))
            Bad("indices must be int32 [T, Hkv or 1, K], got " + Shape(a.indices));
        const int64_t K = a.indices.size(2);
        if (a.blockSize < 1 || a.blockSize > (int64_t(1) << 20)) Bad("block_size must be in [1, 2^20]");
        // the kernel computes in float32: a finite double beyond float32 would become inf there
        if (!std::isfinite(a.smScale) || std::fabs(a.smScale) > double(FLT_MAX)) Bad("sm_scale must be finite in float32");
        NeedDtype("cu_seqlens_q", a.cuSeqlensQ, at::kInt);
        if (a.cuSeqlensQ.dim() != 1 || a.cuSeqlensQ.size(0) < 2) Bad("cu_seqlens_q must be int32 [B+1]");
        const int64_t B = a.cuSeqlensQ.size(0) - 1;
        int64_t maxPages = 0;
        if (paged) {
            if (a.cuSeqlensK) Bad("a paged kv takes block_table and seqlens_k, not cu_seqlens_k");
            if (!a.blockTable || !a.seqlensK) Bad("a paged kv needs block_table and seqlens_k");
            NeedDtype("block_table", *a.blockTable, at::kInt);
            NeedDtype("seqlens_k", *a.seqlensK, at::kInt);
            if (a.blockTable->dim() != 2 || a.blockTable->size(0) != B) Bad("block_table must be int32 [B, max_pages]");
            NeedShape("seqlens_k", *a.seqlensK, {B});
            maxPages = a.blockTable->size(1);
        } else {
            if (a.blockTable || a.seqlensK) Bad("block_table / seqlens_k are for a paged kv");
            if (!a.cuSeqlensK) Bad("cu_seqlens_k is required (the Python side passes [0, S] by default)");
            NeedDtype("cu_seqlens_k", *a.cuSeqlensK, at::kInt);
            NeedShape("cu_seqlens_k", *a.cuSeqlensK, {B + 1});
        }
        if (a.attnSink) {
            NeedDtype("attn_sink", *a.attnSink, at::kFloat);
            NeedShape("attn_sink", *a.attnSink, {H});
        }
        NeedDtype("out", a.out, dt);
        NeedShape("out", a.out, {T, H, Dv});
        NeedDtype("lse", a.lse, at::kFloat);
        NeedShape("lse", a.lse, {T, H});
        // the tiling struct's 32-bit fields; every product of them (candidate slots, work items, offsets)
        // is formed in 64 bits by the host and the kernel
        const int64_t LIM = int64_t(1) << 31;
        if (T >= LIM) Bad("q: more than 2^31 - 1 tokens");
        if (kvRows >= LIM) Bad("kv: more than 2^31 - 1 cache rows");
        if (K >= LIM) Bad("indices: K beyond 2^31 - 1");
        if (maxPages >= LIM || B >= LIM) Bad("block_table / cu_seqlens_q: more than 2^31 - 1 entries");
        if (H >= LIM || Dqk >= LIM || Dr >= LIM || Dv >= LIM) Bad("q/kv/v: a head count or width beyond 2^31 - 1");

        ProblemShape sh;
        sh.T = T, sh.H = H, sh.Hkv = Hkv, sh.Dqk = Dqk, sh.Dr = Dr, sh.Dv = Dv, sh.K = K;
        sh.indexHeads = a.indices.size(1);
        sh.blockSize = a.blockSize;
        sh.dtypeBytes = q.element_size();
        sh.isFloat32 = dt == at::kFloat;
        sh.isBf16 = dt == at::kBFloat16;
        sh.separateV = a.v.has_value();
        sh.kvInt8 = kvInt8;
        sh.vInt8 = vInt8;
        sh.scaleBlock = static_cast<uint32_t>(a.scaleBlock);
        sh.paged = paged;
        sh.pageSize = pageSize;
        sh.maxPages = maxPages;
        sh.numSeqs = B;
        sh.kvRows = kvRows;
        sh.maxSeqLen = paged ? uint64_t(maxPages) * uint64_t(pageSize) : uint64_t(kvRows);
        sh.causal = a.causal;
        sh.hasSink = a.attnSink.has_value();
        sh.smScale = static_cast<float>(a.smScale);
        return sh;
    }

private:
    std::string who_;
    std::function<void(const char*, const at::Tensor&)> place_;
};

}  // namespace selattn

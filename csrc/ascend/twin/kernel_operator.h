// CPU twin of the AscendC subset that csrc/ascend/kernel/ uses. Written from scratch for this project
// from the public AscendC documentation and the signatures in Huawei's open headers (asc-devkit);
// nothing here is copied from them.
//
// Why it exists: CANN's own CPU-debug mode needs the closed CANN toolkit. This header lets the very
// same kernel source compile with the host C++ compiler and run on CPU tensors, so the kernel's logic
// (gather, Nz layouts, Mmad, online softmax, masking) is tested on every machine.
//
// Rules this file keeps:
// - Only what the kernel uses. Every function notes the real AscendC signature it mirrors; the
//   conformance check (shared/ascendc-check) compiles the kernel against Huawei's real headers, so the
//   kernel cannot use anything here that the real API lacks.
// - It lives in its own folder, reached only by -I in the twin build: a twin header beside the kernel
//   would shadow Huawei's in the conformance check.
// - Every TPipe buffer is charged to its on-chip memory (UB, L1, L0A, L0B, L0C) and checked against
//   the capacities of the launch's SoC (twin::Group::soc, one per launch: two launches for different
//   SoCs may run at once in two threads); an overflow throws twin::CapacityError, so a tiling that
//   would not fit on the chip fails here too.
// - Fresh buffers are filled with 0xFF bytes (NaN as float/half): the chip does not zero memory, so a
//   kernel that reads what it never wrote must fail here rather than pass by luck.
// - Cube layouts are modelled as we read Huawei's documentation and samples (not verified on a chip):
//   L1 "Nz" (from DataCopy with Nd2NzParams), L0A "Zz", L0B "Zn", L0C "Nz" float fractals of 16x16; an
//   operand fractal holds 16 rows of C0 = 32 B.
// - Cores: each block of a launch runs as one thread per core, one AIC and `ratio` AIVs (1:2 on A2/A3),
//   concurrently, sharing only global memory; CrossCoreSetFlag/WaitFlag (mode 2) block and wake them as
//   on the chip, so a missing handshake shows up as a race or as a wait that times out (a hang on the
//   chip). Intra-core pipes are not modelled (each core runs its instructions in order); SetFlag/
//   WaitFlag pairs are counted and a wait on an event never set throws.
#pragma once

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __aicore__
#define __global__
#define __gm__
#define __cube__
#define __vector__
using GM_ADDR = uint8_t*;

// ---------------------------------------------------------------- scalar types
// half / bfloat16_t: 16-bit storage, float arithmetic, round-to-nearest-even like torch and the chip.
namespace twin_detail {
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t FloatToHalfBits(float f) {
    uint32_t x = f2u(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7FFFFFFFu;
    if (absx >= 0x7F800000u) return sign | (absx > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN / inf
    if (absx >= 0x477FF000u) return sign | 0x7C00u;                                    // overflow -> inf
    if (absx < 0x38800000u) {                                                          // subnormal half
        float a = u2f(absx);
        // a * 2^24 rounded to nearest even gives the subnormal mantissa
        float scaled = a * 16777216.0f;
        uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
        return sign | m;
    }
    uint32_t mant = absx & 0x7FFFFFu;
    uint32_t exp = (absx >> 23) - 127 + 15;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // carries into the exponent correctly
    return sign | h;
}
inline float HalfBitsToFloat(uint16_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0) {
        float v = std::ldexp(static_cast<float>(mant), -24);
        return sign ? -v : v;
    }
    if (exp == 31) return u2f(sign | 0x7F800000u | (mant << 13));
    return u2f(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}
inline uint16_t FloatToBf16Bits(float f) {
    uint32_t x = f2u(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
    x += 0x7FFFu + ((x >> 16) & 1u);
    return static_cast<uint16_t>(x >> 16);
}
inline float Bf16BitsToFloat(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
}  // namespace twin_detail

struct half {
    uint16_t bits = 0;
    half() = default;
    half(float f) : bits(twin_detail::FloatToHalfBits(f)) {}
    operator float() const { return twin_detail::HalfBitsToFloat(bits); }
};
struct bfloat16_t {
    uint16_t bits = 0;
    bfloat16_t() = default;
    bfloat16_t(float f) : bits(twin_detail::FloatToBf16Bits(f)) {}
    operator float() const { return twin_detail::Bf16BitsToFloat(bits); }
};
static_assert(sizeof(half) == 2 && sizeof(bfloat16_t) == 2, "16-bit storage");

enum pipe_t { PIPE_S = 0, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_ALL, PIPE_FIX = 10 };
enum event_t { EVENT_ID0 = 0, EVENT_ID1, EVENT_ID2, EVENT_ID3 };

namespace AscendC {

// ---------------------------------------------------------------- twin control (not AscendC API)
namespace twin {
struct CapacityError : std::runtime_error { using std::runtime_error::runtime_error; };
struct MisuseError : std::runtime_error { using std::runtime_error::runtime_error; };

enum Mem { UB = 0, L1 = 1, L0A = 2, L0B = 3, L0C = 4, NUM_MEM = 5 };
inline const char* MemName(int m) {
    static const char* n[] = {"UB", "L1", "L0A", "L0B", "L0C"};
    return n[m];
}
struct SocLimits {
    std::string name = "unset";
    uint64_t bytes[NUM_MEM] = {0, 0, 0, 0, 0};
};
// One block of a mix launch: one cube core (AIC) and `ratio` vector cores (AIV), each a thread of its
// own, sharing only global memory and the cross-core flags below (as on the chip).
struct Group {
    SocLimits soc;  // the SoC this launch runs as: per launch, never process-global
    std::mutex mu;
    std::condition_variable cv;
    int ratio = 2;
    int32_t aivToAic[16][2] = {{0}};  // sets by each AIV, consumed by the AIC's wait
    int32_t aicToAiv[16][2] = {{0}};  // sets by the AIC, one per AIV, each consumed by that AIV's wait
    bool abort = false;               // a core failed: every waiter gives up instead of hanging
};
// per-thread (per simulated core) state
struct State {
    int coreType = 0;  // AscendC::AIC / AIV (values of CoreType below)
    int64_t blockIdx = 0, blockNum = 1, subBlockIdx = 0;
    Group* group = nullptr;
    uint64_t peak[NUM_MEM] = {0, 0, 0, 0, 0};  // largest TPipe total this core allocated
    int32_t events[64][4] = {{0}};
};
inline State& S() {
    static thread_local State s;
    return s;
}
// the SoC of the launch this core belongs to
inline const SocLimits& Soc() {
    if (S().group == nullptr) throw MisuseError("AscendC twin: kernel code outside a launch (no core group)");
    return S().group->soc;
}
// called at the start of each core thread
inline void EnterCore(int coreType, int64_t blockIdx, int64_t blockNum, int64_t subBlockIdx, Group* g) {
    State& st = S();
    st = State();
    st.coreType = coreType;
    st.blockIdx = blockIdx;
    st.blockNum = blockNum;
    st.subBlockIdx = subBlockIdx;
    st.group = g;
}
inline void Fail(const std::string& msg) { throw MisuseError("AscendC twin: " + msg); }
// wait on the group's condition; a core that failed, or ATTENTION_TWIN_HANG_S seconds (default 20)
// without the matching set (a hang on the chip), ends it
inline int HangSeconds() {
    static const int s = [] {
        const char* e = std::getenv("ATTENTION_TWIN_HANG_S");
        int v = e ? std::atoi(e) : 0;
        return v > 0 ? v : 20;
    }();
    return s;
}
template <typename Pred>
inline void GroupWait(std::unique_lock<std::mutex>& lk, Group& g, Pred ready, const std::string& what) {
    if (!g.cv.wait_for(lk, std::chrono::seconds(HangSeconds()), [&] { return g.abort || ready(); }))
        Fail(what + ": no matching CrossCoreSetFlag within " + std::to_string(HangSeconds()) +
             " s (the chip would hang)");
    if (g.abort && !ready()) Fail(what + ": abandoned because another core of the block failed");
}
inline void Abort(Group& g) {
    std::lock_guard<std::mutex> lk(g.mu);
    g.abort = true;
    g.cv.notify_all();
}
// A launch must end with every handshake consumed: an unmatched set means the cores disagree.
inline void CheckQuiescent(const Group& g) {
    for (int i = 0; i < 16; ++i)
        for (int s = 0; s < g.ratio; ++s)
            if (g.aivToAic[i][s] != 0 || g.aicToAiv[i][s] != 0)
                Fail("cross-core flag " + std::to_string(i) + " left set at kernel end");
}
}  // namespace twin

// ---------------------------------------------------------------- positions, enums
// mirrors AscendC::TPosition (impl/basic_api/common_types.h)
enum class TPosition : uint8_t { GM, A1, A2, B1, B2, C1, C2, CO1, CO2, VECIN, VECOUT, VECCALC };
using QuePosition = TPosition;
inline int MemOf(TPosition p) {
    switch (p) {
        case TPosition::VECIN: case TPosition::VECOUT: case TPosition::VECCALC: return twin::UB;
        case TPosition::A1: case TPosition::B1: case TPosition::C1: return twin::L1;
        case TPosition::A2: return twin::L0A;
        case TPosition::B2: return twin::L0B;
        case TPosition::CO1: return twin::L0C;
        default: twin::Fail("position without on-chip memory"); return -1;
    }
}
// mirrors AscendC::RoundMode (subset)
enum class RoundMode : uint8_t { CAST_NONE = 0, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC };
// mirrors AscendC::HardEvent (subset the kernel uses)
enum class HardEvent : uint8_t { MTE2_V, V_MTE2, MTE3_V, V_MTE3, V_S, S_V, S_MTE3, MTE2_MTE3 };
enum CoreType : int32_t { MIX = 0, AIC = 1, AIV = 2 };

template <typename A, typename B> struct IsSameType { static constexpr bool value = false; };
template <typename A> struct IsSameType<A, A> { static constexpr bool value = true; };

// ---------------------------------------------------------------- tensors
// mirrors AscendC::GlobalTensor<T>: SetGlobalBuffer(__gm__ T* buffer, uint64_t bufferSize),
// GetValue(uint64_t offset), operator[](uint64_t offset), GetPhyAddr() (the twin's own copies use it)
template <typename T>
class GlobalTensor {
public:
    __aicore__ inline void SetGlobalBuffer(__gm__ T* buffer, uint64_t bufferSize) {
        addr_ = buffer;
        size_ = bufferSize;
    }
    __aicore__ inline T GetValue(uint64_t offset) const {
        Check(offset, 1);
        return addr_[offset];
    }
    __aicore__ inline GlobalTensor operator[](uint64_t offset) const {
        Check(offset, 0);
        GlobalTensor r;
        r.addr_ = addr_ + offset;
        r.size_ = size_ == UINT64_MAX ? UINT64_MAX : size_ - offset;
        return r;
    }
    __aicore__ inline __gm__ T* GetPhyAddr() const { return addr_; }
    // twin only: bounds of a GM access (the chip would read or write whatever lies there)
    void Check(uint64_t off, uint64_t n) const {
        if (addr_ == nullptr) twin::Fail("GlobalTensor used before SetGlobalBuffer");
        if (size_ != UINT64_MAX && off + n > size_)
            twin::Fail("GM access [" + std::to_string(off) + ", +" + std::to_string(n) + ") outside a buffer of " +
                       std::to_string(size_) + " elements");
    }
    uint64_t Size() const { return size_; }

private:
    T* addr_ = nullptr;
    uint64_t size_ = 0;
};

// mirrors AscendC::LocalTensor<T>: operator[](uint32_t offset), GetValue(uint32_t), SetValue(uint32_t, T),
// ReinterpretCast<U>()
template <typename T>
class LocalTensor {
public:
    LocalTensor() = default;
    LocalTensor(T* p, uint32_t n, TPosition pos) : ptr_(p), size_(n), pos_(pos) {}
    __aicore__ inline LocalTensor operator[](uint32_t offset) const {
        Check(offset, 0);
        return LocalTensor(ptr_ + offset, size_ - offset, pos_);
    }
    __aicore__ inline T GetValue(uint32_t i) const {
        Check(i, 1);
        return ptr_[i];
    }
    template <typename U>
    __aicore__ inline void SetValue(uint32_t i, U v) const {
        Check(i, 1);
        ptr_[i] = static_cast<T>(v);
    }
    template <typename U>
    __aicore__ inline LocalTensor<U> ReinterpretCast() const {
        return LocalTensor<U>(reinterpret_cast<U*>(ptr_), static_cast<uint32_t>(uint64_t(size_) * sizeof(T) / sizeof(U)),
                              pos_);
    }
    // twin only
    T* Ptr() const { return ptr_; }
    TPosition Pos() const { return pos_; }
    void Check(uint64_t off, uint64_t n) const {
        if (ptr_ == nullptr) twin::Fail("LocalTensor used before allocation");
        if (off + n > size_)
            twin::Fail("local access [" + std::to_string(off) + ", +" + std::to_string(n) + ") outside a " +
                       twin::MemName(MemOf(pos_)) + " tensor of " + std::to_string(size_) + " elements");
    }

private:
    T* ptr_ = nullptr;
    uint32_t size_ = 0;
    TPosition pos_ = TPosition::VECCALC;
};

// ---------------------------------------------------------------- TPipe / TQue / TBuf
// mirrors AscendC::TQue<TPosition pos, int32_t depth>: AllocTensor<T>(), EnQue(tensor), DeQue<T>(), FreeTensor(tensor)
template <TPosition pos, int32_t depth>
class TQue {
public:
    template <typename T>
    __aicore__ inline LocalTensor<T> AllocTensor() {
        if (bufs_.empty()) twin::Fail("TQue::AllocTensor before TPipe::InitBuffer");
        for (size_t i = 0; i < bufs_.size(); ++i) {
            size_t k = (next_ + i) % bufs_.size();
            if (!busy_[k]) {
                busy_[k] = true;
                next_ = (k + 1) % bufs_.size();
                return LocalTensor<T>(reinterpret_cast<T*>(bufs_[k]), len_ / sizeof(T), pos);
            }
        }
        twin::Fail("TQue::AllocTensor with all " + std::to_string(bufs_.size()) + " buffers in use (missing FreeTensor)");
        return {};
    }
    template <typename T>
    __aicore__ inline bool EnQue(const LocalTensor<T>& t) {
        if (queued_ >= depth) twin::Fail("TQue::EnQue beyond the queue depth");
        ++queued_;
        (void)t;
        return true;
    }
    template <typename T>
    __aicore__ inline LocalTensor<T> DeQue() {
        if (queued_ <= 0) twin::Fail("TQue::DeQue on an empty queue (would hang)");
        --queued_;
        // the twin runs in order: the tensor dequeued is the one most recently allocated and enqueued
        size_t k = (next_ + bufs_.size() - 1) % bufs_.size();
        return LocalTensor<T>(reinterpret_cast<T*>(bufs_[k]), len_ / sizeof(T), pos);
    }
    template <typename T>
    __aicore__ inline void FreeTensor(const LocalTensor<T>& t) {
        for (size_t k = 0; k < bufs_.size(); ++k)
            if (reinterpret_cast<uint8_t*>(t.Ptr()) == bufs_[k]) {
                if (!busy_[k]) twin::Fail("TQue::FreeTensor of a buffer that is not allocated");
                busy_[k] = false;
                return;
            }
        twin::Fail("TQue::FreeTensor of a tensor this queue did not allocate");
    }
    std::vector<uint8_t*> bufs_;
    std::vector<bool> busy_;
    uint32_t len_ = 0;
    size_t next_ = 0;
    int32_t queued_ = 0;
};

// mirrors AscendC::TBuf<TPosition pos>: Get<T>()
template <TPosition pos = TPosition::VECCALC>
class TBuf {
public:
    template <typename T>
    __aicore__ inline LocalTensor<T> Get() {
        if (buf_ == nullptr) twin::Fail("TBuf::Get before TPipe::InitBuffer");
        return LocalTensor<T>(reinterpret_cast<T*>(buf_), len_ / sizeof(T), pos);
    }
    uint8_t* buf_ = nullptr;
    uint32_t len_ = 0;
};

// mirrors AscendC::TPipe: InitBuffer(TQue& que, uint8_t num, uint32_t len), InitBuffer(TBuf& buf, uint32_t bufLen)
class TPipe {
public:
    template <TPosition pos, int32_t depth>
    __aicore__ inline bool InitBuffer(TQue<pos, depth>& que, uint8_t num, uint32_t len) {
        if (num < 1) twin::Fail("TPipe::InitBuffer with num = 0");
        uint32_t aligned = Align(len);
        Charge(pos, uint64_t(num) * aligned, len, num);
        que.len_ = aligned;
        que.bufs_.clear();
        que.busy_.assign(num, false);
        for (uint8_t i = 0; i < num; ++i) que.bufs_.push_back(NewBlock(aligned));
        return true;
    }
    template <TPosition pos>
    __aicore__ inline bool InitBuffer(TBuf<pos>& buf, uint32_t len) {
        uint32_t aligned = Align(len);
        Charge(pos, aligned, len, 1);
        buf.len_ = aligned;
        buf.buf_ = NewBlock(aligned);
        return true;
    }
    uint64_t Used(int mem) const { return used_[mem]; }

private:
    static uint32_t Align(uint32_t len) { return (len + 31u) / 32u * 32u; }  // on-chip buffers are 32 B aligned
    void Charge(TPosition pos, uint64_t bytes, uint32_t len, int num) {
        if (len == 0) twin::Fail("TPipe::InitBuffer with length 0");
        int mem = MemOf(pos);
        used_[mem] += bytes;
        uint64_t cap = twin::Soc().bytes[mem];
        if (used_[mem] > cap)
            throw twin::CapacityError(std::string("AscendC twin: ") + twin::MemName(mem) + " overflow on " +
                                      twin::Soc().name + ": buffers need " + std::to_string(used_[mem]) +
                                      " bytes, the SoC has " + std::to_string(cap) + " (last InitBuffer: " +
                                      std::to_string(num) + " x " + std::to_string(len) + " bytes)");
        if (used_[mem] > twin::S().peak[mem]) twin::S().peak[mem] = used_[mem];
    }
    uint8_t* NewBlock(uint32_t bytes) {
        blocks_.emplace_back(new uint8_t[bytes]);
        std::memset(blocks_.back().get(), 0xFF, bytes);
        return blocks_.back().get();
    }
    uint64_t used_[twin::NUM_MEM] = {0, 0, 0, 0, 0};
    std::vector<std::unique_ptr<uint8_t[]>> blocks_;
};

// ---------------------------------------------------------------- system
// mirrors GetBlockIdx(), GetBlockNum(), GetSubBlockIdx(), GetSubBlockNum(), GetTaskRatio() for a mix
// launch: GetBlockNum() counts blocks (AIC cores); on an AIV, GetBlockIdx() numbers vector cores
// (block * ratio + sub-block), so a kernel finds its block as GetBlockIdx() / GetTaskRatio().
__aicore__ inline int64_t GetTaskRatio() {
    return twin::S().coreType == 2 ? twin::S().group->ratio : 1;
}
__aicore__ inline int64_t GetBlockIdx() {
    return twin::S().blockIdx * GetTaskRatio() + twin::S().subBlockIdx;
}
__aicore__ inline int64_t GetBlockNum() { return twin::S().blockNum; }
__aicore__ inline int64_t GetSubBlockIdx() { return twin::S().subBlockIdx; }
__aicore__ inline int64_t GetSubBlockNum() { return GetTaskRatio(); }

// mirrors template <HardEvent evt> SetFlag(int32_t eventID) / WaitFlag(int32_t eventID)
template <HardEvent evt>
__aicore__ inline void SetFlag(int32_t id) {
    twin::S().events[static_cast<int>(evt)][id & 3]++;
}
template <HardEvent evt>
__aicore__ inline void WaitFlag(int32_t id) {
    int32_t& c = twin::S().events[static_cast<int>(evt)][id & 3];
    if (c <= 0) twin::Fail("WaitFlag on an event that was never set (would hang)");
    --c;
}
// mirrors template <uint8_t modeId, pipe_t pipe> CrossCoreSetFlag(uint16_t flagId) and
// template <uint8_t modeId = 0, pipe_t pipe = PIPE_S> CrossCoreWaitFlag(uint16_t flagId), mode 2
// (a cube core with its vector cores): an AIV's set counts for its AIC; the AIC's wait needs a set from
// every AIV of the block; the AIC's set reaches every AIV, and each AIV's wait consumes its own.
template <uint8_t modeId, pipe_t pipe>
__aicore__ inline void CrossCoreSetFlag(uint16_t flagId) {
    static_assert(modeId == 2, "twin: only mode 2 (AIC <-> its AIVs) is modelled");
    twin::Group& g = *twin::S().group;
    std::lock_guard<std::mutex> lk(g.mu);
    if (twin::S().coreType == 2) {
        g.aivToAic[flagId & 15][twin::S().subBlockIdx]++;
    } else {
        for (int sb = 0; sb < g.ratio; ++sb) g.aicToAiv[flagId & 15][sb]++;
    }
    g.cv.notify_all();
}
template <uint8_t modeId = 0, pipe_t pipe = PIPE_S>
__aicore__ inline void CrossCoreWaitFlag(uint16_t flagId) {
    twin::Group& g = *twin::S().group;
    std::unique_lock<std::mutex> lk(g.mu);
    const int f = flagId & 15;
    const std::string what = "CrossCoreWaitFlag(" + std::to_string(flagId) + ")";
    if (twin::S().coreType == 2) {
        const int sb = static_cast<int>(twin::S().subBlockIdx);
        twin::GroupWait(lk, g, [&] { return g.aicToAiv[f][sb] > 0; }, what + " on AIV");
        g.aicToAiv[f][sb]--;
    } else {
        twin::GroupWait(lk, g, [&] {
            for (int sb = 0; sb < g.ratio; ++sb)
                if (g.aivToAic[f][sb] <= 0) return false;
            return true;
        }, what + " on AIC");
        for (int sb = 0; sb < g.ratio; ++sb) g.aivToAic[f][sb]--;
    }
}

// ---------------------------------------------------------------- data movement structs
// mirrors AscendC::DataCopyExtParams (A2/A3 layout)
struct DataCopyExtParams {
    DataCopyExtParams() {}
    DataCopyExtParams(uint16_t count, uint32_t len, uint32_t srcStrideIn, uint32_t dstStrideIn, uint32_t rsvIn)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn), rsv(rsvIn) {}
    uint16_t blockCount = 1;
    uint32_t blockLen = 0;
    uint32_t srcStride = 0;
    uint32_t dstStride = 0;
    uint32_t rsv = 0;
};
// mirrors AscendC::DataCopyPadExtParams<T> (A2/A3 layout)
template <typename T>
struct DataCopyPadExtParams {
    DataCopyPadExtParams() {}
    DataCopyPadExtParams(bool isPadValue, uint8_t leftPadValue, uint8_t rightPadValue, T padValue)
        : isPad(isPadValue), leftPadding(leftPadValue), rightPadding(rightPadValue), paddingValue(padValue) {}
    bool isPad = false;
    uint8_t leftPadding = 0;
    uint8_t rightPadding = 0;
    T paddingValue = 0;
};
// mirrors AscendC::Nd2NzParams (A2/A3 layout: uint16 fields)
struct Nd2NzParams {
    Nd2NzParams() {}
    uint16_t ndNum = 0;
    uint16_t nValue = 0;
    uint16_t dValue = 0;
    uint16_t srcNdMatrixStride = 0;
    uint16_t srcDValue = 0;
    uint16_t dstNzC0Stride = 0;
    uint16_t dstNzNStride = 0;
    uint16_t dstNzMatrixStride = 0;
};
// mirrors AscendC::LoadData2DParams
struct LoadData2DParams {
    LoadData2DParams() {}
    LoadData2DParams(uint16_t startIndexIn, uint8_t repeatTimesIn, uint16_t srcStrideIn, uint8_t sidIn,
                     uint16_t dstGapIn, bool ifTransposeIn, uint8_t addrModeIn)
        : startIndex(startIndexIn), dstGap(dstGapIn), srcStride(srcStrideIn), ifTranspose(ifTransposeIn),
          repeatTimes(repeatTimesIn), sid(sidIn), addrMode(addrModeIn) {}
    uint16_t startIndex = 0;
    uint16_t dstGap = 0;
    uint16_t srcStride = 0;
    bool ifTranspose = false;
    uint8_t repeatTimes = 0;
    uint8_t sid = 0;
    uint8_t addrMode = 0;
};
// mirrors AscendC::MmadParams (fields the kernel sets)
struct MmadParams {
    MmadParams() {}
    MmadParams(uint16_t mIn, uint16_t nIn, uint16_t kIn, uint8_t unitFlagIn, bool cmatrixSourceIn, bool cmatrixInitValIn)
        : m(mIn), n(nIn), k(kIn), unitFlag(unitFlagIn), cmatrixSource(cmatrixSourceIn), cmatrixInitVal(cmatrixInitValIn) {}
    uint16_t m = 0, n = 0, k = 0;
    bool isBias = false;
    uint8_t unitFlag = 0;
    bool cmatrixSource = false;
    bool cmatrixInitVal = true;
};
// mirrors AscendC::FixpipeParamsV220 (fields without quantisation)
struct FixpipeParamsV220 {
    FixpipeParamsV220() {}
    FixpipeParamsV220(uint16_t nSizeIn, uint16_t mSizeIn, uint16_t srcStrideIn, uint32_t dstStrideIn, bool reluEnIn)
        : nSize(nSizeIn), mSize(mSizeIn), srcStride(srcStrideIn), dstStride(dstStrideIn), reluEn(reluEnIn) {}
    uint16_t nSize = 0, mSize = 0, srcStride = 0;
    uint32_t dstStride = 0;
    uint16_t ndNum = 1;
    bool reluEn = false;
};
// mirrors AscendC::FixpipeConfig and CFG_ROW_MAJOR (the NZ -> ND output path)
struct FixpipeConfig { bool isToRowMajor; };
constexpr FixpipeConfig CFG_ROW_MAJOR = {true};

namespace twin {
template <typename T> constexpr uint32_t C0() { return 32 / sizeof(T); }  // elements in one 32 B fractal row
inline void NeedPos(bool ok, const char* api) {
    if (!ok) Fail(std::string(api) + " used on a tensor in the wrong position");
}
}  // namespace twin

// ---------------------------------------------------------------- data movement
// mirrors template <typename T> DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src,
//     const DataCopyExtParams& dataCopyParams, const DataCopyPadExtParams<T>& padParams)   (GM -> UB)
// GM blocks are blockLen bytes, srcStride bytes apart (tail to head); UB blocks start on 32 B
// boundaries, dstStride 32-B blocks apart. Bytes between blockLen and the 32 B boundary are padding:
// rightPadding elements of paddingValue when isPad, otherwise left as they were.
template <typename T>
__aicore__ inline void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src,
                                   const DataCopyExtParams& p, const DataCopyPadExtParams<T>& pad) {
    twin::NeedPos(MemOf(dst.Pos()) == twin::UB, "DataCopyPad(GM->UB)");
    if (p.blockLen % sizeof(T) != 0) twin::Fail("DataCopyPad blockLen is not a whole number of elements");
    uint32_t n = p.blockLen / sizeof(T);
    uint32_t ubBlock = (p.blockLen + 31) / 32 * 32 + p.dstStride * 32;
    if (pad.isPad && (n + pad.rightPadding) * sizeof(T) > (p.blockLen + 31) / 32 * 32)
        twin::Fail("DataCopyPad rightPadding goes past the 32 B boundary");
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        uint64_t so = uint64_t(b) * (p.blockLen + p.srcStride) / sizeof(T);
        uint64_t d0 = uint64_t(b) * ubBlock / sizeof(T);
        src.Check(so, n);
        dst.Check(d0, n + (pad.isPad ? pad.rightPadding : 0));
        std::memcpy(dst.Ptr() + d0, src.GetPhyAddr() + so, p.blockLen);
        if (pad.isPad)
            for (uint32_t i = 0; i < pad.rightPadding; ++i) dst.Ptr()[d0 + n + i] = pad.paddingValue;
    }
}
// mirrors template <typename T> DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src,
//     const DataCopyExtParams& dataCopyParams)   (UB -> GM; srcStride in 32-B blocks, dstStride in bytes)
template <typename T>
__aicore__ inline void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
    twin::NeedPos(MemOf(src.Pos()) == twin::UB, "DataCopyPad(UB->GM)");
    if (p.blockLen % sizeof(T) != 0) twin::Fail("DataCopyPad blockLen is not a whole number of elements");
    uint32_t n = p.blockLen / sizeof(T);
    uint32_t ubBlock = (p.blockLen + 31) / 32 * 32 + p.srcStride * 32;
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        uint64_t s0 = uint64_t(b) * ubBlock / sizeof(T);
        uint64_t d0 = uint64_t(b) * (p.blockLen + p.dstStride) / sizeof(T);
        src.Check(s0, n);
        dst.Check(d0, n);
        std::memcpy(dst.GetPhyAddr() + d0, src.Ptr() + s0, p.blockLen);
    }
}
// mirrors template <typename T> DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src,
//     const Nd2NzParams& intriParams)   (GM ND -> L1 Nz)
// Row r, column c of ND matrix i lands at: i*dstNzMatrixStride + (c / C0)*dstNzC0Stride*C0
//     + r*dstNzNStride*C0 + c % C0   (strides in 32-B units = C0 elements).
template <typename T>
__aicore__ inline void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const Nd2NzParams& p) {
    twin::NeedPos(MemOf(dst.Pos()) == twin::L1, "DataCopy(Nd2Nz)");
    constexpr uint32_t C0 = twin::C0<T>();
    for (uint32_t i = 0; i < p.ndNum; ++i)
        for (uint32_t r = 0; r < p.nValue; ++r) {
            uint64_t so = uint64_t(i) * p.srcNdMatrixStride + uint64_t(r) * p.srcDValue;
            src.Check(so, p.dValue);
            for (uint32_t c = 0; c < p.dValue; ++c) {
                uint64_t d = uint64_t(i) * p.dstNzMatrixStride + uint64_t(c / C0) * p.dstNzC0Stride * C0 +
                             uint64_t(r) * p.dstNzNStride * C0 + c % C0;
                dst.Check(d, 1);
                dst.Ptr()[d] = src.GetPhyAddr()[so + c];
            }
        }
}
// mirrors template <typename T> LoadData(const LocalTensor<T>& dst, const LocalTensor<T>& src,
//     const LoadData2DParams& loadDataParams)   (L1 -> L0A / L0B, whole fractals)
// repeatTimes fractals (16 x C0 elements = 512 B each): fractal j is read at startIndex + j*srcStride
// and written at j*(1 + dstGap). Transposing loads are not modelled (the kernel does not use them).
template <typename T>
__aicore__ inline void LoadData(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LoadData2DParams& p) {
    twin::NeedPos(MemOf(src.Pos()) == twin::L1, "LoadData source");
    twin::NeedPos(MemOf(dst.Pos()) == twin::L0A || MemOf(dst.Pos()) == twin::L0B, "LoadData destination");
    if (p.ifTranspose) twin::Fail("LoadData with ifTranspose is outside the twin's subset");
    constexpr uint32_t FR = 512 / sizeof(T);
    for (uint32_t j = 0; j < p.repeatTimes; ++j) {
        uint64_t s = (uint64_t(p.startIndex) + uint64_t(j) * p.srcStride) * FR;
        uint64_t d = uint64_t(j) * (1 + p.dstGap) * FR;
        src.Check(s, FR);
        dst.Check(d, FR);
        std::memcpy(dst.Ptr() + d, src.Ptr() + s, 512);
    }
}
// mirrors template <typename T, typename U, typename S> Mmad(const LocalTensor<T>& dst,
//     const LocalTensor<U>& fm, const LocalTensor<S>& filter, const MmadParams& mmadParams)
// fm (L0A, "Zz"): fractal (mi, ki) at (mi*Kf + ki)*FR, element (m, k) at (m%16)*C0 + k%C0;
// filter (L0B, "Zn"): fractal (ki, ni) at (ki*Nf + ni)*FR, element (k, n) at (n%16)*C0 + k%C0;
// dst (L0C, "Nz", float): fractal (mi, ni) at (ni*Mf + mi)*256, element (m, n) at (m%16)*16 + n%16;
// Kf = ceil(k/C0), Nf = ceil(n/16), Mf = ceil(m/16). Products and sums in float (fp32 accumulation);
// cmatrixInitVal = true starts from 0, false adds to what L0C holds.
template <typename T, typename U, typename S>
__aicore__ inline void Mmad(const LocalTensor<T>& dst, const LocalTensor<U>& fm, const LocalTensor<S>& filter,
                            const MmadParams& p) {
    static_assert(IsSameType<T, float>::value, "twin Mmad: L0C is float");
    static_assert(IsSameType<U, S>::value, "twin Mmad: both operands of one dtype");
    twin::NeedPos(MemOf(fm.Pos()) == twin::L0A && MemOf(filter.Pos()) == twin::L0B &&
                  MemOf(dst.Pos()) == twin::L0C, "Mmad");
    constexpr uint32_t C0 = twin::C0<U>();
    constexpr uint32_t FR = 16 * C0;
    const uint32_t Mf = (p.m + 15) / 16, Nf = (p.n + 15) / 16, Kf = (p.k + C0 - 1) / C0;
    fm.Check(0, uint64_t(Mf) * Kf * FR);
    filter.Check(0, uint64_t(Kf) * Nf * FR);
    dst.Check(0, uint64_t(Mf) * Nf * 256);
    // unpack once into row-major float panels, then a plain triple loop (keeps the twin fast at -O2)
    std::vector<float> a(size_t(p.m) * p.k), b(size_t(p.n) * p.k);
    for (uint32_t m = 0; m < p.m; ++m)
        for (uint32_t k = 0; k < p.k; ++k)
            a[size_t(m) * p.k + k] = static_cast<float>(fm.Ptr()[((m / 16) * Kf + k / C0) * FR + (m % 16) * C0 + k % C0]);
    for (uint32_t n = 0; n < p.n; ++n)
        for (uint32_t k = 0; k < p.k; ++k)
            b[size_t(n) * p.k + k] = static_cast<float>(filter.Ptr()[((k / C0) * Nf + n / 16) * FR + (n % 16) * C0 + k % C0]);
    for (uint32_t m = 0; m < p.m; ++m)
        for (uint32_t n = 0; n < p.n; ++n) {
            const float* ar = &a[size_t(m) * p.k];
            const float* br = &b[size_t(n) * p.k];
            float s = 0.0f;
            for (uint32_t k = 0; k < p.k; ++k) s += ar[k] * br[k];
            float& c = dst.Ptr()[((n / 16) * Mf + m / 16) * 256 + (m % 16) * 16 + n % 16];
            c = p.cmatrixInitVal ? s : c + s;
        }
}
// mirrors template <typename T, typename U, const FixpipeConfig& config = CFG_ROW_MAJOR>
//     Fixpipe(const GlobalTensor<T>& dst, const LocalTensor<U>& src, const FixpipeParamsV220& intriParams)
// L0C Nz -> GM ND: element (m, n) of the Nz source (column blocks of 16, srcStride rows apart) goes to
// dst[m*dstStride + n] for m < mSize, n < nSize. No quantisation, no relu.
template <typename T, typename U, const FixpipeConfig& config = CFG_ROW_MAJOR>
__aicore__ inline void Fixpipe(const GlobalTensor<T>& dst, const LocalTensor<U>& src, const FixpipeParamsV220& p) {
    static_assert(IsSameType<T, float>::value && IsSameType<U, float>::value, "twin Fixpipe: float -> float only");
    static_assert(config.isToRowMajor, "twin Fixpipe: row-major output only");
    twin::NeedPos(MemOf(src.Pos()) == twin::L0C, "Fixpipe");
    if (p.reluEn) twin::Fail("Fixpipe relu is outside the twin's subset");
    if (p.srcStride % 16 != 0 || p.srcStride < p.mSize) twin::Fail("Fixpipe srcStride must be M rounded up to 16");
    for (uint32_t m = 0; m < p.mSize; ++m) {
        dst.Check(uint64_t(m) * p.dstStride, p.nSize);
        for (uint32_t n = 0; n < p.nSize; ++n) {
            uint64_t s = uint64_t(n / 16) * p.srcStride * 16 + uint64_t(m) * 16 + n % 16;
            src.Check(s, 1);
            dst.GetPhyAddr()[uint64_t(m) * p.dstStride + n] = src.Ptr()[s];
        }
    }
}

// ---------------------------------------------------------------- vector unit (count forms)
namespace twin {
template <typename T>
inline void NeedUb(const LocalTensor<T>& t, int32_t count, const char* api) {
    NeedPos(MemOf(t.Pos()) == UB, api);
    if (count < 0) Fail(std::string(api) + " with a negative count");
    t.Check(0, uint32_t(count));
}
}  // namespace twin
// mirrors Duplicate(const LocalTensor<T>& dst, const T& scalarValue, const int32_t& count)
template <typename T>
__aicore__ inline void Duplicate(const LocalTensor<T>& dst, const T& v, const int32_t& count) {
    twin::NeedUb(dst, count, "Duplicate");
    for (int32_t i = 0; i < count; ++i) dst.Ptr()[i] = v;
}
// mirrors Adds / Muls(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue, const int32_t& count)
template <typename T>
__aicore__ inline void Adds(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& v, const int32_t& count) {
    twin::NeedUb(dst, count, "Adds");
    twin::NeedUb(src, count, "Adds");
    for (int32_t i = 0; i < count; ++i) dst.Ptr()[i] = src.Ptr()[i] + v;
}
template <typename T>
__aicore__ inline void Muls(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& v, const int32_t& count) {
    twin::NeedUb(dst, count, "Muls");
    twin::NeedUb(src, count, "Muls");
    for (int32_t i = 0; i < count; ++i) dst.Ptr()[i] = src.Ptr()[i] * v;
}
// mirrors Add / Sub / Mul / Max(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1,
//     const int32_t& count)
#define TWIN_BINARY(NAME, EXPR)                                                                                   \
    template <typename T>                                                                                         \
    __aicore__ inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& s0, const LocalTensor<T>& s1,    \
                                const int32_t& count) {                                                           \
        twin::NeedUb(dst, count, #NAME);                                                                          \
        twin::NeedUb(s0, count, #NAME);                                                                           \
        twin::NeedUb(s1, count, #NAME);                                                                           \
        for (int32_t i = 0; i < count; ++i) {                                                                     \
            T a = s0.Ptr()[i], b = s1.Ptr()[i];                                                                   \
            dst.Ptr()[i] = (EXPR);                                                                                \
        }                                                                                                         \
    }
TWIN_BINARY(Add, a + b)
TWIN_BINARY(Sub, a - b)
TWIN_BINARY(Mul, a * b)
TWIN_BINARY(Max, (a > b ? a : b))
#undef TWIN_BINARY
// mirrors Exp / Ln(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& count)  (float only here)
template <typename T>
__aicore__ inline void Exp(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& count) {
    static_assert(IsSameType<T, float>::value, "twin Exp: float only");
    twin::NeedUb(dst, count, "Exp");
    twin::NeedUb(src, count, "Exp");
    for (int32_t i = 0; i < count; ++i) dst.Ptr()[i] = std::exp(src.Ptr()[i]);
}
template <typename T>
__aicore__ inline void Ln(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& count) {
    static_assert(IsSameType<T, float>::value, "twin Ln: float only");
    twin::NeedUb(dst, count, "Ln");
    twin::NeedUb(src, count, "Ln");
    for (int32_t i = 0; i < count; ++i) dst.Ptr()[i] = std::log(src.Ptr()[i]);
}
// mirrors ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& sharedTmpBuffer,
//     const int32_t count, bool calIndex = 0) and ReduceSum(dst, src, sharedTmpBuffer, const int32_t count):
// the result goes to dst[0]. The work buffer must hold at least one float per 8 source elements... the
// twin asks for count elements (generous; the real minimum depends on repeat counts).
template <typename T>
__aicore__ inline void ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work,
                                 const int32_t count, bool calIndex = 0) {
    static_assert(IsSameType<T, float>::value, "twin ReduceMax: float only");
    if (calIndex) twin::Fail("ReduceMax calIndex is outside the twin's subset");
    if (count < 1) twin::Fail("ReduceMax of zero elements");
    twin::NeedUb(src, count, "ReduceMax");
    twin::NeedUb(work, count, "ReduceMax work");
    twin::NeedUb(dst, 1, "ReduceMax");
    float m = src.Ptr()[0];
    for (int32_t i = 1; i < count; ++i) m = src.Ptr()[i] > m ? src.Ptr()[i] : m;
    dst.Ptr()[0] = m;
}
template <typename T>
__aicore__ inline void ReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work,
                                 const int32_t count) {
    static_assert(IsSameType<T, float>::value, "twin ReduceSum: float only");
    if (count < 1) twin::Fail("ReduceSum of zero elements");
    twin::NeedUb(src, count, "ReduceSum");
    twin::NeedUb(work, count, "ReduceSum work");
    twin::NeedUb(dst, 1, "ReduceSum");
    float s = 0.0f;
    for (int32_t i = 0; i < count; ++i) s += src.Ptr()[i];
    dst.Ptr()[0] = s;
}
// mirrors Cast(const LocalTensor<T>& dst, const LocalTensor<U>& src, const RoundMode& roundMode, const uint32_t count)
// Float -> half/bfloat16 rounds to nearest even (CAST_RINT); widening casts are exact (CAST_NONE).
template <typename T, typename U>
__aicore__ inline void Cast(const LocalTensor<T>& dst, const LocalTensor<U>& src, const RoundMode& mode,
                            const uint32_t count) {
    static_assert(!IsSameType<T, U>::value, "twin Cast: use a copy for equal types");
    constexpr bool narrowing = sizeof(T) < sizeof(U);
    if (narrowing && mode != RoundMode::CAST_RINT) twin::Fail("twin Cast: narrowing casts use CAST_RINT");
    if (!narrowing && mode != RoundMode::CAST_NONE) twin::Fail("twin Cast: widening casts use CAST_NONE");
    twin::NeedUb(dst, int32_t(count), "Cast");
    twin::NeedUb(src, int32_t(count), "Cast");
    for (uint32_t i = 0; i < count; ++i) dst.Ptr()[i] = static_cast<T>(static_cast<float>(src.Ptr()[i]));
}
// mirrors Gather(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<uint32_t>& srcOffset,
//     const uint32_t srcBaseOffset, const uint32_t count): dst[i] = element at byte offset
//     srcBaseOffset + srcOffset[i] from the start of src.
template <typename T>
__aicore__ inline void Gather(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<uint32_t>& off,
                              const uint32_t base, const uint32_t count) {
    twin::NeedUb(dst, int32_t(count), "Gather");
    twin::NeedUb(off, int32_t(count), "Gather offsets");
    for (uint32_t i = 0; i < count; ++i) {
        uint32_t byte = base + off.Ptr()[i];
        if (byte % sizeof(T) != 0) twin::Fail("Gather offset not aligned to the element size");
        src.Check(byte / sizeof(T), 1);
        dst.Ptr()[i] = src.Ptr()[byte / sizeof(T)];
    }
}

}  // namespace AscendC

// mirrors the ASCEND_IS_AIC / ASCEND_IS_AIV macros: true on the thread that plays that kind of core
#define ASCEND_IS_AIC (::AscendC::twin::S().coreType == ::AscendC::AIC)
#define ASCEND_IS_AIV (::AscendC::twin::S().coreType == ::AscendC::AIV)

// mirrors KERNEL_TASK_TYPE_DEFAULT(value) (a compile-time attribute on the chip; nothing to do on the CPU)
#define KERNEL_TASK_TYPE_DEFAULT(value)
#define KERNEL_TYPE_MIX_AIC_1_2 0

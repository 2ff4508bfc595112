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
//   conformance check (`make ascendc-check`) compiles the kernel against Huawei's real headers, so the
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
#include <algorithm>
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
// mirrors AscendC::HardEvent: a flag from the pipe before '_' to the pipe after it (the subset the kernel
// and the TQue implementation use)
enum class HardEvent : uint8_t {
    MTE2_V, V_MTE2, MTE3_V, V_MTE3, V_S, S_V, S_MTE3, MTE3_S, S_MTE2, MTE2_S, MTE2_MTE3, MTE3_MTE2,
    MTE2_MTE1, MTE1_MTE2, MTE1_M, M_MTE1, M_FIX, FIX_M, M_V, V_M, MAX
};
namespace twin {
struct CapacityError : std::runtime_error { using std::runtime_error::runtime_error; };
struct MisuseError : std::runtime_error { using std::runtime_error::runtime_error; };

enum Mem { UB = 0, L1 = 1, L0A = 2, L0B = 3, L0C = 4, NUM_MEM = 5, GM = 5 };
inline const char* MemName(int m) {
    static const char* n[] = {"UB", "L1", "L0A", "L0B", "L0C", "GM workspace"};
    return n[m];
}
struct SocLimits {
    std::string name = "unset";
    uint64_t bytes[NUM_MEM] = {0, 0, 0, 0, 0};
};

// ---- pipes: every instruction goes to one pipe of its core, as on the chip
enum Pipe { P_S = 0, P_V, P_M, P_MTE1, P_MTE2, P_MTE3, P_FIX, NUM_PIPES };
inline const char* PipeName(int p) {
    static const char* n[] = {"S", "V", "M", "MTE1", "MTE2", "MTE3", "FIX"};
    return n[p];
}
inline int PipeOf(pipe_t p) {
    switch (p) {
        case PIPE_S: return P_S;
        case PIPE_V: return P_V;
        case PIPE_M: return P_M;
        case PIPE_MTE1: return P_MTE1;
        case PIPE_MTE2: return P_MTE2;
        case PIPE_MTE3: return P_MTE3;
        case PIPE_FIX: return P_FIX;
        default: throw MisuseError("AscendC twin: no single pipe for this pipe_t");
    }
}
struct EventPipes { int src, dst; const char* name; };
inline EventPipes PipesOf(HardEvent e) {
    static const EventPipes t[] = {
        {P_MTE2, P_V, "MTE2_V"}, {P_V, P_MTE2, "V_MTE2"}, {P_MTE3, P_V, "MTE3_V"}, {P_V, P_MTE3, "V_MTE3"},
        {P_V, P_S, "V_S"}, {P_S, P_V, "S_V"}, {P_S, P_MTE3, "S_MTE3"}, {P_MTE3, P_S, "MTE3_S"},
        {P_S, P_MTE2, "S_MTE2"}, {P_MTE2, P_S, "MTE2_S"}, {P_MTE2, P_MTE3, "MTE2_MTE3"}, {P_MTE3, P_MTE2, "MTE3_MTE2"},
        {P_MTE2, P_MTE1, "MTE2_MTE1"}, {P_MTE1, P_MTE2, "MTE1_MTE2"}, {P_MTE1, P_M, "MTE1_M"}, {P_M, P_MTE1, "M_MTE1"},
        {P_M, P_FIX, "M_FIX"}, {P_FIX, P_M, "FIX_M"}, {P_M, P_V, "M_V"}, {P_V, P_M, "V_M"}};
    return t[static_cast<int>(e)];
}
constexpr int NUM_EVENTS = static_cast<int>(HardEvent::MAX);
// event ids per pipe pair: QUE_MAX_EVENT in asc-devkit impl/basic_api/kernel_macros.h (8 on A2/A3)
constexpr int MAX_EVENT_ID = 8;

// ---- happens-before: one vector clock per pipe of every core of a block (1 AIC + up to 2 AIVs).
// Unit u = core slot * NUM_PIPES + pipe (slot 0: the AIC, 1 + i: AIV i).
constexpr int MAX_SLOTS = 3;
constexpr int NUM_UNITS = MAX_SLOTS * NUM_PIPES;
struct VClock {
    uint32_t c[NUM_UNITS] = {};
    void Join(const VClock& o) {
        for (int i = 0; i < NUM_UNITS; ++i) c[i] = c[i] > o.c[i] ? c[i] : o.c[i];
    }
};
inline std::string UnitName(int u) {
    const int slot = u / NUM_PIPES;
    return std::string(PipeName(u % NUM_PIPES)) + (slot == 0 ? " of the AIC" : " of AIV" + std::to_string(slot - 1));
}

// ---- shadow memory: per 32-byte granule (the chip's data block), the last writer and, per unit, the last
// read, each with the instruction's name. An access conflicting with one on another unit that is not
// ordered before it by the happens-before edges is a race.
constexpr uint32_t GRANULE = 32;
struct Granule {
    uint32_t wClock = 0;
    uint16_t wName = 0;
    uint8_t wUnit = 0xFF;
    uint32_t rClock[NUM_UNITS] = {};
    uint16_t rName[NUM_UNITS] = {};
};
struct Region {
    const uint8_t* base = nullptr;
    uint64_t size = 0;
    int mem = UB;
    uint64_t chipAddr = 0;  // where TPipe would place it in the core's memory (alignment checks)
    std::vector<Granule> g;
};

// One block of a mix launch: one cube core (AIC) and `ratio` vector cores (AIV), each a thread of its
// own, sharing only global memory and the cross-core flags below (as on the chip).
struct CrossFlag {
    std::vector<VClock> pending;  // one entry per set not yet waited for: the counter and each set's clock
};
struct Group {
    SocLimits soc;  // the SoC this launch runs as: per launch, never process-global
    std::mutex mu;
    std::condition_variable cv;
    int ratio = 2;
    CrossFlag aivToAic[16][2];  // sets by each AIV, consumed by the AIC's wait
    CrossFlag aicToAiv[16][2];  // sets by the AIC, one per AIV, each consumed by that AIV's wait
    bool abort = false;         // a core failed: every waiter gives up instead of hanging
    Region workspace;           // the block's GM workspace, shared by its cores (guarded by mu)
    // bytes each core's MTE2 read from GM: the kernel's inputs (kv rows, q, ...) and the workspace hand-over
    uint64_t mte2InputBytes[MAX_SLOTS] = {}, mte2WorkspaceBytes[MAX_SLOTS] = {};
    // the part of mte2InputBytes read from the query tensors (q, q_rope): every core that computes a head
    // needs its q, so splitting a token's candidates over cores replicates q but should not replicate kv
    // rows; counting the two apart is what lets "each selected kv row is read once" be checked on the kv rows alone
    struct Span {
        const uint8_t* base = nullptr;
        uint64_t size = 0;
    };
    Span queryInputs[2];
    uint64_t mte2QueryBytes[MAX_SLOTS] = {};
};
// per-thread (per simulated core) state
struct EventSlot {
    bool set = false;
    VClock clock;
};
struct State {
    int coreType = 0;  // AscendC::AIC / AIV (values of CoreType below)
    int64_t blockIdx = 0, blockNum = 1, subBlockIdx = 0;
    int slot = 0;
    Group* group = nullptr;
    uint64_t peak[NUM_MEM] = {0, 0, 0, 0, 0};  // largest TPipe total this core allocated
    VClock pipeClock[NUM_PIPES];
    EventSlot events[NUM_EVENTS][MAX_EVENT_ID];
    uint8_t occupied[NUM_EVENTS] = {};  // TPipe's event pool: ids held by AllocEventID
    std::vector<Region*> regions;       // this core's TPipe buffers
    uint64_t chipTop[NUM_MEM] = {};     // next TPipe address per memory
    // the Mmad accumulate rule (Mmad.md): the last Mmad and whether PipeBarrier<PIPE_M> came after it
    const void* lastMmadDst = nullptr;
    bool lastMmadSmall = false, mBarrierSince = true;
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
    st.slot = coreType == 2 ? 1 + static_cast<int>(subBlockIdx) : 0;
    st.group = g;
}
[[noreturn]] inline void Fail(const std::string& msg) { throw MisuseError("AscendC twin: " + msg); }

inline std::vector<const char*>& NameTable() {
    static std::vector<const char*> names{"?"};
    return names;
}
inline std::mutex& NameMu() {
    static std::mutex mu;
    return mu;
}
inline uint16_t InternName(const char* name) {
    // API names are string literals: a per-thread cache by pointer keeps the lock off the hot path
    static thread_local std::vector<std::pair<const char*, uint16_t>> cache;
    for (const auto& [p, id] : cache)
        if (p == name) return id;
    std::lock_guard<std::mutex> lk(NameMu());
    auto& names = NameTable();
    size_t i = 0;
    while (i < names.size() && names[i] != name) ++i;
    if (i == names.size()) names.push_back(name);
    cache.emplace_back(name, static_cast<uint16_t>(i));
    return static_cast<uint16_t>(i);
}
inline const char* NameAt(uint16_t i) {
    std::lock_guard<std::mutex> lk(NameMu());
    return i < NameTable().size() ? NameTable()[i] : "?";
}

inline int Unit(int pipe) { return S().slot * NUM_PIPES + pipe; }
// issue one instruction to `pipe`: its clock advances (in-order execution within a pipe)
inline void Issue(int pipe) { ++S().pipeClock[pipe].c[Unit(pipe)]; }

inline Region* FindRegion(const void* p, Group* g) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    for (Region* r : S().regions)
        if (b >= r->base && b < r->base + r->size) return r;
    if (g != nullptr && g->workspace.size && b >= g->workspace.base && b < g->workspace.base + g->workspace.size)
        return &g->workspace;
    return nullptr;
}
[[noreturn]] inline void Race(const Region& r, uint64_t off, const char* what, int unit, uint16_t name, int otherUnit,
                              uint16_t otherName, const char* kind) {
    Fail("race on " + std::string(MemName(r.mem)) + " bytes [" + std::to_string(off / GRANULE * GRANULE) + ", " +
         std::to_string(off / GRANULE * GRANULE + GRANULE) + "): " + what + " (" + NameAt(name) + " on " +
         UnitName(unit) + ") " + kind + " " + NameAt(otherName) + " on " + UnitName(otherUnit) +
         " with no happens-before edge between them (missing SetFlag/WaitFlag, PipeBarrier, queue hand-over or "
         "cross-core flag)");
}
// record an access of `bytes` bytes at p by the instruction `api` just issued on `pipe`; memory the twin
// does not track (kernel inputs and outputs in GM) is ignored
inline void Access(int pipe, const void* p, uint64_t bytes, bool write, const char* api) {
    if (bytes == 0) return;
    Group* g = S().group;
    Region* r = FindRegion(p, g);
    if (r == nullptr) return;
    const bool shared = r == &g->workspace;
    std::unique_lock<std::mutex> lk(g->mu, std::defer_lock);
    if (shared) lk.lock();
    const uint64_t off = static_cast<const uint8_t*>(p) - r->base;
    if (off + bytes > r->size) Fail(std::string(api) + " runs past the end of a " + MemName(r->mem) + " buffer");
    const int u = Unit(pipe);
    const VClock& vc = S().pipeClock[pipe];
    const uint16_t name = InternName(api);
    for (uint64_t gi = off / GRANULE; gi <= (off + bytes - 1) / GRANULE; ++gi) {
        Granule& gr = r->g[gi];
        if (gr.wUnit != 0xFF && gr.wUnit != u && gr.wClock > vc.c[gr.wUnit])
            Race(*r, gi * GRANULE, write ? "a write" : "a read", u, name, gr.wUnit, gr.wName, "races with the write by");
        if (write) {
            for (int x = 0; x < NUM_UNITS; ++x)
                if (x != u && gr.rClock[x] > vc.c[x])
                    Race(*r, gi * GRANULE, "a write", u, name, x, gr.rName[x], "races with the read by");
            gr.wUnit = static_cast<uint8_t>(u);
            gr.wClock = vc.c[u];
            gr.wName = name;
            std::memset(gr.rClock, 0, sizeof(gr.rClock));
        } else {
            gr.rClock[u] = vc.c[u];
            gr.rName[u] = name;
        }
    }
}
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
            if (!g.aivToAic[i][s].pending.empty() || !g.aicToAiv[i][s].pending.empty())
                Fail("cross-core flag " + std::to_string(i) + " left set at kernel end");
}
// MTE2 traffic from GM, per core, split into the workspace hand-over and everything else (the inputs)
inline void CountMte2(const void* src, uint64_t bytes) {
    Group& g = *S().group;
    const uint8_t* b = static_cast<const uint8_t*>(src);
    const bool ws = b >= g.workspace.base && b < g.workspace.base + g.workspace.size;
    (ws ? g.mte2WorkspaceBytes : g.mte2InputBytes)[S().slot] += bytes;
    for (const Group::Span& q : g.queryInputs)
        if (!ws && b >= q.base && b < q.base + q.size) g.mte2QueryBytes[S().slot] += bytes;
}
// the launch's GM workspace, tracked for races between the cores of the block
inline void SetWorkspace(Group& g, uint8_t* base, uint64_t size) {
    g.workspace.base = base;
    g.workspace.size = size;
    g.workspace.mem = GM;
    g.workspace.g.assign((size + GRANULE - 1) / GRANULE, Granule());
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
        twin::Issue(twin::P_S);  // a scalar read of GM
        twin::Access(twin::P_S, addr_ + offset, sizeof(T), false, "GlobalTensor::GetValue");
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
        twin::Issue(twin::P_S);  // the scalar unit reads local memory: ordered with other pipes only by flags
        twin::Access(twin::P_S, ptr_ + i, sizeof(T), false, "LocalTensor::GetValue");
        return ptr_[i];
    }
    template <typename U>
    __aicore__ inline void SetValue(uint32_t i, U v) const {
        Check(i, 1);
        twin::Issue(twin::P_S);
        twin::Access(twin::P_S, ptr_ + i, sizeof(T), true, "LocalTensor::SetValue");
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

// ---------------------------------------------------------------- events (intra-core flags)
namespace twin {
// SetFlag-WaitFlag(ISASI).md: a flag goes from the producer pipe to the consumer pipe; setting a flag
// that is already set (same pipe pair, same id, no wait between) is undefined and can hang; under
// TPipe/TQue the ids come from AllocEventID/FetchEventID, since the queues take ids of their own.
inline void SetEvent(HardEvent e, int32_t id, const char* who) {
    const EventPipes ep = PipesOf(e);
    if (id < 0 || id >= MAX_EVENT_ID)
        Fail(std::string(who) + "<" + ep.name + ">(" + std::to_string(id) + "): event ids run 0-" +
             std::to_string(MAX_EVENT_ID - 1) + " per pipe pair (QUE_MAX_EVENT)");
    EventSlot& ev = S().events[static_cast<int>(e)][id];
    if (ev.set)
        Fail(std::string(who) + "<" + ep.name + ">(" + std::to_string(id) +
             ") on a flag that is already set: a flag set twice without a wait is undefined and can hang "
             "(SetFlag-WaitFlag(ISASI).md); under TPipe/TQue take ids from AllocEventID/FetchEventID");
    ev.set = true;
    ev.clock = S().pipeClock[ep.src];  // everything the producer pipe has issued so far
}
inline void WaitEvent(HardEvent e, int32_t id, const char* who) {
    const EventPipes ep = PipesOf(e);
    if (id < 0 || id >= MAX_EVENT_ID)
        Fail(std::string(who) + "<" + ep.name + ">(" + std::to_string(id) + "): event ids run 0-" +
             std::to_string(MAX_EVENT_ID - 1) + " per pipe pair (QUE_MAX_EVENT)");
    EventSlot& ev = S().events[static_cast<int>(e)][id];
    if (!ev.set)
        Fail(std::string(who) + "<" + ep.name + ">(" + std::to_string(id) +
             ") with no SetFlag before it: a deadlock on the chip (this core's program sets it nowhere earlier)");
    ev.set = false;
    S().pipeClock[ep.dst].Join(ev.clock);
}
// TPipe's event pool: the lowest id not held (kernel_tpipe_impl.h AllocEventID / FetchEventID)
inline int32_t LowestFree(HardEvent e) {
    const uint8_t occ = S().occupied[static_cast<int>(e)];
    for (int32_t i = 0; i < MAX_EVENT_ID; ++i)
        if (!(occ & (1u << i))) return i;
    Fail(std::string("every event id of ") + PipesOf(e).name + " is held (QUE_MAX_EVENT)");
    return -1;
}
inline int32_t AllocEvent(HardEvent e) {
    const int32_t id = LowestFree(e);
    S().occupied[static_cast<int>(e)] |= static_cast<uint8_t>(1u << id);
    return id;
}
inline void ReleaseEvent(HardEvent e, int32_t id) {
    S().occupied[static_cast<int>(e)] &= static_cast<uint8_t>(~(1u << id));
}
// events of a queue position (kernel_event.h GetQueEvt): the pipe that fills a buffer -> the pipe that
// reads it (EnQue/DeQue), and back (FreeTensor/AllocTensor)
inline HardEvent EnQueEvent(TPosition p);
inline HardEvent FreeEvent(TPosition p);
}  // namespace twin

// ---------------------------------------------------------------- TPipe / TQue / TBuf
// mirrors AscendC::TQue<TPosition pos, int32_t depth>: AllocTensor<T>(), EnQue(tensor), DeQue<T>(), FreeTensor(tensor)
// with the events of the real implementation (kernel_tquebind_impl.h): EnQue takes an id with
// AllocEventID and sets it, DeQue waits on it and releases it; FreeTensor takes an id and sets it, and
// the next AllocTensor of that buffer waits on it and releases it.
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
                if (freeId_[k] >= 0) {
                    twin::WaitEvent(twin::FreeEvent(pos), freeId_[k], "TQue::AllocTensor WaitFlag");
                    twin::ReleaseEvent(twin::FreeEvent(pos), freeId_[k]);
                    freeId_[k] = -1;
                }
                return LocalTensor<T>(reinterpret_cast<T*>(bufs_[k]), len_ / sizeof(T), pos);
            }
        }
        twin::Fail("TQue::AllocTensor with all " + std::to_string(bufs_.size()) + " buffers in use (missing FreeTensor)");
        return {};
    }
    template <typename T>
    __aicore__ inline bool EnQue(const LocalTensor<T>& t) {
        if (queued_.size() >= size_t(depth)) twin::Fail("TQue::EnQue beyond the queue depth");
        const int32_t id = twin::AllocEvent(twin::EnQueEvent(pos));
        twin::SetEvent(twin::EnQueEvent(pos), id, "TQue::EnQue SetFlag");
        queued_.push_back({Index(t), id});
        return true;
    }
    template <typename T>
    __aicore__ inline LocalTensor<T> DeQue() {
        if (queued_.empty()) twin::Fail("TQue::DeQue on an empty queue (would hang)");
        const auto [k, id] = queued_.front();
        queued_.erase(queued_.begin());
        twin::WaitEvent(twin::EnQueEvent(pos), id, "TQue::DeQue WaitFlag");
        twin::ReleaseEvent(twin::EnQueEvent(pos), id);
        return LocalTensor<T>(reinterpret_cast<T*>(bufs_[k]), len_ / sizeof(T), pos);
    }
    template <typename T>
    __aicore__ inline void FreeTensor(const LocalTensor<T>& t) {
        const size_t k = Index(t);
        if (!busy_[k]) twin::Fail("TQue::FreeTensor of a buffer that is not allocated");
        busy_[k] = false;
        freeId_[k] = twin::AllocEvent(twin::FreeEvent(pos));
        twin::SetEvent(twin::FreeEvent(pos), freeId_[k], "TQue::FreeTensor SetFlag");
    }
    template <typename T>
    size_t Index(const LocalTensor<T>& t) const {
        for (size_t k = 0; k < bufs_.size(); ++k)
            if (reinterpret_cast<uint8_t*>(t.Ptr()) == bufs_[k]) return k;
        twin::Fail("TQue: a tensor this queue did not allocate");
        return 0;
    }
    std::vector<uint8_t*> bufs_;
    std::vector<bool> busy_;
    std::vector<int32_t> freeId_;
    uint32_t len_ = 0;
    size_t next_ = 0;
    std::vector<std::pair<size_t, int32_t>> queued_;
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

// mirrors AscendC::TPipe: InitBuffer(TQue& que, uint8_t num, uint32_t len), InitBuffer(TBuf& buf, uint32_t bufLen),
// template <HardEvent evt> AllocEventID() / ReleaseEventID(TEventID) / FetchEventID(), FetchEventID(HardEvent)
using TEventID = int8_t;
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
        que.freeId_.assign(num, -1);
        for (uint8_t i = 0; i < num; ++i) que.bufs_.push_back(NewBlock(aligned, MemOf(pos)));
        return true;
    }
    template <TPosition pos>
    __aicore__ inline bool InitBuffer(TBuf<pos>& buf, uint32_t len) {
        uint32_t aligned = Align(len);
        Charge(pos, aligned, len, 1);
        buf.len_ = aligned;
        buf.buf_ = NewBlock(aligned, MemOf(pos));
        return true;
    }
    template <HardEvent evt>
    __aicore__ inline TEventID AllocEventID() { return static_cast<TEventID>(twin::AllocEvent(evt)); }
    template <HardEvent evt>
    __aicore__ inline void ReleaseEventID(TEventID id) { twin::ReleaseEvent(evt, id); }
    template <HardEvent evt>
    __aicore__ inline TEventID FetchEventID() { return static_cast<TEventID>(twin::LowestFree(evt)); }
    __aicore__ inline TEventID FetchEventID(HardEvent evt) { return static_cast<TEventID>(twin::LowestFree(evt)); }
    uint64_t Used(int mem) const { return used_[mem]; }
    ~TPipe() {
        // the core's regions die with its pipe
        auto& rs = twin::S().regions;
        for (auto& r : regions_) rs.erase(std::remove(rs.begin(), rs.end(), r.get()), rs.end());
    }

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
    uint8_t* NewBlock(uint32_t bytes, int mem) {
        blocks_.emplace_back(new uint8_t[bytes]);
        std::memset(blocks_.back().get(), 0xFF, bytes);
        auto r = std::make_unique<twin::Region>();
        r->base = blocks_.back().get();
        r->size = bytes;
        r->mem = mem;
        r->chipAddr = twin::S().chipTop[mem];  // TPipe lays buffers out one after another
        twin::S().chipTop[mem] += bytes;
        r->g.assign((bytes + twin::GRANULE - 1) / twin::GRANULE, twin::Granule());
        twin::S().regions.push_back(r.get());
        regions_.push_back(std::move(r));
        return blocks_.back().get();
    }
    uint64_t used_[twin::NUM_MEM] = {0, 0, 0, 0, 0};
    std::vector<std::unique_ptr<uint8_t[]>> blocks_;
    std::vector<std::unique_ptr<twin::Region>> regions_;
};

namespace twin {
inline HardEvent EnQueEvent(TPosition p) {
    switch (p) {
        case TPosition::VECIN: return HardEvent::MTE2_V;
        case TPosition::VECOUT: return HardEvent::V_MTE3;
        case TPosition::A1: case TPosition::B1: case TPosition::C1: return HardEvent::MTE2_MTE1;
        case TPosition::A2: case TPosition::B2: return HardEvent::MTE1_M;
        case TPosition::CO1: return HardEvent::M_FIX;
        default: Fail("TQue position without queue events in the twin"); return HardEvent::MAX;
    }
}
inline HardEvent FreeEvent(TPosition p) {
    switch (p) {
        case TPosition::VECIN: return HardEvent::V_MTE2;
        case TPosition::VECOUT: return HardEvent::MTE3_V;
        case TPosition::A1: case TPosition::B1: case TPosition::C1: return HardEvent::MTE1_MTE2;
        case TPosition::A2: case TPosition::B2: return HardEvent::M_MTE1;
        case TPosition::CO1: return HardEvent::FIX_M;
        default: Fail("TQue position without queue events in the twin"); return HardEvent::MAX;
    }
}
// the address TPipe would give this local tensor (for the documented alignment rules)
template <typename T>
inline uint64_t ChipAddr(const LocalTensor<T>& t) {
    Region* r = FindRegion(t.Ptr(), nullptr);
    if (r == nullptr) Fail("a local tensor outside every TPipe buffer");
    return r->chipAddr + (reinterpret_cast<const uint8_t*>(t.Ptr()) - r->base);
}
template <typename T>
inline void NeedAligned(const LocalTensor<T>& t, uint64_t align, const std::string& rule) {
    const uint64_t a = ChipAddr(t);
    if (a % align != 0) Fail(rule + " (address " + std::to_string(a) + " is not " + std::to_string(align) + "-byte aligned)");
}
}  // namespace twin

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
    twin::SetEvent(evt, id, "SetFlag");
}
template <HardEvent evt>
__aicore__ inline void WaitFlag(int32_t id) {
    twin::WaitEvent(evt, id, "WaitFlag");
}
// mirrors template <pipe_t pipe> PipeBarrier(): the pipe's later instructions wait for its earlier ones;
// PIPE_ALL waits for every pipe of the core
template <pipe_t pipe>
__aicore__ inline void PipeBarrier() {
    twin::State& st = twin::S();
    if (pipe == PIPE_ALL) {
        twin::VClock all;
        for (int p = 0; p < twin::NUM_PIPES; ++p) all.Join(st.pipeClock[p]);
        for (int p = 0; p < twin::NUM_PIPES; ++p) st.pipeClock[p] = all;
    }
    if (pipe == PIPE_M || pipe == PIPE_ALL) st.mBarrierSince = true;
}
// mirrors template <uint8_t modeId, pipe_t pipe> CrossCoreSetFlag(uint16_t flagId) and
// template <uint8_t modeId = 0, pipe_t pipe = PIPE_S> CrossCoreWaitFlag(uint16_t flagId), mode 2
// (a cube core with its vector cores): an AIV's set counts for its AIC; the AIC's wait needs a set from
// every AIV of the block; the AIC's set reaches every AIV, and each AIV's wait consumes its own.
// CrossCoreSetFlag(ISASI).md: the set is issued on `pipe` (it orders only what that pipe has done: the
// template argument matters), flag ids run 0-15 and each flag's counter 0-15 (a 16th pending set
// overflows it). The wait stalls the core's instruction issue, so every later instruction follows it.
template <uint8_t modeId, pipe_t pipe>
__aicore__ inline void CrossCoreSetFlag(uint16_t flagId) {
    static_assert(modeId == 2, "twin: only mode 2 (AIC <-> its AIVs) is modelled");
    if (flagId > 15) twin::Fail("CrossCoreSetFlag(" + std::to_string(flagId) + "): flag ids run 0-15");
    twin::Group& g = *twin::S().group;
    const twin::VClock clock = twin::S().pipeClock[twin::PipeOf(pipe)];
    std::lock_guard<std::mutex> lk(g.mu);
    auto push = [&](twin::CrossFlag& f) {
        if (f.pending.size() >= 15)
            twin::Fail("CrossCoreSetFlag(" + std::to_string(flagId) + "): the flag's counter overflows (it runs 0-15; "
                       "15 sets are pending without a wait)");
        f.pending.push_back(clock);
    };
    if (twin::S().coreType == 2) {
        push(g.aivToAic[flagId][twin::S().subBlockIdx]);
    } else {
        for (int sb = 0; sb < g.ratio; ++sb) push(g.aicToAiv[flagId][sb]);
    }
    g.cv.notify_all();
}
template <uint8_t modeId = 0, pipe_t pipe = PIPE_S>
__aicore__ inline void CrossCoreWaitFlag(uint16_t flagId) {
    if (flagId > 15) twin::Fail("CrossCoreWaitFlag(" + std::to_string(flagId) + "): flag ids run 0-15");
    twin::Group& g = *twin::S().group;
    twin::VClock got;
    {
        std::unique_lock<std::mutex> lk(g.mu);
        const int f = flagId;
        const std::string what = "CrossCoreWaitFlag(" + std::to_string(flagId) + ")";
        auto pop = [&](twin::CrossFlag& cf) {
            got.Join(cf.pending.front());
            cf.pending.erase(cf.pending.begin());
        };
        if (twin::S().coreType == 2) {
            const int sb = static_cast<int>(twin::S().subBlockIdx);
            twin::GroupWait(lk, g, [&] { return !g.aicToAiv[f][sb].pending.empty(); }, what + " on AIV");
            pop(g.aicToAiv[f][sb]);
        } else {
            twin::GroupWait(lk, g, [&] {
                for (int sb = 0; sb < g.ratio; ++sb)
                    if (g.aivToAic[f][sb].pending.empty()) return false;
                return true;
            }, what + " on AIC");
            for (int sb = 0; sb < g.ratio; ++sb) pop(g.aivToAic[f][sb]);
        }
    }
    for (int p = 0; p < twin::NUM_PIPES; ++p) twin::S().pipeClock[p].Join(got);
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
// Limits below are Huawei's documented ranges (asc-devkit docs/zh/api/SIMD-API/基础API/...), checked on
// every call: a kernel that breaks one fails here as it would (or worse, silently) on the chip.
namespace twin {
// DataCopyPad（GMToUB非对齐数据搬运）.md / DataCopyPad（UBToGM非对齐数据搬运）.md: blockCount in [1, 4095],
// blockLen in [1, 2097151] bytes and a multiple of sizeof(T), the UB address 32-byte aligned
template <typename T>
inline void CheckDataCopyPad(const LocalTensor<T>& ub, const DataCopyExtParams& p, const char* api) {
    const std::string doc = std::string(api) + " (DataCopyPad docs): ";
    if (p.blockCount < 1 || p.blockCount > 4095)
        Fail(doc + "blockCount " + std::to_string(p.blockCount) + " outside [1, 4095]");
    if (p.blockLen < 1 || p.blockLen > 2097151)
        Fail(doc + "blockLen " + std::to_string(p.blockLen) + " outside [1, 2097151]");
    if (p.blockLen % sizeof(T) != 0) Fail(doc + "blockLen is not a whole number of elements");
    NeedAligned(ub, 32, doc + "the UB operand must start 32-byte aligned");
}
}  // namespace twin
// mirrors template <typename T> DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src,
//     const DataCopyExtParams& dataCopyParams, const DataCopyPadExtParams<T>& padParams)   (GM -> UB, MTE2)
// GM blocks are blockLen bytes, srcStride bytes apart (tail to head); UB blocks start on 32 B
// boundaries, dstStride 32-B blocks apart. Bytes between blockLen and the 32 B boundary are padding:
// rightPadding elements of paddingValue when isPad; otherwise the chip leaves unspecified data there,
// which the twin writes as NaN (0xFF bytes) so that a kernel reading it fails.
template <typename T>
__aicore__ inline void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src,
                                   const DataCopyExtParams& p, const DataCopyPadExtParams<T>& pad) {
    twin::NeedPos(MemOf(dst.Pos()) == twin::UB, "DataCopyPad(GM->UB)");
    twin::CheckDataCopyPad(dst, p, "DataCopyPad(GM->UB)");
    uint32_t n = p.blockLen / sizeof(T);
    const uint32_t padded = (p.blockLen + 31) / 32 * 32;
    uint32_t ubBlock = padded + p.dstStride * 32;
    if (pad.isPad && (n + pad.rightPadding) * sizeof(T) > padded)
        twin::Fail("DataCopyPad rightPadding goes past the 32 B boundary");
    twin::Issue(twin::P_MTE2);
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        uint64_t so = uint64_t(b) * (p.blockLen + p.srcStride) / sizeof(T);
        uint64_t d0 = uint64_t(b) * ubBlock / sizeof(T);
        src.Check(so, n);
        dst.Check(d0, padded / sizeof(T));
        twin::Access(twin::P_MTE2, src.GetPhyAddr() + so, p.blockLen, false, "DataCopyPad(GM->UB)");
        twin::Access(twin::P_MTE2, dst.Ptr() + d0, padded, true, "DataCopyPad(GM->UB)");
        twin::CountMte2(src.GetPhyAddr() + so, p.blockLen);
        std::memcpy(dst.Ptr() + d0, src.GetPhyAddr() + so, p.blockLen);
        if (pad.isPad) {
            for (uint32_t i = 0; i < pad.rightPadding; ++i) dst.Ptr()[d0 + n + i] = pad.paddingValue;
        } else {
            std::memset(reinterpret_cast<uint8_t*>(dst.Ptr() + d0) + p.blockLen, 0xFF, padded - p.blockLen);
        }
    }
}
// mirrors template <typename T> DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src,
//     const DataCopyExtParams& dataCopyParams)   (UB -> GM, MTE3; srcStride in 32-B blocks, dstStride in bytes)
template <typename T>
__aicore__ inline void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
    twin::NeedPos(MemOf(src.Pos()) == twin::UB, "DataCopyPad(UB->GM)");
    twin::CheckDataCopyPad(src, p, "DataCopyPad(UB->GM)");
    uint32_t n = p.blockLen / sizeof(T);
    uint32_t ubBlock = (p.blockLen + 31) / 32 * 32 + p.srcStride * 32;
    twin::Issue(twin::P_MTE3);
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        uint64_t s0 = uint64_t(b) * ubBlock / sizeof(T);
        uint64_t d0 = uint64_t(b) * (p.blockLen + p.dstStride) / sizeof(T);
        src.Check(s0, n);
        dst.Check(d0, n);
        twin::Access(twin::P_MTE3, src.Ptr() + s0, p.blockLen, false, "DataCopyPad(UB->GM)");
        twin::Access(twin::P_MTE3, dst.GetPhyAddr() + d0, p.blockLen, true, "DataCopyPad(UB->GM)");
        std::memcpy(dst.GetPhyAddr() + d0, src.Ptr() + s0, p.blockLen);
    }
}
// mirrors template <typename T> DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src,
//     const Nd2NzParams& intriParams)   (GM ND -> L1 Nz, MTE2)
// Row r, column c of ND matrix i lands at: i*dstNzMatrixStride + (c / C0)*dstNzC0Stride*C0
//     + r*dstNzNStride*C0 + c % C0   (strides in 32-B units = C0 elements).
// DataCopy（随路转换ND2NZ搬运）: the L1 address 32-byte aligned; nValue, dValue in [0, 16384], dValue
// <= srcDValue; dstNzC0Stride >= nValue (the column blocks must not overlap).
template <typename T>
__aicore__ inline void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const Nd2NzParams& p) {
    twin::NeedPos(MemOf(dst.Pos()) == twin::L1, "DataCopy(Nd2Nz)");
    twin::NeedAligned(dst, 32, "DataCopy(Nd2Nz): the L1 operand must start 32-byte aligned");
    if (p.nValue > 16384 || p.dValue > 16384) twin::Fail("DataCopy(Nd2Nz): nValue/dValue beyond 16384");
    if (p.dValue > p.srcDValue) twin::Fail("DataCopy(Nd2Nz): dValue > srcDValue");
    if (p.dstNzNStride == 1 && p.dstNzC0Stride < p.nValue) twin::Fail("DataCopy(Nd2Nz): dstNzC0Stride < nValue");
    constexpr uint32_t C0 = twin::C0<T>();
    twin::Issue(twin::P_MTE2);
    for (uint32_t i = 0; i < p.ndNum; ++i) {
        for (uint32_t r = 0; r < p.nValue; ++r) {
            uint64_t so = uint64_t(i) * p.srcNdMatrixStride + uint64_t(r) * p.srcDValue;
            src.Check(so, p.dValue);
            twin::Access(twin::P_MTE2, src.GetPhyAddr() + so, uint64_t(p.dValue) * sizeof(T), false, "DataCopy(Nd2Nz)");
            twin::CountMte2(src.GetPhyAddr() + so, uint64_t(p.dValue) * sizeof(T));
            for (uint32_t c = 0; c < p.dValue; ++c) {
                uint64_t d = uint64_t(i) * p.dstNzMatrixStride + uint64_t(c / C0) * p.dstNzC0Stride * C0 +
                             uint64_t(r) * p.dstNzNStride * C0 + c % C0;
                dst.Check(d, 1);
                dst.Ptr()[d] = src.GetPhyAddr()[so + c];
            }
        }
        // the fractal rows written (padding columns of a partial C0 block included: the chip writes them);
        // one range when the column blocks are packed back to back, as the kernel lays them out
        const uint32_t blocks = (p.dValue + C0 - 1) / C0;
        if (p.dstNzNStride == 1 && p.dstNzC0Stride == p.nValue) {
            twin::Access(twin::P_MTE2, dst.Ptr() + uint64_t(i) * p.dstNzMatrixStride,
                         uint64_t(blocks) * p.nValue * 32, true, "DataCopy(Nd2Nz)");
            continue;
        }
        for (uint32_t cb = 0; cb < blocks; ++cb)
            for (uint32_t r = 0; r < p.nValue; ++r)
                twin::Access(twin::P_MTE2,
                             dst.Ptr() + uint64_t(i) * p.dstNzMatrixStride + uint64_t(cb) * p.dstNzC0Stride * C0 +
                                 uint64_t(r) * p.dstNzNStride * C0,
                             32, true, "DataCopy(Nd2Nz)");
    }
}
// mirrors template <typename T> LoadData(const LocalTensor<T>& dst, const LocalTensor<T>& src,
//     const LoadData2DParams& loadDataParams)   (L1 -> L0A / L0B, whole fractals, MTE1)
// repeatTimes fractals (16 x C0 elements = 512 B each): fractal j is read at startIndex + j*srcStride
// and written at j*(1 + dstGap). Transposing loads are not modelled (the kernel does not use them).
// LoadData（2D）: repeatTimes in [0, 255] (0 is a no-op); the L0A/L0B address 512-byte aligned, the L1
// address 32-byte aligned.
template <typename T>
__aicore__ inline void LoadData(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LoadData2DParams& p) {
    twin::NeedPos(MemOf(src.Pos()) == twin::L1, "LoadData source");
    twin::NeedPos(MemOf(dst.Pos()) == twin::L0A || MemOf(dst.Pos()) == twin::L0B, "LoadData destination");
    if (p.ifTranspose) twin::Fail("LoadData with ifTranspose is outside the twin's subset");
    twin::NeedAligned(dst, 512, "LoadData: the L0A/L0B operand must start 512-byte aligned");
    twin::NeedAligned(src, 32, "LoadData: the L1 operand must start 32-byte aligned");
    constexpr uint32_t FR = 512 / sizeof(T);
    twin::Issue(twin::P_MTE1);
    for (uint32_t j = 0; j < p.repeatTimes; ++j) {
        uint64_t s = (uint64_t(p.startIndex) + uint64_t(j) * p.srcStride) * FR;
        uint64_t d = uint64_t(j) * (1 + p.dstGap) * FR;
        src.Check(s, FR);
        dst.Check(d, FR);
        twin::Access(twin::P_MTE1, src.Ptr() + s, 512, false, "LoadData");
        twin::Access(twin::P_MTE1, dst.Ptr() + d, 512, true, "LoadData");
        std::memcpy(dst.Ptr() + d, src.Ptr() + s, 512);
    }
}
// mirrors template <typename T, typename U, typename S> Mmad(const LocalTensor<T>& dst,
//     const LocalTensor<U>& fm, const LocalTensor<S>& filter, const MmadParams& mmadParams)   (M pipe)
// fm (L0A, "Zz"): fractal (mi, ki) at (mi*Kf + ki)*FR, element (m, k) at (m%16)*C0 + k%C0;
// filter (L0B, "Zn"): fractal (ki, ni) at (ki*Nf + ni)*FR, element (k, n) at (n%16)*C0 + k%C0;
// dst (L0C, "Nz", float): fractal (mi, ni) at (ni*Mf + mi)*256, element (m, n) at (m%16)*16 + n%16;
// Kf = ceil(k/C0), Nf = ceil(n/16), Mf = ceil(m/16). Products and sums in float (fp32 accumulation);
// cmatrixInitVal = true starts from 0, false adds to what L0C holds.
// Mmad.md: m, n, k in [0, 4095]; Mmads that accumulate into one L0C tile need PipeBarrier<PIPE_M>
// between them when (m/16)*(n/16) < 10. The twin also asks k to be whole fractal rows (a multiple of C0):
// a partial one would contract over the unspecified padding of the last fractal.
template <typename T, typename U, typename S>
__aicore__ inline void Mmad(const LocalTensor<T>& dst, const LocalTensor<U>& fm, const LocalTensor<S>& filter,
                            const MmadParams& p) {
    static_assert(IsSameType<T, float>::value, "twin Mmad: L0C is float");
    static_assert(IsSameType<U, S>::value, "twin Mmad: both operands of one dtype");
    twin::NeedPos(MemOf(fm.Pos()) == twin::L0A && MemOf(filter.Pos()) == twin::L0B &&
                  MemOf(dst.Pos()) == twin::L0C, "Mmad");
    constexpr uint32_t C0 = twin::C0<U>();
    constexpr uint32_t FR = 16 * C0;
    if (p.m > 4095 || p.n > 4095 || p.k > 4095)
        twin::Fail("Mmad: m, n, k must be in [0, 4095] (Mmad.md), got " + std::to_string(p.m) + ", " +
                   std::to_string(p.n) + ", " + std::to_string(p.k));
    if (p.k % C0 != 0) twin::Fail("Mmad: k = " + std::to_string(p.k) + " is not a multiple of C0 = " + std::to_string(C0));
    twin::NeedAligned(fm, 512, "Mmad: L0A operand must start 512-byte aligned");
    twin::NeedAligned(filter, 512, "Mmad: L0B operand must start 512-byte aligned");
    twin::State& st = twin::S();
    if (!p.cmatrixInitVal && st.lastMmadDst == dst.Ptr() && st.lastMmadSmall && !st.mBarrierSince)
        twin::Fail("Mmad accumulates into the L0C tile of the previous Mmad with (m/16)*(n/16) = " +
                   std::to_string((p.m / 16) * (p.n / 16)) + " < 10 and no PipeBarrier<PIPE_M>() between them (Mmad.md)");
    st.lastMmadDst = dst.Ptr();
    st.lastMmadSmall = (p.m / 16) * (p.n / 16) < 10;
    st.mBarrierSince = false;
    const uint32_t Mf = (p.m + 15) / 16, Nf = (p.n + 15) / 16, Kf = (p.k + C0 - 1) / C0;
    fm.Check(0, uint64_t(Mf) * Kf * FR);
    filter.Check(0, uint64_t(Kf) * Nf * FR);
    dst.Check(0, uint64_t(Mf) * Nf * 256);
    twin::Issue(twin::P_M);
    twin::Access(twin::P_M, fm.Ptr(), uint64_t(Mf) * Kf * FR * sizeof(U), false, "Mmad");
    twin::Access(twin::P_M, filter.Ptr(), uint64_t(Kf) * Nf * FR * sizeof(S), false, "Mmad");
    if (!p.cmatrixInitVal) twin::Access(twin::P_M, dst.Ptr(), uint64_t(Mf) * Nf * 256 * sizeof(T), false, "Mmad");
    twin::Access(twin::P_M, dst.Ptr(), uint64_t(Mf) * Nf * 256 * sizeof(T), true, "Mmad");
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
// L0C Nz -> GM ND (FIX pipe): element (m, n) of the Nz source (column blocks of 16, srcStride rows apart)
// goes to dst[m*dstStride + n] for m < mSize, n < nSize. No quantisation, no relu.
// Fixpipe（L0C到GM数据搬运）.md: nSize in [0, 4095] and a multiple of 16; mSize in [0, 8192] with NZ2ND;
// srcStride = mSize rounded up to 16.
template <typename T, typename U, const FixpipeConfig& config = CFG_ROW_MAJOR>
__aicore__ inline void Fixpipe(const GlobalTensor<T>& dst, const LocalTensor<U>& src, const FixpipeParamsV220& p) {
    static_assert(IsSameType<T, float>::value && IsSameType<U, float>::value, "twin Fixpipe: float -> float only");
    static_assert(config.isToRowMajor, "twin Fixpipe: row-major output only");
    twin::NeedPos(MemOf(src.Pos()) == twin::L0C, "Fixpipe");
    if (p.reluEn) twin::Fail("Fixpipe relu is outside the twin's subset");
    if (p.nSize > 4095 || p.nSize % 16 != 0) twin::Fail("Fixpipe: nSize must be a multiple of 16 in [0, 4095]");
    if (p.mSize > 8192) twin::Fail("Fixpipe: mSize beyond 8192 with NZ2ND");
    if (p.srcStride % 16 != 0 || p.srcStride < p.mSize) twin::Fail("Fixpipe srcStride must be M rounded up to 16");
    twin::Issue(twin::P_FIX);
    for (uint32_t nb = 0; nb < (p.nSize + 15u) / 16; ++nb)
        twin::Access(twin::P_FIX, src.Ptr() + uint64_t(nb) * p.srcStride * 16, uint64_t(p.mSize) * 16 * sizeof(U),
                     false, "Fixpipe");
    for (uint32_t m = 0; m < p.mSize; ++m) {
        dst.Check(uint64_t(m) * p.dstStride, p.nSize);
        twin::Access(twin::P_FIX, dst.GetPhyAddr() + uint64_t(m) * p.dstStride, uint64_t(p.nSize) * sizeof(T), true,
                     "Fixpipe");
        for (uint32_t n = 0; n < p.nSize; ++n) {
            uint64_t s = uint64_t(n / 16) * p.srcStride * 16 + uint64_t(m) * 16 + n % 16;
            src.Check(s, 1);
            dst.GetPhyAddr()[uint64_t(m) * p.dstStride + n] = src.Ptr()[s];
        }
    }
}

// ---------------------------------------------------------------- vector unit (count forms, V pipe)
// The count forms split into repeats of 256 bytes themselves, so the 255-repeat limit of the
// repeat forms does not arise; the operands must start 32-byte aligned (vector instruction docs).
namespace twin {
template <typename T>
inline void NeedUb(const LocalTensor<T>& t, int32_t count, const char* api) {
    NeedPos(MemOf(t.Pos()) == UB, api);
    if (count < 0) Fail(std::string(api) + " with a negative count");
    t.Check(0, uint32_t(count));
    NeedAligned(t, 32, std::string(api) + ": vector operands must start 32-byte aligned");
}
template <typename T>
inline void VRead(const LocalTensor<T>& t, uint64_t count, const char* api) {
    Access(P_V, t.Ptr(), count * sizeof(T), false, api);
}
template <typename T>
inline void VWrite(const LocalTensor<T>& t, uint64_t count, const char* api) {
    Access(P_V, t.Ptr(), count * sizeof(T), true, api);
}
}  // namespace twin
// mirrors Duplicate(const LocalTensor<T>& dst, const T& scalarValue, const int32_t& count)
template <typename T>
__aicore__ inline void Duplicate(const LocalTensor<T>& dst, const T& v, const int32_t& count) {
    twin::NeedUb(dst, count, "Duplicate");
    twin::Issue(twin::P_V);
    twin::VWrite(dst, count, "Duplicate");
    for (int32_t i = 0; i < count; ++i) dst.Ptr()[i] = v;
}
// mirrors Adds / Muls(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue, const int32_t& count)
#define TWIN_SCALAR_OP(NAME, EXPR)                                                                                \
    template <typename T>                                                                                         \
    __aicore__ inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& v,                 \
                                const int32_t& count) {                                                           \
        twin::NeedUb(dst, count, #NAME);                                                                          \
        twin::NeedUb(src, count, #NAME);                                                                          \
        twin::Issue(twin::P_V);                                                                                   \
        twin::VRead(src, count, #NAME);                                                                           \
        twin::VWrite(dst, count, #NAME);                                                                          \
        for (int32_t i = 0; i < count; ++i) {                                                                     \
            T a = src.Ptr()[i];                                                                                   \
            dst.Ptr()[i] = (EXPR);                                                                                \
        }                                                                                                         \
    }
TWIN_SCALAR_OP(Adds, a + v)
TWIN_SCALAR_OP(Muls, a * v)
#undef TWIN_SCALAR_OP
// mirrors Add / Sub / Mul / Max(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1,
//     const int32_t& count)
#define TWIN_BINARY(NAME, EXPR)                                                                                   \
    template <typename T>                                                                                         \
    __aicore__ inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& s0, const LocalTensor<T>& s1,    \
                                const int32_t& count) {                                                           \
        twin::NeedUb(dst, count, #NAME);                                                                          \
        twin::NeedUb(s0, count, #NAME);                                                                           \
        twin::NeedUb(s1, count, #NAME);                                                                           \
        twin::Issue(twin::P_V);                                                                                   \
        twin::VRead(s0, count, #NAME);                                                                            \
        twin::VRead(s1, count, #NAME);                                                                            \
        twin::VWrite(dst, count, #NAME);                                                                          \
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
#define TWIN_UNARY(NAME, FN)                                                                                      \
    template <typename T>                                                                                         \
    __aicore__ inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& count) {     \
        static_assert(IsSameType<T, float>::value, "twin " #NAME ": float only");                                 \
        twin::NeedUb(dst, count, #NAME);                                                                          \
        twin::NeedUb(src, count, #NAME);                                                                          \
        twin::Issue(twin::P_V);                                                                                   \
        twin::VRead(src, count, #NAME);                                                                           \
        twin::VWrite(dst, count, #NAME);                                                                          \
        for (int32_t i = 0; i < count; ++i) dst.Ptr()[i] = FN(src.Ptr()[i]);                                     \
    }
TWIN_UNARY(Exp, std::exp)
TWIN_UNARY(Ln, std::log)
#undef TWIN_UNARY
// mirrors ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& sharedTmpBuffer,
//     const int32_t count, bool calIndex = 0) and ReduceSum(dst, src, sharedTmpBuffer, const int32_t count):
// the result goes to dst[0]. The work buffer must hold at least one float per 8 source elements... the
// twin asks for count elements (generous; the real minimum depends on repeat counts).
#define TWIN_REDUCE(NAME, INIT, STEP)                                                                             \
    template <typename T>                                                                                         \
    __aicore__ inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work, \
                                const int32_t count) {                                                            \
        static_assert(IsSameType<T, float>::value, "twin " #NAME ": float only");                                 \
        if (count < 1) twin::Fail(#NAME " of zero elements");                                                     \
        twin::NeedUb(src, count, #NAME);                                                                          \
        twin::NeedUb(work, count, #NAME " work");                                                                 \
        twin::NeedUb(dst, 1, #NAME);                                                                              \
        twin::Issue(twin::P_V);                                                                                   \
        twin::VRead(src, count, #NAME);                                                                           \
        twin::VWrite(work, count, #NAME);                                                                         \
        twin::VWrite(dst, 1, #NAME);                                                                              \
        float r = INIT;                                                                                           \
        for (int32_t i = 0; i < count; ++i) {                                                                     \
            const float x = src.Ptr()[i];                                                                         \
            r = STEP;                                                                                             \
        }                                                                                                         \
        dst.Ptr()[0] = r;                                                                                         \
    }
TWIN_REDUCE(ReduceMax, src.Ptr()[0], (x > r ? x : r))
TWIN_REDUCE(ReduceSum, 0.0f, r + x)
#undef TWIN_REDUCE
template <typename T>
__aicore__ inline void ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work,
                                 const int32_t count, bool calIndex) {
    if (calIndex) twin::Fail("ReduceMax calIndex is outside the twin's subset");
    ReduceMax(dst, src, work, count);
}
namespace twin {
// float -> half / bfloat16_t rounded toward -inf (floor) or +inf (ceil): round to nearest even, then step
// one unit in the last place when that went the wrong way. Both formats are sign-magnitude, so the next
// value toward +-inf is bits +- 1 (zero steps to the smallest subnormal of the wanted sign); NaN stays NaN.
template <typename T>
inline T DirectedRound(float x, bool up) {
    T r = static_cast<T>(x);
    const float back = static_cast<float>(r);
    if (std::isnan(x) || back == x || (up ? back > x : back < x)) return r;
    const bool neg = (r.bits & 0x8000u) != 0, zero = (r.bits & 0x7FFFu) == 0;
    if (zero) r.bits = up ? 0x0001u : 0x8001u;
    else r.bits = static_cast<uint16_t>((up != neg) ? r.bits + 1 : r.bits - 1);
    return r;
}
}  // namespace twin
// mirrors Cast(const LocalTensor<T>& dst, const LocalTensor<U>& src, const RoundMode& roundMode, const uint32_t count)
// Float -> half/bfloat16 rounds to nearest even (CAST_RINT), toward -inf (CAST_FLOOR) or +inf (CAST_CEIL),
// as the A2/A3 table of Cast.md allows for float -> half / bfloat16_t; widening casts (half / bfloat16_t /
// int8_t -> a wider type) are exact (CAST_NONE).
template <typename T, typename U>
__aicore__ inline void Cast(const LocalTensor<T>& dst, const LocalTensor<U>& src, const RoundMode& mode,
                            const uint32_t count) {
    static_assert(!IsSameType<T, U>::value, "twin Cast: use a copy for equal types");
    constexpr bool narrowing = sizeof(T) < sizeof(U);
    constexpr bool toHalf16 = IsSameType<U, float>::value && (IsSameType<T, half>::value || IsSameType<T, bfloat16_t>::value);
    if (narrowing && !(mode == RoundMode::CAST_RINT ||
                       (toHalf16 && (mode == RoundMode::CAST_FLOOR || mode == RoundMode::CAST_CEIL))))
        twin::Fail("twin Cast: narrowing casts use CAST_RINT (CAST_FLOOR / CAST_CEIL from float to half / bfloat16_t)");
    if (!narrowing && mode != RoundMode::CAST_NONE) twin::Fail("twin Cast: widening casts use CAST_NONE");
    twin::NeedUb(dst, int32_t(count), "Cast");
    twin::NeedUb(src, int32_t(count), "Cast");
    twin::Issue(twin::P_V);
    twin::VRead(src, count, "Cast");
    twin::VWrite(dst, count, "Cast");
    if constexpr (toHalf16) {
        if (mode == RoundMode::CAST_FLOOR || mode == RoundMode::CAST_CEIL) {
            for (uint32_t i = 0; i < count; ++i)
                dst.Ptr()[i] = twin::DirectedRound<T>(src.Ptr()[i], mode == RoundMode::CAST_CEIL);
            return;
        }
    }
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
    twin::Issue(twin::P_V);
    twin::VRead(off, count, "Gather");
    uint32_t maxByte = 0;
    for (uint32_t i = 0; i < count; ++i) maxByte = std::max(maxByte, base + off.Ptr()[i]);
    if (count) {
        src.Check(maxByte / sizeof(T), 1);
        twin::Access(twin::P_V, src.Ptr(), maxByte + sizeof(T), false, "Gather");
    }
    twin::VWrite(dst, count, "Gather");
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
#define KERNEL_TYPE_AIV_ONLY 1

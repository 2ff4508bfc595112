// Planted-bug driver for the CPU twin (tests/test_ascendc_planted.py builds and runs it; no torch).
// Each variant N of the real kernel source is compiled with -DSELATTN_PLANTED_BUG=N (see PlantedBug in
// selective_attention_kernel.h), its namespace and float16 entry renamed to plant_entry_N, and linked
// here. `planted_driver SOC` runs every variant on one problem chosen to exercise every path the bugs
// touch (several candidate tiles, two gather chunks, a head-dim split, padded rows, rope) and prints one
// line per variant: "N clean", "N caught: <the twin's message>", or "N wrong: <how out differs from a
// float64 evaluation>".
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "selective_attention_kernel.h"  // PLANT_COUNT (this TU: no bug planted)
#include "twin_launch.h"

#define PLANT_IDS X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14)
#define X(N)                                                                                                     \
    extern "C" void plant_entry_##N(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR,      \
                                    GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR,      \
                                    GM_ADDR);                                                                    \
    extern "C" void plant_combine_##N(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR,    \
                                      GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR,    \
                                      GM_ADDR);
PLANT_IDS
#undef X
#define X(N) plant_entry_##N,
static const selattn::TwinKernel VARIANTS[] = {PLANT_IDS};
#undef X
#define X(N) plant_combine_##N,
static const selattn::TwinKernel COMBINES[] = {PLANT_IDS};
#undef X
static_assert(sizeof(VARIANTS) / sizeof(VARIANTS[0]) == selattn::PLANT_COUNT, "one entry per PlantedBug value");

namespace {
// T tokens of one sequence over S cache rows, MQA with H query heads, latent values, rope, sink
constexpr int T = 2, H = 16, S = 200, Dqk = 36, Dr = 8, Dv = 20, K = 520;

struct Problem {
    std::vector<half> q, qRope, kv, kvRope, out;
    std::vector<int32_t> idx, cuQ, cuK;
    std::vector<float> sink, lse;
    float scale = 1.0f / std::sqrt(float(Dqk + Dr));
};

Problem Make()
{
    Problem p;
    std::mt19937 rng(1234);
    std::normal_distribution<float> nd;
    auto fill = [&](std::vector<half>& v, size_t n) {
        v.resize(n);
        for (auto& x : v) x = half(nd(rng));
    };
    fill(p.q, size_t(T) * H * Dqk);
    fill(p.qRope, size_t(T) * H * Dr);
    fill(p.kv, size_t(S) * Dqk);
    fill(p.kvRope, size_t(S) * Dr);
    std::uniform_int_distribution<int> ud(-1, S + 20);  // some negative, some past the sequence
    p.idx.resize(size_t(T) * K);
    for (auto& i : p.idx) i = ud(rng);
    p.cuQ = {0, T};
    p.cuK = {0, S};
    p.sink.resize(H);
    for (auto& s : p.sink) s = nd(rng);
    p.out.assign(size_t(T) * H * Dv, half(std::nanf("")));
    p.lse.assign(size_t(T) * H, std::nanf(""));
    return p;
}

// docs/spec.md section 1 in float64 on the rounded inputs; "" when out and lse agree
std::string Compare(const Problem& p)
{
    double worst = 0.0;
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h) {
            std::vector<double> s;
            std::vector<int> rows;
            for (int j = 0; j < K; ++j) {
                const int r = p.idx[size_t(t) * K + j];
                if (r < 0 || r >= S) continue;
                double d = 0.0;
                for (int c = 0; c < Dqk; ++c) d += double(float(p.q[(size_t(t) * H + h) * Dqk + c])) * float(p.kv[size_t(r) * Dqk + c]);
                for (int c = 0; c < Dr; ++c)
                    d += double(float(p.qRope[(size_t(t) * H + h) * Dr + c])) * float(p.kvRope[size_t(r) * Dr + c]);
                s.push_back(d * p.scale);
                rows.push_back(r);
            }
            double m = -INFINITY, l = 0.0;
            for (double x : s) m = std::max(m, x);
            for (double x : s) l += std::exp(x - m);
            const double lse = m + std::log(l), denom = l + std::exp(p.sink[h] - m);
            for (int c = 0; c < Dv; ++c) {
                double o = 0.0;
                for (size_t j = 0; j < s.size(); ++j) o += std::exp(s[j] - m) * float(p.kv[size_t(rows[j]) * Dqk + c]);
                const double got = float(p.out[(size_t(t) * H + h) * Dv + c]);
                if (std::isnan(got))
                    return "NaN in out where the float64 evaluation is finite: the kernel used data the chip leaves "
                           "unspecified (an unpadded tail or memory it never wrote)";
                worst = std::max(worst, std::fabs(got - o / denom));
            }
            const double gotLse = p.lse[size_t(t) * H + h];
            if (std::isnan(gotLse)) return "NaN in lse where the float64 evaluation is finite";
            worst = std::max(worst, std::fabs(gotLse - lse));
        }
    if (worst > 2e-2) return "max |out - float64| = " + std::to_string(worst) + " > 2e-2";
    return "";
}
}  // namespace

int main(int argc, char** argv)
{
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s SOC\n", argv[0]);
        return 2;
    }
    const selattn::SocSpec* soc = selattn::FindSoc(argv[1]);
    if (soc == nullptr) {
        std::fprintf(stderr, "unknown SoC %s\n", argv[1]);
        return 2;
    }
    selattn::ProblemShape sh;
    sh.T = T, sh.H = H, sh.Hkv = 1, sh.Dqk = Dqk, sh.Dr = Dr, sh.Dv = Dv, sh.K = K, sh.blockSize = 1;
    sh.dtypeBytes = 2, sh.kvRows = S, sh.maxSeqLen = S, sh.hasSink = true, sh.numSeqs = 1;
    // small tiles: 17 candidate tiles in one item (the flag counter: no decode split), two 16-row gather
    // chunks per tile (both vector cores gather), four accumulating QK^T Mmads of (16/16)*(32/16) = 2 < 10
    // fractals
    selattn::TileChoice tc;
    tc.mTile = 16, tc.nTile = 32, tc.dkChunk = 16, tc.dvChunk = 16, tc.vecBufNum = 2, tc.kvBufNum = 2, tc.l0BufNum = 2;
    tc.numSplits = 1;
    const std::string fit = selattn::FitProblems(sh, tc, *soc);
    if (!fit.empty()) {
        std::fprintf(stderr, "driver tiling does not fit %s: %s\n", argv[1], fit.c_str());
        return 2;
    }
    Problem p0 = Make();
    sh.smScale = p0.scale;
    const selattn::SelectiveAttentionTiling tiling = selattn::MakeTiling(sh, tc, *soc);
    auto run = [&](int n, const selattn::SelectiveAttentionTiling& tl) {
        Problem p = p0;
        selattn::KernelArgs a;
        a.q = reinterpret_cast<uint8_t*>(p.q.data());
        a.qRope = reinterpret_cast<uint8_t*>(p.qRope.data());
        a.kv = reinterpret_cast<uint8_t*>(p.kv.data());
        a.kvRope = reinterpret_cast<uint8_t*>(p.kvRope.data());
        a.indices = reinterpret_cast<uint8_t*>(p.idx.data());
        a.cuSeqlensQ = reinterpret_cast<uint8_t*>(p.cuQ.data());
        a.cuSeqlensK = reinterpret_cast<uint8_t*>(p.cuK.data());
        a.attnSink = reinterpret_cast<uint8_t*>(p.sink.data());
        a.out = reinterpret_cast<uint8_t*>(p.out.data());
        a.lse = reinterpret_cast<uint8_t*>(p.lse.data());
        std::string line;
        try {
            selattn::LaunchTwin(VARIANTS[n], a, tl, *soc, COMBINES[n]);
            const std::string bad = Compare(p);
            line = bad.empty() ? "clean" : "wrong: " + bad;
        } catch (const std::exception& e) {
            line = std::string("caught: ") + e.what();
        }
        for (char& c : line)
            if (c == '\n') c = ' ';
        return line;
    };
    for (int n = 0; n < selattn::PLANT_COUNT; ++n) {
        std::printf("%d %s\n", n, run(n, tiling).c_str());
        std::fflush(stdout);
    }
    // the real kernel once more with the planner's decode split: items of a few tiles each on many cores,
    // partial results and the combine launch (docs/ascendc.md "Work per core")
    selattn::TileChoice split = tc;
    split.numSplits = 0;
    const selattn::SelectiveAttentionTiling splitTiling = selattn::MakeTiling(sh, split, *soc);
    if (splitTiling.numSplits < 2) {
        std::fprintf(stderr, "the planner did not split the driver problem on %s\n", argv[1]);
        return 2;
    }
    std::printf("split %s\n", run(0, splitTiling).c_str());
    return 0;
}

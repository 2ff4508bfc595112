// Selection logic of the CUDA top-k (topk.cu), as __host__ __device__ functions with no CUDA runtime
// dependency, so that topk_host_check.cpp runs the very same code on the CPU over the same slice
// decomposition (tests/test_cuda_topk_host.py). Only the scheduling (threads, atomics, barriers) is
// the kernel's own; every decision that changes which indices come out is made here.
//
// Order contract (python_ref.selection.pack_keys): a candidate is the 64-bit integer
// (order_key(score) << 32) | ~position, so one unsigned order is "higher score, then lower position";
// NaN ranks as -inf, -0.0 ties +0.0; keys at or below order_key(-inf) come out as -1.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ATTN_TOPK_HD __host__ __device__ __forceinline__
#else
#define ATTN_TOPK_HD inline
#endif

namespace attention_cuda {
namespace topk_detail {

// Coarse digit: the top 12 bits of the order key = sign, 8 exponent bits and the 3 leading mantissa
// bits, so each binade is split in 8 (scores in [0.5, 2) spread over 16 bins, not 1 as with an 8-bit
// sign+exponent digit). 4096 bins x 4 B = 16 KiB of shared memory.
constexpr int kCoarseBits = 12;
constexpr int kCoarseShift = 32 - kCoarseBits;
constexpr uint32_t kCoarseBins = 1u << kCoarseBits;
// The exact fallback refines the remaining 20 bits with two 10-bit digits.
constexpr int kFineBits = 10;
constexpr uint32_t kFineBins = 1u << kFineBits;
// Histograms are walked hierarchically: groups of kGroup bins are summed in parallel, then one
// thread walks the group sums and the bins of one group (64 + 64 steps instead of 4096).
constexpr uint32_t kGroup = 64;
// Candidates of the threshold bin kept for the shared-memory refinement. Everything above that bin is
// fewer than k <= 2048, so above + threshold-bin candidates fit kCandCap = 4096 (32 KiB of 64-bit keys).
constexpr uint32_t kEqCap = 2048;
constexpr uint32_t kCandCap = 4096;
// A CTA of the multi-CTA passes reads at least this many scores (fewer would cost more in launch and
// global histogram atomics than the parallelism gains).
constexpr int64_t kMinSlice = 4096;
constexpr int kMaxSlices = 64;
constexpr uint32_t kNegInfKey = 0x007fffffu;  // order_key(-inf): keys at or below it are invalid

ATTN_TOPK_HD uint32_t order_key(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return kNegInfKey;  // NaN ranks as -inf
  if (u == 0x80000000u) u = 0u;                              // -0.0 ties +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

ATTN_TOPK_HD unsigned long long pack(uint32_t key, uint32_t pos) {
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned long long>(0xffffffffu - pos);
}

// The output index of a sorted candidate: its position, or -1 for padding (0) and -inf/NaN keys.
ATTN_TOPK_HD int32_t unpack_index(unsigned long long c) {
  const uint32_t key = static_cast<uint32_t>(c >> 32);
  return key > kNegInfKey ? static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(c & 0xffffffffull)) : -1;
}

ATTN_TOPK_HD uint32_t coarse_digit(uint32_t key) { return key >> kCoarseShift; }

// Scores row r ranks: its first lengths[r] positions (vLLM's per-row lengths), clamped to [0, width]
// so that a bad length can never read past the row; every position when there are no lengths.
ATTN_TOPK_HD int64_t row_width(int64_t width, const int32_t* lengths, int64_t r) {
  if (lengths == nullptr) return width;
  const int64_t n = lengths[r];
  return n < 0 ? 0 : (n < width ? n : width);
}

// How many CTAs share a row: enough CTAs in total to cover ~2 waves of the SMs, each reading at
// least kMinSlice scores. Prefill (rows >= 2 * SMs) gets 1; decode T=4 x 64K gets 16 (64K / 4096).
ATTN_TOPK_HD int slices_for(int64_t rows, int64_t width, int sms) {
  const int64_t want = rows > 0 ? (2 * static_cast<int64_t>(sms) + rows - 1) / rows : 1;
  const int64_t fit = (width + kMinSlice - 1) / kMinSlice;
  int64_t s = want < fit ? want : fit;
  if (s > kMaxSlices) s = kMaxSlices;
  return s < 1 ? 1 : static_cast<int>(s);
}

// Slice s of `slices` of a row of `width` scores: [begin, end), contiguous, sizes differ by < 1 chunk.
ATTN_TOPK_HD void slice_bounds(int64_t width, int slices, int s, int64_t* begin, int64_t* end) {
  const int64_t chunk = (width + slices - 1) / slices;
  const int64_t b = chunk * s;
  const int64_t e = b + chunk;
  *begin = b < width ? b : width;
  *end = e < width ? e : width;
}

// Walk counts[n-1] down to counts[0], adding to *above, and stop at the digit where the running count
// reaches `remaining` (0 at the latest): that digit holds the remaining-th largest element.
ATTN_TOPK_HD uint32_t walk_down(const uint32_t* counts, uint32_t n, uint32_t remaining, uint32_t* above) {
  uint32_t d = n - 1;
  for (; d > 0; --d) {
    if (*above + counts[d] >= remaining) break;
    *above += counts[d];
  }
  return d;
}

// Sum of bins [g * kGroup, (g + 1) * kGroup): one thread per group in the kernel.
ATTN_TOPK_HD uint32_t group_sum(const uint32_t* hist, uint32_t g) {
  uint32_t c = 0;
  for (uint32_t i = 0; i < kGroup; ++i) c += hist[g * kGroup + i];
  return c;
}

struct Threshold {
  uint32_t digit;  // the bin holding the remaining-th largest element
  uint32_t above;  // elements in bins above it (< remaining)
};

// Threshold bin of a `bins`-bin histogram (bins a multiple of kGroup) given its group sums.
// Requires sum(hist) >= remaining >= 1.
ATTN_TOPK_HD Threshold find_threshold(const uint32_t* hist, const uint32_t* group_sums, uint32_t bins,
                                      uint32_t remaining) {
  uint32_t above = 0;
  const uint32_t g = walk_down(group_sums, bins / kGroup, remaining, &above);
  const uint32_t d = walk_down(hist + g * kGroup, kGroup, remaining, &above);
  return Threshold{g * kGroup + d, above};
}

// Collect pass: 1 = certainly selected (its coarse bin is above the threshold bin), 2 = candidate of
// the threshold bin, 0 = out. -inf/NaN keys are never candidates: in the output they are -1 whatever
// their position, which the finish's zero padding already gives; so a causal row that is mostly -inf
// (its threshold bin is the -inf bin 0) stays on the shared-memory path instead of overflowing kEqCap.
ATTN_TOPK_HD int collect_class(uint32_t key, uint32_t threshold_digit) {
  if (key <= kNegInfKey) return 0;
  const uint32_t d = coarse_digit(key);
  return d > threshold_digit ? 1 : (d == threshold_digit ? 2 : 0);
}

// Fine digit of the exact fallback: pass 0 reads bits [10, 20), pass 1 bits [0, 10).
ATTN_TOPK_HD int fine_shift(int pass) { return kCoarseShift - kFineBits * (pass + 1); }

// Bitonic network over n (a power of two) entries sorted descending: step (size, stride) pairs
// thread t's element i with i + stride, in descending order when (i & size) == 0.
ATTN_TOPK_HD uint32_t bitonic_first(uint32_t t, uint32_t stride) { return 2 * t - (t & (stride - 1)); }

ATTN_TOPK_HD void bitonic_compare(unsigned long long* cand, uint32_t t, uint32_t size, uint32_t stride) {
  const uint32_t i = bitonic_first(t, stride);
  const uint32_t j = i + stride;
  const bool descending = (i & size) == 0;
  const unsigned long long a = cand[i], b = cand[j];
  if ((a < b) == descending) {
    cand[i] = b;
    cand[j] = a;
  }
}

ATTN_TOPK_HD uint32_t next_pow2(uint32_t n) {
  uint32_t p = 2;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace topk_detail
}  // namespace attention_cuda

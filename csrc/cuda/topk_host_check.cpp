// Host emulation of the CUDA top-k (topk.cu) for tests/test_cuda_topk_host.py: runs the kernels'
// selection logic - the very functions of topk_select.cuh - sequentially over the same slice
// decomposition, so the decisions of the GPU code are checked against python_ref without a GPU.
// What it does not cover: the CUDA scheduling itself (atomics, barriers, warp intrinsics).
//
// Build: g++ -std=c++17 -O2 -I csrc/cuda csrc/cuda/topk_host_check.cpp (no CUDA runtime).
// stdin: "rows width k sms nlen", nlen (0 or rows) per-row lengths in decimal, then rows*width float32
// bit patterns in hex. stdout: one line of k indices per row. stderr: one line per row naming the finish path taken (whole_row, shared or fallback).
#include <cstdio>
#include <vector>

#include "topk_select.cuh"

using namespace attention_cuda::topk_detail;
using u64 = unsigned long long;

namespace {

void sort_desc(std::vector<u64>& cand, uint32_t n) {  // block_sort_desc, one "thread" at a time
  for (uint32_t size = 2; size <= n; size <<= 1)
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1)
      for (uint32_t t = 0; t < (n >> 1); ++t) bitonic_compare(cand.data(), t, size, stride);
}

float from_bits(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

const char* emulate_row(const float* row, int64_t width, int k, int slices, int32_t* dst) {
  const uint32_t n = static_cast<uint32_t>(width), kk = static_cast<uint32_t>(k);
  std::vector<u64> cand(kCandCap, 0ull);
  uint32_t sort_n;
  const char* path;
  if (n <= kk) {
    path = "whole_row";
    sort_n = next_pow2(kk);
    for (uint32_t i = 0; i < sort_n; ++i) cand[i] = i < n ? pack(order_key(row[i]), i) : 0ull;
  } else {
    // coarse_hist_kernel: each slice's shared histogram added to the row's global one. Slices are
    // visited last to first: the result must not depend on the order CTAs run or append in.
    std::vector<uint32_t> ghist(kCoarseBins, 0u);
    for (int s = slices - 1; s >= 0; --s) {
      int64_t begin, end;
      slice_bounds(width, slices, s, &begin, &end);
      std::vector<uint32_t> hist(kCoarseBins, 0u);
      for (int64_t i = begin; i < end; ++i) ++hist[coarse_digit(order_key(row[i]))];
      for (uint32_t b = 0; b < kCoarseBins; ++b) ghist[b] += hist[b];
    }
    // coarse_collect_kernel
    std::vector<uint32_t> gsum(kCoarseBins / kGroup);
    for (uint32_t g = 0; g < gsum.size(); ++g) gsum[g] = group_sum(ghist.data(), g);
    const uint32_t digit = find_threshold(ghist.data(), gsum.data(), kCoarseBins, kk).digit;
    std::vector<u64> sel(kk, 0ull), eq(kEqCap, 0ull);
    uint32_t n_sel = 0, n_eq = 0;
    for (int s = slices - 1; s >= 0; --s) {
      int64_t begin, end;
      slice_bounds(width, slices, s, &begin, &end);
      for (int64_t i = begin; i < end; ++i) {
        const uint32_t key = order_key(row[i]);
        const int cls = collect_class(key, digit);
        if (cls == 1) {
          if (n_sel >= kk) return "error: selected overflow";  // the kernel relies on this never happening
          sel[n_sel++] = pack(key, static_cast<uint32_t>(i));
        } else if (cls == 2) {
          if (n_eq < kEqCap) eq[n_eq] = pack(key, static_cast<uint32_t>(i));
          ++n_eq;
        }
      }
    }
    // finish_kernel
    if (n_eq <= kEqCap) {
      path = "shared";
      const uint32_t total = n_sel + n_eq;
      sort_n = next_pow2(total > kk ? total : kk);
      if (sort_n > kCandCap) return "error: shared buffer overflow";
      for (uint32_t i = 0; i < sort_n; ++i) cand[i] = i < n_sel ? sel[i] : (i < total ? eq[i - n_sel] : 0ull);
    } else {
      path = "fallback";
      sort_n = next_pow2(kk);
      uint32_t prefix = digit << kCoarseShift, mask = ~0u << kCoarseShift, remaining = kk - n_sel;
      for (int pass = 0; pass < 2; ++pass) {
        const int shift = fine_shift(pass);
        std::vector<uint32_t> hist(kFineBins, 0u), fsum(kFineBins / kGroup);
        for (uint32_t i = 0; i < n; ++i) {
          const uint32_t key = order_key(row[i]);
          if ((key & mask) == prefix) ++hist[(key >> shift) & (kFineBins - 1)];
        }
        for (uint32_t g = 0; g < fsum.size(); ++g) fsum[g] = group_sum(hist.data(), g);
        const Threshold t = find_threshold(hist.data(), fsum.data(), kFineBins, remaining);
        prefix |= t.digit << shift;
        remaining -= t.above;
        mask |= (kFineBins - 1) << shift;
      }
      const uint32_t kth = prefix, take_eq = remaining, n_gt = kk - take_eq;
      uint32_t gt = 0, rank = 0;
      for (uint32_t i = 0; i < n; ++i) {  // tiles in position order, equal keys ranked by position
        const uint32_t key = order_key(row[i]);
        if (key > kth) {
          if (gt >= n_gt) return "error: more keys above the k-th than expected";
          cand[gt++] = pack(key, i);
        }
        if (key == kth && rank < take_eq) cand[n_gt + rank++] = pack(key, i);
      }
      if (gt != n_gt || rank != take_eq) return "error: fallback collected the wrong count";
    }
  }
  sort_desc(cand, sort_n);
  for (int j = 0; j < k; ++j) dst[j] = unpack_index(cand[j]);
  return path;
}

}  // namespace

int main() {
  long long rows, width, nlen;
  int k, sms;
  if (std::scanf("%lld %lld %d %d %lld", &rows, &width, &k, &sms, &nlen) != 5 || rows < 0 || width < 0 || k < 1 ||
      k > 2048 || sms < 1 || (nlen != 0 && nlen != rows)) {
    std::fprintf(stderr, "bad header\n");
    return 2;
  }
  std::vector<int32_t> lengths(static_cast<size_t>(nlen));
  for (auto& n : lengths) {
    if (std::scanf("%d", &n) != 1) {
      std::fprintf(stderr, "short lengths\n");
      return 2;
    }
  }
  std::vector<float> scores(static_cast<size_t>(rows * width));
  for (auto& x : scores) {
    unsigned u;
    if (std::scanf("%x", &u) != 1) {
      std::fprintf(stderr, "short input\n");
      return 2;
    }
    x = from_bits(u);
  }
  const int slices = slices_for(rows, width, sms);
  std::vector<int32_t> out(static_cast<size_t>(k));
  for (long long r = 0; r < rows; ++r) {
    // The kernels' row width: slices are planned for the full width, each row ranks its own length.
    const int64_t n = row_width(width, nlen ? lengths.data() : nullptr, r);
    const char* path = emulate_row(scores.data() + r * width, n, k, slices, out.data());
    std::fprintf(stderr, "row %lld slices %d %s\n", r, slices, path);
    if (path[0] == 'e') return 3;
    for (int j = 0; j < k; ++j) std::printf(j ? " %d" : "%d", out[j]);
    std::printf("\n");
  }
  return 0;
}

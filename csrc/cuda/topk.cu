// Top-k of float32 score rows for the indexer (see topk.cuh for the contract, docs/selection.md for
// the design and its expected pass counts). Every selection decision is a function of
// topk_select.cuh, shared with the host emulation csrc/cuda/topk_host_check.cpp.
//
// Three kernels per chunk of rows:
//  1. coarse_hist: grid (slices, rows): each CTA histograms the 12-bit coarse digit of its slice of
//     the row in shared memory and adds it to the row's global histogram. Several CTAs per row when
//     rows are few (decode), so a 4-row decode fills the GPU instead of 4 SMs.
//  2. coarse_collect: same grid; each CTA finds the threshold bin (the bin of the k-th largest key)
//     from the global histogram and appends its slice's scores above that bin (certainly selected,
//     fewer than k per row) and in that bin (candidates, at most kEqCap kept) to global buffers.
//  3. finish: one CTA per row sorts the selected + threshold-bin candidates (< 4096) in shared
//     memory as packed 64-bit keys and writes the first k. Appending order does not matter: the
//     packed key is a total order (score, then lower position). If the threshold bin holds more
//     than kEqCap scores (heavy ties, or scores within 1/8 of a binade), it instead refines that bin
//     exactly over the row: two 10-bit radix passes, then a collect pass that takes the tied k-th
//     keys in position order.
// Two reads of the row in the common case, five in the fallback, no host synchronisation.
#include "topk.cuh"
#include "topk_select.cuh"

namespace attention_cuda {
namespace {

using namespace topk_detail;

constexpr int kSliceThreads = 512;
constexpr int kFinishThreads = 1024;
constexpr int kFinishWarps = kFinishThreads / 32;
// Rows handled per launch chunk: bounds the workspace (48 KiB per row at k = 2048).
constexpr int64_t kChunkRows = 256;
// Per-row counters: [0] selected (above the threshold bin), [1] threshold-bin scores seen (may exceed
// kEqCap), [2] threshold digit, [3] unused (keeps the 64-bit buffers aligned).
constexpr int kCounters = 4;

struct Workspace {
  uint32_t* hist;               // rows x kCoarseBins
  uint32_t* counters;           // rows x kCounters
  unsigned long long* sel;      // rows x k
  unsigned long long* eq;       // rows x kEqCap
};

Workspace carve(void* base, int64_t rows, int k) {
  Workspace w;
  w.hist = static_cast<uint32_t*>(base);
  w.counters = w.hist + rows * kCoarseBins;
  w.sel = reinterpret_cast<unsigned long long*>(w.counters + rows * kCounters);
  w.eq = w.sel + rows * k;
  return w;
}

// Reserve consecutive slots in *counter for the lanes of a warp with `pred`; one atomic per warp.
__device__ __forceinline__ uint32_t warp_reserve(uint32_t* counter, bool pred, int lane) {
  const unsigned ballot = __ballot_sync(0xffffffffu, pred);
  uint32_t base = 0;
  if (lane == 0 && ballot != 0u) base = atomicAdd(counter, static_cast<uint32_t>(__popc(ballot)));
  base = __shfl_sync(0xffffffffu, base, 0);
  return base + static_cast<uint32_t>(__popc(ballot & ((1u << lane) - 1u)));
}

__global__ void __launch_bounds__(kSliceThreads)
coarse_hist_kernel(const float* __restrict__ scores, int64_t width, int64_t row_stride,
                   const int32_t* __restrict__ lengths, int k, int slices, uint32_t* __restrict__ hist_out) {
  __shared__ uint32_t hist[kCoarseBins];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int64_t r = blockIdx.y;
  const float* row = scores + r * row_stride;
  const int64_t n = row_width(width, lengths, r);
  if (n <= k) return;  // the finish takes the whole row (same n for the whole CTA: no barrier skipped)
  int64_t begin, end;
  slice_bounds(n, slices, static_cast<int>(blockIdx.x), &begin, &end);
  for (uint32_t i = static_cast<uint32_t>(tid); i < kCoarseBins; i += kSliceThreads) hist[i] = 0u;
  __syncthreads();
  // Scores of a row share their top bits, so lanes of a warp often hit the same bin: one atomic per
  // distinct digit in the warp (__match_any_sync) instead of 32 serialised ones.
  for (int64_t base = begin; base < end; base += kSliceThreads) {
    const int64_t i = base + tid;
    const bool valid = i < end;
    const uint32_t d = valid ? coarse_digit(order_key(row[i])) : 0xffffffffu;
    const unsigned same = __match_any_sync(0xffffffffu, d);
    if (valid && lane == __ffs(same) - 1) atomicAdd(&hist[d], static_cast<uint32_t>(__popc(same)));
  }
  __syncthreads();
  uint32_t* h = hist_out + r * kCoarseBins;
  for (uint32_t i = static_cast<uint32_t>(tid); i < kCoarseBins; i += kSliceThreads) {
    if (hist[i] != 0u) atomicAdd(&h[i], hist[i]);
  }
}

__global__ void __launch_bounds__(kSliceThreads)
coarse_collect_kernel(const float* __restrict__ scores, int64_t width, int64_t row_stride,
                      const int32_t* __restrict__ lengths, int slices, int k, Workspace w) {
  __shared__ uint32_t hist[kCoarseBins];
  __shared__ uint32_t gsum[kCoarseBins / kGroup];
  __shared__ uint32_t s_digit;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int64_t r = blockIdx.y;
  const float* row = scores + r * row_stride;
  const int64_t n = row_width(width, lengths, r);
  if (n <= k) return;  // as in coarse_hist_kernel
  for (uint32_t i = static_cast<uint32_t>(tid); i < kCoarseBins; i += kSliceThreads) hist[i] = w.hist[r * kCoarseBins + i];
  __syncthreads();
  if (static_cast<uint32_t>(tid) < kCoarseBins / kGroup) gsum[tid] = group_sum(hist, static_cast<uint32_t>(tid));
  __syncthreads();
  uint32_t* counters = w.counters + r * kCounters;
  if (tid == 0) {
    s_digit = find_threshold(hist, gsum, kCoarseBins, static_cast<uint32_t>(k)).digit;
    if (blockIdx.x == 0) counters[2] = s_digit;
  }
  __syncthreads();
  const uint32_t digit = s_digit;
  unsigned long long* sel = w.sel + r * k;
  unsigned long long* eq = w.eq + r * static_cast<int64_t>(kEqCap);
  int64_t begin, end;
  slice_bounds(n, slices, static_cast<int>(blockIdx.x), &begin, &end);
  for (int64_t base = begin; base < end; base += kSliceThreads) {
    const int64_t i = base + tid;
    const uint32_t key = i < end ? order_key(row[i]) : 0u;
    const int cls = i < end ? collect_class(key, digit) : 0;
    const uint32_t s = warp_reserve(&counters[0], cls == 1, lane);
    if (cls == 1) sel[s] = pack(key, static_cast<uint32_t>(i));  // s < above < k by construction
    const uint32_t e = warp_reserve(&counters[1], cls == 2, lane);
    if (cls == 2 && e < kEqCap) eq[e] = pack(key, static_cast<uint32_t>(i));
  }
}

__device__ void block_sort_desc(unsigned long long* cand, uint32_t n) {
  for (uint32_t size = 2; size <= n; size <<= 1) {
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (uint32_t t = threadIdx.x; t < (n >> 1); t += kFinishThreads) bitonic_compare(cand, t, size, stride);
      __syncthreads();
    }
  }
}

__global__ void __launch_bounds__(kFinishThreads)
finish_kernel(const float* __restrict__ scores, int64_t width, int64_t row_stride,
              const int32_t* __restrict__ lengths, int k, Workspace w, int32_t* __restrict__ out) {
  __shared__ unsigned long long cand[kCandCap];
  __shared__ uint32_t hist[kFineBins];
  __shared__ uint32_t gsum[kFineBins / kGroup];
  __shared__ uint32_t warp_count[kFinishWarps];
  __shared__ uint32_t s_prefix, s_remaining, s_eq_base, s_gt, s_done;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t r = blockIdx.x;
  const float* row = scores + r * row_stride;
  int32_t* dst = out + r * k;
  const uint32_t n = static_cast<uint32_t>(row_width(width, lengths, r));
  const uint32_t kk = static_cast<uint32_t>(k);
  uint32_t sort_n;

  if (n <= kk) {
    // The whole row is the answer (no workspace used); only its order is left to do.
    sort_n = next_pow2(kk);
    for (uint32_t i = static_cast<uint32_t>(tid); i < sort_n; i += kFinishThreads) {
      cand[i] = i < n ? pack(order_key(row[i]), i) : 0ull;  // 0 sorts last and reads as -1
    }
  } else {
    const uint32_t* counters = w.counters + r * kCounters;
    const uint32_t n_sel = counters[0], n_eq = counters[1];
    if (n_eq <= kEqCap) {
      // Refinement in shared memory: everything above the threshold bin plus the whole bin.
      const uint32_t total = n_sel + n_eq;
      sort_n = next_pow2(total > kk ? total : kk);
      const unsigned long long* sel = w.sel + r * k;
      const unsigned long long* eq = w.eq + r * static_cast<int64_t>(kEqCap);
      for (uint32_t i = static_cast<uint32_t>(tid); i < sort_n; i += kFinishThreads) {
        cand[i] = i < n_sel ? sel[i] : (i < total ? eq[i - n_sel] : 0ull);
      }
    } else {
      // The threshold bin overflowed kEqCap: radix-select the k-th key exactly inside it, over the row.
      sort_n = next_pow2(kk);
      uint32_t prefix = counters[2] << kCoarseShift;
      uint32_t mask = ~0u << kCoarseShift;
      uint32_t remaining = kk - n_sel;
      for (int pass = 0; pass < 2; ++pass) {
        const int shift = fine_shift(pass);
        for (uint32_t i = static_cast<uint32_t>(tid); i < kFineBins; i += kFinishThreads) hist[i] = 0u;
        __syncthreads();
        for (uint32_t i = static_cast<uint32_t>(tid); i < n; i += kFinishThreads) {
          const uint32_t key = order_key(row[i]);
          if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (kFineBins - 1)], 1u);
        }
        __syncthreads();
        if (static_cast<uint32_t>(tid) < kFineBins / kGroup) gsum[tid] = group_sum(hist, static_cast<uint32_t>(tid));
        __syncthreads();
        if (tid == 0) {
          const Threshold t = find_threshold(hist, gsum, kFineBins, remaining);
          s_prefix = prefix | (t.digit << shift);
          s_remaining = remaining - t.above;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= (kFineBins - 1) << shift;
        __syncthreads();  // s_prefix is rewritten by the next pass
      }
      // prefix is the k-th largest key; `remaining` keys equal to it are taken, lowest positions first.
      const uint32_t kth = prefix;
      const uint32_t take_eq = remaining;
      const uint32_t n_gt = kk - take_eq;  // exactly this many keys are > kth
      for (uint32_t i = static_cast<uint32_t>(tid); i < sort_n; i += kFinishThreads) cand[i] = 0ull;
      if (tid == 0) {
        s_eq_base = 0;
        s_gt = 0;
      }
      __syncthreads();
      const uint32_t lanes_below = (1u << lane) - 1u;
      for (uint32_t base = 0; base < n; base += kFinishThreads) {
        const uint32_t i = base + static_cast<uint32_t>(tid);
        const uint32_t key = i < n ? order_key(row[i]) : 0u;
        const bool gt = i < n && key > kth;
        const bool eq = i < n && key == kth;
        if (gt) cand[atomicAdd(&s_gt, 1u)] = pack(key, i);  // any order: sorted below
        // Equal keys need position order, so rank them by a block-wide prefix count in this tile.
        const uint32_t ballot = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) warp_count[warp] = static_cast<uint32_t>(__popc(ballot));
        __syncthreads();
        uint32_t rank = s_eq_base + static_cast<uint32_t>(__popc(ballot & lanes_below));
        for (int v = 0; v < warp; ++v) rank += warp_count[v];
        if (eq && rank < take_eq) cand[n_gt + rank] = pack(key, i);
        __syncthreads();
        if (tid == 0) {
          uint32_t t = 0;
          for (int v = 0; v < kFinishWarps; ++v) t += warp_count[v];
          s_eq_base += t;
          // Decided by one thread between barriers: every thread then reads the same value, while
          // s_gt itself may already be growing again in a faster thread's next tile.
          s_done = (s_eq_base >= take_eq && s_gt >= n_gt) ? 1u : 0u;
        }
        __syncthreads();
        if (s_done) break;
      }
    }
  }
  __syncthreads();
  block_sort_desc(cand, sort_n);
  for (int j = tid; j < k; j += kFinishThreads) dst[j] = unpack_index(cand[j]);
}

}  // namespace

size_t topk_workspace_bytes(int64_t rows, int k) {
  const int64_t chunk = rows < kChunkRows ? rows : kChunkRows;
  if (chunk <= 0 || k <= 0) return 0;
  return static_cast<size_t>(chunk) * (kCoarseBins * sizeof(uint32_t) + kCounters * sizeof(uint32_t) +
                                       (static_cast<size_t>(k) + kEqCap) * sizeof(unsigned long long));
}

cudaError_t topk_indices_f32(const float* scores, int64_t rows, int64_t width, int64_t row_stride,
                             const int32_t* lengths, int k, int32_t* out, void* workspace, size_t workspace_bytes,
                             int sms, cudaStream_t stream) {
  if (rows < 0 || width < 0 || width >= (int64_t{1} << 31) || k < 0 || k > kTopkMaxK || rows > 0x7fffffff ||
      sms < 1) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || k == 0) return cudaSuccess;
  const bool whole_row = width <= k;  // no selection needed, only the order: finish alone
  if (!whole_row && (workspace == nullptr || workspace_bytes < topk_workspace_bytes(rows, k))) {
    return cudaErrorInvalidValue;
  }
  const int slices = slices_for(rows, width, sms);
  for (int64_t r0 = 0; r0 < rows; r0 += kChunkRows) {
    const int64_t nr = rows - r0 < kChunkRows ? rows - r0 : kChunkRows;
    const float* s = scores + r0 * row_stride;
    const int32_t* len = lengths == nullptr ? nullptr : lengths + r0;
    Workspace w{};
    if (!whole_row) {
      w = carve(workspace, nr, k);
      // Histograms and counters of this chunk start at zero (the buffers are fully overwritten).
      cudaError_t e = cudaMemsetAsync(workspace, 0, static_cast<size_t>(nr) * (kCoarseBins + kCounters) * sizeof(uint32_t),
                                      stream);
      if (e != cudaSuccess) return e;
      const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(nr));
      coarse_hist_kernel<<<grid, kSliceThreads, 0, stream>>>(s, width, row_stride, len, k, slices, w.hist);
      coarse_collect_kernel<<<grid, kSliceThreads, 0, stream>>>(s, width, row_stride, len, slices, k, w);
    }
    finish_kernel<<<static_cast<unsigned>(nr), kFinishThreads, 0, stream>>>(s, width, row_stride, len, k, w,
                                                                            out + r0 * k);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace attention_cuda

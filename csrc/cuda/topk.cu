// Radix-select top-k, one thread block per row (see topk.cuh for the contract).
//
// Why radix select: a row of DeepSeek-V3.2's index scores at 128K context is 512 KiB, too big for
// shared memory, and k = 2048 is too big for per-thread heaps. Four 8-bit histogram passes over the
// row (in global memory, L2-resident after the first) find the k-th largest key exactly; one more pass
// collects the k winners - everything above the k-th key, plus the lowest positions among the keys
// equal to it - and a bitonic sort of those k in shared memory orders them. Work per row is
// 5 reads of the row, independent of k, with no global workspace.
//
// Keys: the score's bits made order-preserving as an unsigned int (sign flipped for positives, all
// bits flipped for negatives). Candidates are 64-bit (key << 32 | ~position) so that one integer
// order is "higher score, then lower position", exactly python_ref.selection.pack_keys.
#include "topk.cuh"

namespace attention_cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
// Sub-histograms: scores of one row share their top bits, so a single shared histogram serialises
// on a few bins; 8 copies (one per 4 warps) cut the atomic contention 8x for 8 KiB.
constexpr int kSubHists = 8;
constexpr uint32_t kNegInfKey = 0x007fffffu;  // order_key(-inf): keys at or below it are invalid

__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) x = -__int_as_float(0x7f800000);  // NaN counts as -inf
  x += 0.0f;                                     // -0.0 -> +0.0
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long pack(uint32_t key, uint32_t pos) {
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned long long>(0xffffffffu - pos);
}

__global__ void __launch_bounds__(kThreads)
topk_radix_kernel(const float* __restrict__ scores, int64_t width, int64_t row_stride, int k, int k_pad,
                  int32_t* __restrict__ out) {
  __shared__ unsigned long long cand[kTopkMaxK];
  __shared__ uint32_t hist[kSubHists][kBins];
  __shared__ uint32_t warp_count[kWarps];
  __shared__ uint32_t s_prefix, s_remaining, s_eq_base, s_gt, s_done;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const float* row = scores + static_cast<int64_t>(blockIdx.x) * row_stride;
  int32_t* dst = out + static_cast<int64_t>(blockIdx.x) * k;
  const uint32_t n = static_cast<uint32_t>(width);
  const uint32_t kk = static_cast<uint32_t>(k);

  for (int i = tid; i < k_pad; i += kThreads) cand[i] = 0ull;  // padding sorts last, reads as -1
  __syncthreads();

  if (n <= kk) {
    // The whole row is the answer; only its order is left to do.
    for (uint32_t i = static_cast<uint32_t>(tid); i < n; i += kThreads) cand[i] = pack(order_key(row[i]), i);
  } else {
    // ---- radix select of the k-th largest key, 8 bits at a time from the top ----
    uint32_t prefix = 0, mask = 0, remaining = kk;
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      for (int i = tid; i < kSubHists * kBins; i += kThreads) (&hist[0][0])[i] = 0;
      __syncthreads();
      uint32_t* h = hist[warp % kSubHists];
      for (uint32_t i = static_cast<uint32_t>(tid); i < n; i += kThreads) {
        const uint32_t key = order_key(row[i]);
        if ((key & mask) == prefix) atomicAdd(&h[(key >> shift) & (kBins - 1)], 1u);
      }
      __syncthreads();
      if (tid < kBins) {
        uint32_t c = 0;
        for (int s = 0; s < kSubHists; ++s) c += hist[s][tid];
        hist[0][tid] = c;
      }
      __syncthreads();
      if (tid == 0) {
        // Walk the digits from the largest: the k-th key's digit is where the count reaches `remaining`.
        uint32_t above = 0;
        int d = kBins - 1;
        for (; d > 0; --d) {
          if (above + hist[0][d] >= remaining) break;
          above += hist[0][d];
        }
        s_prefix = prefix | (static_cast<uint32_t>(d) << shift);
        s_remaining = remaining - above;
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= static_cast<uint32_t>(kBins - 1) << shift;
      __syncthreads();  // s_prefix is rewritten by the next pass
    }
    // prefix is now the k-th largest key; `remaining` keys equal to it are taken, lowest positions first.
    const uint32_t kth = prefix;
    const uint32_t take_eq = remaining;
    const uint32_t n_gt = kk - take_eq;  // exactly this many keys are > kth
    if (tid == 0) {
      s_eq_base = 0;
      s_gt = 0;
    }
    __syncthreads();
    const uint32_t lanes_below = (1u << lane) - 1u;
    for (uint32_t base = 0; base < n; base += kThreads) {
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
      for (int w = 0; w < warp; ++w) rank += warp_count[w];
      if (eq && rank < take_eq) cand[n_gt + rank] = pack(key, i);
      __syncthreads();
      if (tid == 0) {
        uint32_t t = 0;
        for (int w = 0; w < kWarps; ++w) t += warp_count[w];
        s_eq_base += t;
        // Decided by one thread between barriers: every thread then reads the same value, while
        // s_gt itself may already be growing again in a faster thread's next tile.
        s_done = (s_eq_base >= take_eq && s_gt >= n_gt) ? 1u : 0u;
      }
      __syncthreads();
      if (s_done) break;
    }
  }
  __syncthreads();

  // ---- bitonic sort of cand[0, k_pad) into descending order ----
  for (int size = 2; size <= k_pad; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < (k_pad >> 1); t += kThreads) {
        const int i = 2 * t - (t & (stride - 1));  // first element of the pair
        const int j = i + stride;
        const bool descending = (i & size) == 0;
        const unsigned long long a = cand[i], b = cand[j];
        if ((a < b) == descending) {
          cand[i] = b;
          cand[j] = a;
        }
      }
      __syncthreads();
    }
  }

  for (int j = tid; j < k; j += kThreads) {
    const unsigned long long c = cand[j];
    const uint32_t key = static_cast<uint32_t>(c >> 32);
    dst[j] = key > kNegInfKey ? static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(c & 0xffffffffull)) : -1;
  }
}

}  // namespace

cudaError_t topk_indices_f32(const float* scores, int64_t rows, int64_t width, int64_t row_stride, int k,
                             int32_t* out, cudaStream_t stream) {
  if (rows < 0 || width < 0 || width >= (int64_t{1} << 31) || k < 0 || k > kTopkMaxK || rows > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || k == 0) return cudaSuccess;
  int k_pad = 1;
  while (k_pad < k) k_pad <<= 1;
  if (k_pad < 2) k_pad = 2;
  topk_radix_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(scores, width, row_stride, k, k_pad, out);
  return cudaGetLastError();
}

}  // namespace attention_cuda

// Per-row top-k of float32 scores: coarse 12-bit histogram over several CTAs per row, then refinement
// in shared memory (docs/spec.md section 2: `topk_indices`; design in topk.cu and docs/selection.md).
//
// Raw pointers only, no torch headers (docs/style.md rule 1): the torch binding is topk_binding.cpp.
//
// Order contract, identical to python_ref.selection.pack_keys: valid (> -inf, not NaN) positions
// first, by descending score, equal scores by ascending position, then -1 padding. NaN counts as
// -inf and -0.0 as +0.0, so equal floats really are equal keys.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace attention_cuda {

// Largest k this kernel handles: fewer than k selected scores plus up to 2048 threshold-bin candidates
// are sorted in shared memory as 64-bit keys (4096 x 8 B = 32 KiB). DeepSeek-V3.2 selects 2048.
constexpr int kTopkMaxK = 2048;

// scores: rows x width float32, row r starting at scores + r * row_stride (elements).
// lengths: null, or rows int32: row r ranks only its positions [0, lengths[r]) (clamped to [0, width]).
// out: rows x k int32, contiguous. 0 <= k <= kTopkMaxK; 0 <= width < 2^31 (positions are int32).
// workspace: device memory of at least topk_workspace_bytes(rows, k) bytes (any content; may be null
// when width <= k); sms: the device's multiprocessor count (how many CTAs share a row).
// Asynchronous on `stream`; returns the launch error (cudaErrorInvalidValue for bad sizes).
size_t topk_workspace_bytes(int64_t rows, int k);
cudaError_t topk_indices_f32(const float* scores, int64_t rows, int64_t width, int64_t row_stride,
                             const int32_t* lengths, int k, int32_t* out, void* workspace, size_t workspace_bytes,
                             int sms, cudaStream_t stream);

}  // namespace attention_cuda

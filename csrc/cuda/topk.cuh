// Per-row top-k of float32 scores by radix select (SPEC.md section 2: `topk_indices`).
//
// Raw pointers only, no torch headers (STYLE.md rule 1): the torch binding is topk_binding.cpp.
//
// Order contract, identical to python_ref.selection.pack_keys: valid (> -inf, not NaN) positions
// first, by descending score, equal scores by ascending position, then -1 padding. NaN counts as
// -inf and -0.0 as +0.0, so equal floats really are equal keys.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace attention_cuda {

// Largest k this kernel handles: the k candidates are sorted in shared memory as 64-bit keys
// (2048 x 8 B = 16 KiB). DeepSeek-V3.2 selects 2048 positions.
constexpr int kTopkMaxK = 2048;

// scores: rows x width float32, row r starting at scores + r * row_stride (elements).
// out: rows x k int32, contiguous. 0 <= k <= kTopkMaxK; 0 <= width < 2^31 (positions are int32).
// Asynchronous on `stream`; returns the launch error (cudaErrorInvalidValue for bad sizes).
cudaError_t topk_indices_f32(const float* scores, int64_t rows, int64_t width, int64_t row_stride, int k,
                             int32_t* out, cudaStream_t stream);

}  // namespace attention_cuda

// Torch binding of the top-k (topk.cu). Kept apart from the kernel so the kernel compiles
// with nvcc alone (make cuda-check); this file needs torch's CUDA headers and is built by setup.py
// only where torch has CUDA (csrc/cuda/build_ext.py). attention/backends/cuda_topk.py loads it and
// registers it as the CUDA kernel of torch.ops.attention.topk_indices.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "topk.cuh"

namespace {

torch::Tensor topk_indices(const torch::Tensor& scores, int64_t k, const c10::optional<torch::Tensor>& lengths) {
  TORCH_CHECK(scores.is_cuda(), "scores must be a CUDA tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 2, "scores must be [T, W], got ", scores.sizes());
  TORCH_CHECK(scores.is_floating_point(), "scores must be a float tensor, got ", scores.scalar_type());
  TORCH_CHECK(k >= 0 && k <= attention_cuda::kTopkMaxK, "k must be in [0, ", attention_cuda::kTopkMaxK, "], got ", k);
  TORCH_CHECK(scores.size(1) < (int64_t{1} << 31), "scores must have fewer than 2^31 columns");
  const c10::cuda::CUDAGuard guard(scores.device());
  // The kernel reads float32 rows with unit column stride; other layouts/dtypes are converted once.
  torch::Tensor s = scores.scalar_type() == torch::kFloat32 ? scores : scores.to(torch::kFloat32);
  if (s.size(1) > 1 && s.stride(1) != 1) s = s.contiguous();
  auto out = torch::empty({s.size(0), 1, k}, s.options().dtype(torch::kInt32));
  const int64_t row_stride = s.size(0) > 1 ? s.stride(0) : s.size(1);
  // Per-row lengths as int32 on the scores' device (a device-side cast, no sync); the kernel clamps them.
  torch::Tensor len;
  if (lengths.has_value() && lengths->defined()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == s.size(0), "lengths must be [T] with T = ", s.size(0),
                ", got ", lengths->sizes());
    TORCH_CHECK(lengths->device() == s.device(), "lengths must be on the scores' device");
    len = lengths->to(torch::kInt32).contiguous();
  }
  // Histograms and candidate buffers of the multi-CTA passes (about 12 MiB at k = 2048, bounded by
  // the kernel's row chunk); the caching allocator makes this free after the first call.
  const size_t ws_bytes = attention_cuda::topk_workspace_bytes(s.size(0), static_cast<int>(k));
  auto ws = torch::empty({static_cast<int64_t>(ws_bytes)}, s.options().dtype(torch::kUInt8));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaError_t err = attention_cuda::topk_indices_f32(
      s.data_ptr<float>(), s.size(0), s.size(1), row_stride, len.defined() ? len.data_ptr<int32_t>() : nullptr,
      static_cast<int>(k), out.data_ptr<int32_t>(),
      ws_bytes ? ws.data_ptr() : nullptr, ws_bytes, sms, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "attention topk_indices kernel: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA C++ histogram + shared-memory refinement top-k (docs/spec.md section 2 topk_indices)";
  m.def("topk_indices", &topk_indices,
        "scores [T, W] -> [T, 1, k] int32 (descending, ties to lower position, -1 pad); lengths [T]: row t ranks "
        "positions [0, lengths[t]) only",
        pybind11::arg("scores"), pybind11::arg("k"), pybind11::arg("lengths") = pybind11::none());
  m.attr("max_k") = attention_cuda::kTopkMaxK;
}

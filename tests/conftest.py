import os

# Before anything imports triton: run Triton kernels on CPU tensors through the interpreter when
# this machine has no GPU (CI), and fill kernel outputs with NaN so an unwritten element fails.
try:
    import torch

    _has_gpu = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTENTION_NAN_FILL", "1")

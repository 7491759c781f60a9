"""Does torch's bf16 `linear` on this CPU sum each output over k-pairs in order, as `vdpbf16ps` does
(the order Switchyard's kernels follow, docs/model.md)? Prints, per batch size M, how many bf16 outputs
differ from that order. On an AVX512-BF16 CPU without AMX every M matches; on one with AMX, oneDNN
switches to `tdpbf16ps` for larger M and some outputs differ.

    python scripts/torch-bf16-order.py      # in the fixtures' environment (tests/fixtures/requirements.txt)
"""
import numpy as np
import torch

torch.manual_seed(0)
flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
print("torch", torch.__version__, "| CPU:", " ".join(f for f in flags if f.startswith(("avx512_bf16", "amx"))) or "no avx512_bf16/amx")
K, N = 1024, 64
for M in (1, 8, 64, 512):
    x = torch.randn(M, K).to(torch.bfloat16)
    w = torch.randn(N, K).to(torch.bfloat16)
    got = torch.nn.functional.linear(x, w).float().numpy()
    xf, wf = x.float().numpy(), w.float().numpy()
    # vdpbf16ps: per k-pair, the odd element's product then the even one's, each added with one f32
    # rounding (a product of two bf16 values is exact in f32).
    acc = np.zeros((M, N), np.float32)
    for i in range(K // 2):
        acc = acc + np.outer(xf[:, 2 * i + 1], wf[:, 2 * i + 1]).astype(np.float32)
        acc = acc + np.outer(xf[:, 2 * i], wf[:, 2 * i]).astype(np.float32)
    want = torch.from_numpy(acc).to(torch.bfloat16).float().numpy()
    print(f"M={M}: {(want != got).sum()} of {M * N} bf16 outputs differ from the vdpbf16ps order")

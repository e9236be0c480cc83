"""Which green-context splits can run cuBLAS GEMMs? `python3 bench/diag_green.py` (GPU machine)."""

from __future__ import annotations

import subprocess
import sys

CASE = r'''
import sys, torch
sys.path.insert(0, ".")
from actors.engine.partitioner import GreenContextPartitioner
n = int(sys.argv[1])
dev = torch.device("cuda")
shapes = [(torch.float16, 64, 1024, 256), (torch.bfloat16, 64, 1024, 256), (torch.bfloat16, 4096, 4096, 4096),
          (torch.bfloat16, 1, 6144, 4096)]
data = [(torch.randn(m, k, device=dev, dtype=dt), torch.randn(nn, k, device=dev, dtype=dt)) for dt, m, nn, k in shapes]
torch.cuda.synchronize()
p = GreenContextPartitioner(dev, splits=(n,))
out = []
for phase in ("prefill", "decode"):
    s = p.stream_for(phase)
    for (a, w), (dt, m, nn, k) in zip(data, shapes):
        try:
            with torch.cuda.stream(s):
                y = torch.nn.functional.linear(a, w)
            s.synchronize()
            out.append("ok")
        except Exception as e:
            out.append("FAIL")
print(n, p.actual_sms[n], " ".join(out), flush=True)
'''

for n in range(8, 128, 8):
    r = subprocess.run([sys.executable, "-c", CASE, str(n)], capture_output=True, text=True, timeout=120)
    print(r.stdout.strip() or f"{n} crashed: {r.stderr.strip()[-200:]}", flush=True)

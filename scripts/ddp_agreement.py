"""Print how far 2-process DDP is from one process on the tiny CoMAE of tests/test_comae.py:
the worst per-tensor relative error of the all-reduced gradients (parameters held fixed), the
same with each injected fault, and the parameters after 4 AdamW steps as a fraction of how far
training moved them. The tests hold these to 1e-4, > 1e-2 and 1e-2 (reasons in test_comae.py).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ddp_agreement.py
    # the AVX2-only kernels of another CPU family, on an AVX-512 machine:
    OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        .venv/bin/python scripts/ddp_agreement.py
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.test_comae as T  # noqa: E402 - the tests' own harness, so the figures are theirs

if __name__ == "__main__":
    d = Path(tempfile.mkdtemp())
    _, ref = T._recording_fit(d / "one", T.train_cfg(steps=4, ckpt_every=4), frozen=True)
    _, (g0, g1) = T._two_processes(d / "two", 4, True)
    same = all(torch.equal(a, b) for sa, sb in zip(g0, g1) for a, b in zip(sa, sb))
    print(f"gradient, clean: {T._worst_grad_error(ref, g0):.2e} (ranks bit-identical: {same})")
    for fault in T.FAULTS:
        _, (g0, _) = T._two_processes(d / fault, 4, True, fault)
        print(f"gradient, {fault}: {T._worst_grad_error(ref, g0):.2e}")
    start = T.tiny().state_dict()
    one, _ = T._fit(d / "p1", cfg=T.train_cfg(steps=4, ckpt_every=4))
    two, _ = T._two_processes(d / "p2", 4, False)
    ratio = max(float((two.state_dict()[k] - v).norm() / (v - start[k]).norm())
                for k, v in one.state_dict().items() if (v - start[k]).norm() > 0)
    print(f"parameters after 4 steps, |diff| / |moved|: {ratio:.2e}")

"""Triton last-dim argmax (hybridize.ops.argmax) against torch.argmax: ties inside and across chunks,
NaNs (the first one wins), all -inf rows, V not a multiple of the chunk, 16- and 32-bit rows, strided
rows; and the greedy step's `argmax_last` taking it. Without CUDA under TRITON_INTERPRET=1 (conftest)."""
import os

import pytest
import torch

pytest.importorskip("triton")

from hybridize.generate.sampling import argmax_last  # noqa: E402
from hybridize.ops import argmax as ops  # noqa: E402
from hybridize.ops.argmax import triton as kern  # noqa: E402

_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _CUDA else "cpu"
if not _CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)


def _rows(V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, V, generator=g).to(dtype)
    C = kern.CHUNK
    x[1, 3] = x[1, V - 1] = x[1, C + 7] = 50.0          # a tie across chunks: the first index wins
    x[2] = float("-inf")                                # all -inf: index 0
    x[3, C + 1] = x[3, 5] = float("nan")                # NaNs: the first one, whatever the values
    x[3, 0] = 1e4
    x[4, V - 1] = float("nan")                          # a NaN in the last, partial chunk
    x[5] = 0.0
    x[5, C] = -0.0                                      # signed zeros compare equal: index 0
    return x.to(DEVICE)


@pytest.mark.parametrize("V", [2 * kern.CHUNK, 2 * kern.CHUNK + 37, 3 * kern.CHUNK - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_matches_torch(V, dtype):
    x = _rows(V, dtype, seed=V)
    want = x.cpu().argmax(-1)
    assert torch.equal(kern.argmax_triton(x).cpu(), want)
    assert torch.equal(kern.argmax_triton(x[:, :V - 1]).cpu(), x[:, :V - 1].cpu().argmax(-1))   # strided rows
    assert torch.equal(kern.argmax_triton(x[3:4]).cpu(), want[3:4])                              # batch 1


def test_dispatch_and_argmax_last(monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    calls = []
    real = kern.argmax_triton
    monkeypatch.setattr(kern, "argmax_triton", lambda x: calls.append(x.shape) or real(x))
    x = _rows(2 * kern.CHUNK + 5, torch.bfloat16)
    want = x.cpu().argmax(-1)
    assert torch.equal(argmax_last(x).cpu(), want)
    assert torch.equal(ops.argmax(x.view(2, 3, -1)).cpu(), want.view(2, 3))
    assert len(calls) == 2
    assert torch.equal(ops.argmax(x[:, :100]).cpu(), x[:, :100].cpu().argmax(-1)) and len(calls) == 2  # short
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    assert torch.equal(argmax_last(x).cpu(), want) and len(calls) == 2       # the torch two-stage path


def test_bad_shape():
    with pytest.raises(ValueError, match="must be \\(B, V\\)"):
        kern.argmax_triton(torch.zeros(2, 0, device=DEVICE))

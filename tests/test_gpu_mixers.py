"""The mixer-level and model-level tests of the foundation issue, run with the Triton kernels switched on.

Two groups, each for every mixer (attention — with and without a sliding window —, Mamba-2 in the
standard and the Mamba-in-the-Llama layout, Mamba-1 in both layouts, Griffin's RG-LRU block, discrete
Mamba-2) and for whole `HybridLM`s of several presets (mil50, hawk, griffin, mamba2, and Llama-sized
models with Mamba-1 / discrete-Mamba-2 layers):

* kernels ON vs OFF (``HYBRIDIZE_KERNELS=1`` / ``0``) on the same weights and inputs: forward outputs of a
  packed batch (document boundaries) continuing from a non-zero state, final states, the gradients of
  every parameter, of the input and of the initial state, then a few decode steps (one token, and T
  tokens at once for attention) from the final state: outputs and states.
* the modes agree with the kernels ON (fp32): whole forward == two calls with the state carried ==
  token-by-token `step` (outputs and final states) at odd lengths 1, 63, 257; packed batch == documents
  one at a time (outputs, final state, parameter gradients); for HybridLM, prefill + cached decode ==
  full forward, and packed == separate documents.

Each test body runs at two sizes:

* ``tiny``: the foundation tests' sizes (few heads: under the interpreter every kernel program instance
  costs ~20 ms of Python), on CUDA when there is one, else on CPU with the kernels run by the Triton
  interpreter (TRITON_INTERPRET=1, set before triton is imported; ``HYBRIDIZE_KERNELS=1`` forces them
  onto CPU tensors) — this is what validates the test logic in CI. On CPU the costlier tiny variants
  (lengths 63 / 257, the mamba2 / Mamba-1 / discrete-Mamba-2 models) are ``slow`` (HYBRIDIZE_SLOW=1);
  with CUDA they all run.
* ``real`` (``gpu`` mark, CUDA only): real widths (hidden 1024-2048, 16-32 heads of 64-128, d_state
  16-128, ngroups > 1, `small` presets with 12-24 layers) and lengths (257 … 1100 tokens, beyond the
  local-attention windows), in fp32 and in bf16.

On the GPU machine: ``python -m pytest -q tests/test_gpu_mixers.py tests/test_kernels_*.py`` (CUDA is
detected: tiny and real variants all run; ``-m gpu`` keeps the real-shape ones only).

Tolerances (``_check``, ``_close``):

* fp32, kernels vs references: both compute in fp32 (the SSD kernel's dots use ``ieee`` precision, the
  decode-attention kernel too), so only the order of sums differs (~1e-7 relative measured at tiny
  sizes). Required: relative Frobenius error <= 1e-4 and relative max error (normalised by the largest
  |value| of the tensor) <= 1e-3 for every output, state and gradient — far below what an indexing,
  masking or document-boundary bug gives (O(1) errors).
* bf16 (real sizes): the kernels round intermediates to bf16 for tensor-core dots where the references
  compute in fp32 from the same bf16 inputs, so ON and OFF legitimately differ by O(2^-8). Both are
  therefore compared with the ground truth — the same model in fp32 with the references, on the same
  (bf16-rounded) weights, inputs and states — and the kernel path may not be much worse than the
  reference path in bf16: err_on <= 2 · err_off + 1e-2 (relative Frobenius; bf16's own resolution is
  2^-8 = 3.9e-3), and 3 · err_off + 3e-2 for gradients of 1-D parameters (biases, A_log, D, dt_bias, norm
  weights: sums over all tokens, where cancellation magnifies rounding). Measured at tiny sizes under the
  interpreter (RG-LRU, Mamba-1, attention; its bf16 conversion truncates, so it overstates the kernels'
  error): err_on 3e-3 … 1.1e-2 with err_off 1e-3 … 7e-3. Logic bugs are caught by the fp32 variants.
* modes with the kernels on (fp32): the foundation tests' tolerances at tiny sizes (rtol 1e-4, atol 1e-5;
  1e-4 for parameter gradients); at real sizes relative errors (Frobenius <= 1e-4, max <= 1e-3).
"""
import dataclasses
import math
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")      # read when triton decorates a kernel

pytest.importorskip("triton")

from hybridize.config import (  # noqa: E402
    AttentionConfig,
    DiscreteMamba2Config,
    Mamba1Config,
    Mamba2Config,
    RGLRUConfig,
    preset,
)
from hybridize.layers.attention import Attention  # noqa: E402
from hybridize.layers.discrete_mamba2 import DiscreteMamba2Mixer  # noqa: E402
from hybridize.layers.mamba1 import Mamba1Mixer  # noqa: E402
from hybridize.layers.mamba2 import Mamba2Mixer  # noqa: E402
from hybridize.layers.rglru import RGLRUBlock  # noqa: E402
from hybridize.model import HybridLM  # noqa: E402

TINY_DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

_GPU = pytest.mark.gpu
# Under the Triton interpreter every kernel program instance costs ~20 ms of Python: the heavier tiny
# variants are `slow` on CPU (HYBRIDIZE_SLOW=1 runs them); with CUDA every tiny variant runs.
_CPU_SLOW = () if _CUDA else (pytest.mark.slow,)


def _settings(names, fast=None):
    """(name, size, dtype) params: tiny fp32 (`slow` on CPU when `fast` is given and name is not in it),
    real fp32 and bf16 (gpu)."""
    out = []
    for n in names:
        out.append(pytest.param(n, "tiny", torch.float32, id=f"{n}-tiny-fp32",
                                marks=() if fast is None or n in fast else _CPU_SLOW))
        out.append(pytest.param(n, "real", torch.float32, id=f"{n}-real-fp32", marks=_GPU))
        out.append(pytest.param(n, "real", torch.bfloat16, id=f"{n}-real-bf16", marks=_GPU))
    return out


def _sizes(names, fast=None):
    out = []
    for n in names:
        marks = () if fast is None or n in fast else _CPU_SLOW
        out.append(pytest.param(n, "tiny", id=f"{n}-tiny", marks=marks))
        out.append(pytest.param(n, "real", id=f"{n}-real", marks=_GPU))
    return out


def _device(size):
    return TINY_DEVICE if size == "tiny" else "cuda"


# ------------------------------------------------------------------------------------------------ mixers
def _mixer_specs(size):
    """name → (constructor, hidden size). Tiny: the foundation tests' sizes (odd widths, ngroups > 1);
    real: model widths."""
    if size == "tiny":
        # few heads / channel blocks: under the interpreter every program instance costs ~20 ms
        return {
            "attention": (lambda: Attention(32, AttentionConfig(num_heads=4, num_kv_heads=2)), 32),
            "attention_window": (lambda: Attention(32, AttentionConfig(
                num_heads=6, num_kv_heads=2, head_dim=6, sliding_window=5)), 32),
            "mamba2": (lambda: Mamba2Mixer(24, Mamba2Config(d_state=8, headdim=6, expand=1, ngroups=2,
                                                            chunk_size=16, dt_limit=(0.0, 2.0))), 24),
            "mamba2_mil": (lambda: Mamba2Mixer(24, Mamba2Config(d_state=4, headdim=4, d_inner=16, d_xb=8,
                                                                ngroups=4, expand=1, chunk_size=16)), 24),
            "mamba1": (lambda: Mamba1Mixer(24, Mamba1Config(d_state=5, expand=1)), 24),
            "mamba1_mil": (lambda: Mamba1Mixer(24, Mamba1Config(d_state=4, d_inner=24, d_xb=8, num_heads=3)),
                           24),
            "rglru": (lambda: RGLRUBlock(24, RGLRUConfig(lru_width=32, num_heads=4)), 24),
            "discrete_mamba2": (lambda: DiscreteMamba2Mixer(24, DiscreteMamba2Config(
                d_state=8, n_qk_heads=2, n_v_heads=4, d_inner=24, chunk_size=16)), 24),
        }
    return {
        "attention": (lambda: Attention(2048, AttentionConfig(
            num_heads=16, num_kv_heads=4, head_dim=128)), 2048),
        "attention_window": (lambda: Attention(2048, AttentionConfig(
            num_heads=16, num_kv_heads=4, head_dim=128, sliding_window=128)), 2048),
        "mamba2": (lambda: Mamba2Mixer(1024, Mamba2Config(d_state=128, headdim=64, expand=2, ngroups=2,
                                                          chunk_size=64, dt_limit=(0.0, 2.0))), 1024),
        "mamba2_mil": (lambda: Mamba2Mixer(1024, Mamba2Config(d_state=64, headdim=64, d_inner=1024, d_xb=256,
                                                              ngroups=16, expand=1, chunk_size=64)), 1024),
        "mamba1": (lambda: Mamba1Mixer(1024, Mamba1Config(d_state=16, expand=2)), 1024),
        "mamba1_mil": (lambda: Mamba1Mixer(1024, Mamba1Config(
            d_state=64, d_inner=1024, d_xb=256, num_heads=16)), 1024),
        "rglru": (lambda: RGLRUBlock(1024, RGLRUConfig(lru_width=1024, num_heads=16)), 1024),
        "discrete_mamba2": (lambda: DiscreteMamba2Mixer(1024, DiscreteMamba2Config(
            d_state=64, n_qk_heads=8, n_v_heads=32, d_inner=2048, chunk_size=64)), 1024),
    }


MIXERS = list(_mixer_specs("tiny"))


@torch.no_grad()
def _randomize(m, seed):
    """Perturb every parameter the init sets to a constant (D = 1, norm weights 1, zero biases), and the
    SSM / decay parameters, so that no term of the computation can hide behind a constant."""
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        if p.numel() > 1 and p.std() == 0:                       # ones (D, norms) / zeros (biases)
            p.add_(0.3 * noise)
        elif name.split(".")[-1] in ("A_log", "dt_bias", "recurrent_param") or name.endswith("dt_proj.bias"):
            p.add_(0.1 * noise)
    return m


def _build_mixer(name, size, dtype=torch.float32, seed=0):
    ctor, hidden = _mixer_specs(size)[name]
    torch.manual_seed(seed)
    m = _randomize(ctor(), seed).to(_device(size))
    return m.to(dtype), hidden


def _fields(st):
    return [f.name for f in dataclasses.fields(st)]


def _state_copy(st, requires_grad=False):
    """A copy of a mixer state; its floating tensors as fresh leaves (requires_grad) when asked."""
    kw = {}
    for f in _fields(st):
        v = getattr(st, f)
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if requires_grad and v.is_floating_point():
                v.requires_grad_(True)
        kw[f] = v
    return type(st)(**kw)


def _state_tensors(st, floating_only=True):
    return {f: getattr(st, f) for f in _fields(st) if isinstance(getattr(st, f), torch.Tensor)
            and (getattr(st, f).is_floating_point() or not floating_only)}


def _random_state(m, B, capacity, device, seed):
    """A non-zero state: random floating tensors, per-row lengths (row 0 fresh, the others continue)."""
    st = m.init_state(B, max_seqlen=capacity, device=device)
    g = torch.Generator().manual_seed(seed)
    for f, v in _state_tensors(st, floating_only=False).items():
        if v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=g).to(v.dtype) * 0.5)
        else:                                                    # lengths
            v.copy_(torch.tensor([0] + [3 + 4 * b for b in range(1, B)], dtype=v.dtype))
    return st


def _packed_seq_idx(B, L, device, seed):
    """(B, L) document ids: row 0 has cuts at fixed awkward places (1, L//3, L-1), the others random."""
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        cuts = [1, L // 3, L - 1] if b == 0 else torch.randint(1, max(L, 2), (2,), generator=g).tolist()
        for c in sorted(set(cuts)):
            if 0 < c < L:
                s[b, c:] += 1
    return s.to(device)


def _run_mixer(m, x, st0, seq_idx, gy, gst, n_steps, xs_dec):
    """Forward (packed, from st0) + backward, then decode steps from the final state. Returns a dict of
    tensors to compare (outputs, states, every gradient)."""
    params = dict(m.named_parameters())
    xl = x.detach().clone().requires_grad_(True)
    st = _state_copy(st0, requires_grad=True)
    leaves = _state_tensors(st)
    y, fin = m(xl, st, seq_idx=seq_idx)
    fin_t = _state_tensors(fin)
    loss = (y.float() * gy).sum() + sum((fin_t[f].float() * gst[f]).sum() for f in gst)
    names = list(params) + ["x"] + [f"state0.{f}" for f in leaves]
    grads = torch.autograd.grad(loss, list(params.values()) + [xl] + list(leaves.values()), allow_unused=True)
    out = {"y": y, **{f"final.{f}": v for f, v in _state_tensors(fin, False).items()}}
    out.update({f"d{n}": g for n, g in zip(names, grads) if g is not None})
    # decode from the final state: single tokens, then (attention) T tokens at once
    st = _state_copy(fin)
    with torch.no_grad():
        for t in range(n_steps):
            out[f"step{t}"] = m.step(xs_dec[:, t], st)
        if hasattr(m, "step_tokens"):
            out["step_tokens"] = m.step_tokens(xs_dec[:, n_steps:], st)
    out.update({f"decoded.{f}": v for f, v in _state_tensors(st, False).items()})
    return out


def _rel(got, want):
    g, w = got.double(), want.double()
    fro = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
    mx = ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() if w.numel() else 0.0
    return fro, mx


def _check(on, off, dtype, truth=None, one_d=()):
    """fp32: ON ≈ OFF (relative Frobenius <= 1e-4, relative max <= 1e-3). bf16: ON is not much worse
    than OFF against the fp32 truth (see the module docstring)."""
    assert on.keys() == off.keys(), (sorted(on), sorted(off))
    bad = []
    for k in on:
        a, b = on[k], off[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        if not a.is_floating_point():
            if not torch.equal(a, b):
                bad.append(f"{k}: integer tensors differ")
            continue
        if dtype == torch.float32:
            fro, mx = _rel(a, b)
            if fro > 1e-4 or mx > 1e-3:
                bad.append(f"{k}: relative Frobenius {fro:.3g} (<= 1e-4), max {mx:.3g} (<= 1e-3)")
        else:
            e_on, e_off = _rel(a, truth[k])[0], _rel(b, truth[k])[0]
            slack, floor = (3.0, 3e-2) if k in one_d else (2.0, 1e-2)
            if e_on > slack * e_off + floor:
                bad.append(f"{k}: kernels {e_on:.3g} vs references {e_off:.3g} (relative Frobenius to fp32; "
                           f"allowed {slack:g} x + {floor:g})")
    assert not bad, "\n".join(bad)


def _one_d_grads(m):
    return {f"d{n}" for n, p in m.named_parameters() if p.dim() <= 1}


# batch, length (odd, several chunks / time tiles, beyond the 128-token window), decode steps, tokens of
# the multi-token attention step
_MIXER_RUN = {"tiny": (2, 21, 2, 2), "real": (2, 1031, 4, 4)}


@pytest.mark.parametrize(("name", "size", "dtype"), _settings(MIXERS))
def test_mixer_kernels_match_references(name, size, dtype, monkeypatch):
    """Kernels ON vs OFF: packed forward from a non-zero state, final state, every gradient, decode."""
    device = _device(size)
    m, hidden = _build_mixer(name, size, dtype)
    B, L, n_steps, T = _MIXER_RUN[size]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, hidden, generator=g).to(device, dtype)
    xs_dec = torch.randn(B, n_steps + T, hidden, generator=g).to(device, dtype)
    seq_idx = _packed_seq_idx(B, L, device, seed=2)
    st0 = _random_state(m, B, L + 16 + n_steps + T, device, seed=3)
    # output gradients, rounded to the activation dtype (the same numbers for every run)
    gy = torch.randn(B, L, hidden, generator=g).to(device, dtype).float()
    # a gradient on every floating tensor of the final state (recurrent states keep their shapes; the
    # final KV cache gets none: its keys and values reach the loss through y)
    gst = {} if name.startswith("attention") else \
        {f: torch.randn(v.shape, generator=g).to(device) for f, v in _state_tensors(st0).items()}
    args = (x, st0, seq_idx, gy, gst, n_steps, xs_dec)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    on = _run_mixer(m, *args)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    off = _run_mixer(m, *args)
    truth = None
    if dtype != torch.float32:
        m32 = _build_mixer(name, size, torch.float32)[0]
        m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        st32 = _state_copy(st0)
        for f, v in _state_tensors(st32).items():
            setattr(st32, f, v.float())
        truth = _run_mixer(m32, x.float(), st32, seq_idx, gy, gst, n_steps, xs_dec.float())
    _check(on, off, dtype, truth, _one_d_grads(m))


# ---------------------------------------------------------------- modes agree with the kernels on (fp32)
def _close(a, b, size, grad=False):
    if size == "tiny":
        tol = 1e-4 if grad else 1e-5
        torch.testing.assert_close(a, b, rtol=1e-4, atol=tol)
    else:
        fro, mx = _rel(a, b)
        assert fro <= 1e-4 and mx <= 1e-3, f"relative Frobenius {fro:.3g}, max {mx:.3g}"


def _close_states(s1, s2, size):
    t1, t2 = _state_tensors(s1, False), _state_tensors(s2, False)
    for f in t1:
        if t1[f].is_floating_point():
            _close(t1[f], t2[f], size)
        else:
            assert torch.equal(t1[f], t2[f]), f


def _lengths():
    out = []
    for n in MIXERS:
        for L, marks in ((1, ()), (19, ()), (63, _CPU_SLOW), (257, _CPU_SLOW)):
            out.append(pytest.param(n, "tiny", L, id=f"{n}-tiny-L{L}", marks=marks))
        for L in (1, 63, 257):
            out.append(pytest.param(n, "real", L, id=f"{n}-real-L{L}", marks=_GPU))
    return out


@pytest.mark.parametrize(("name", "size", "L"), _lengths())
def test_mixer_whole_split_step_agree(name, size, L, monkeypatch):
    """Kernels on: one call == two calls with the state carried == token-by-token steps (outputs and
    final states), and prefill + decode == the whole forward."""
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    device = _device(size)
    m, hidden = _build_mixer(name, size)
    m.eval()
    B = 2
    x = torch.randn(B, L, hidden, generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        y, st = m(x, m.init_state(B, max_seqlen=L, device=device))
        if L > 1:                                  # two calls, the state carried
            cut = (2 * L) // 3
            s2 = m.init_state(B, max_seqlen=L, device=device)
            ya, s2 = m(x[:, :cut], s2)
            yb, s2 = m(x[:, cut:], s2)
            _close(torch.cat([ya, yb], 1), y, size)
            _close_states(s2, st, size)
        s3 = m.init_state(B, max_seqlen=L, device=device)
        ys = torch.stack([m.step(x[:, t], s3) for t in range(L)], 1)
        _close(ys, y, size)
        _close_states(s3, st, size)
        if L > 1:                                  # prefill, then decode the rest
            s4 = m.init_state(B, max_seqlen=L, device=device)
            yp, s4 = m(x[:, :L - 5], s4)
            yd = torch.stack([m.step(x[:, t], s4) for t in range(max(L - 5, 0), L)], 1)
            _close(torch.cat([yp, yd], 1), y, size)
            _close_states(s4, st, size)


_PACKED_LENS = {"tiny": [4, 1, 7], "real": [100, 1, 400, 2, 258]}     # documents of one packed row


@pytest.mark.parametrize(("name", "size"), _sizes(MIXERS))
def test_mixer_packed_equals_separate_documents(name, size, monkeypatch):
    """Kernels on: a packed row (seq_idx) == its documents run one at a time — outputs, the final state
    (the last document's) and every parameter gradient."""
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    device = _device(size)
    m, hidden = _build_mixer(name, size)
    lens = _PACKED_LENS[size]
    L = sum(lens)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, L, hidden, generator=g).to(device)
    w = torch.randn(1, L, hidden, generator=g).to(device)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].to(device)
    params = list(m.parameters())
    y, st = m(x, m.init_state(1, max_seqlen=L, device=device), seq_idx=seq_idx)
    g_packed = torch.autograd.grad((y * w).sum(), params, allow_unused=True)
    outs, loss, s = [], 0.0, 0
    for n in lens:
        yd, st_d = m(x[:, s:s + n], m.init_state(1, max_seqlen=L, device=device))
        outs.append(yd)
        loss = loss + (yd * w[:, s:s + n]).sum()
        s += n
    g_sep = torch.autograd.grad(loss, params, allow_unused=True)
    _close(y, torch.cat(outs, 1), size)
    if not isinstance(m, Attention):      # the cache's capacity depends on the call; compare contents below
        _close_states(st, st_d, size)
    else:
        n = lens[-1]
        for f in ("k", "v"):
            _close(getattr(st, f)[:, :, :n], getattr(st_d, f)[:, :, :n], size)
        assert torch.equal(st.lengths, st_d.lengths)
    for (pn, _), a, b in zip(m.named_parameters(), g_packed, g_sep):
        assert (a is None) == (b is None), pn
        if a is not None:
            _close(a, b, size, grad=True)


# ------------------------------------------------------------------------------------------------ HybridLM
def _model_cfg(family, size):
    """Presets at `small` size (real) or `debug` size cut to 2-3 layers (tiny) — the interpreter's cost
    grows with every layer; the mix of mixer kinds is kept. Mamba-1 and discrete Mamba-2 in Llama-sized
    models with one attention layer."""
    sz = "debug" if size == "tiny" else "small"
    if family == "mamba1_mix":
        return preset(f"llama-{sz}", layer_pattern=["mamba1", "attention", "mamba1"])
    if family == "dm2_mix":
        return preset(f"llama-{sz}", layer_pattern=["discrete_mamba2", "attention", "discrete_mamba2"])
    cfg = preset(f"{family}-{sz}")
    if size == "tiny":
        cut = {"mil50": 2, "hawk": 2, "griffin": 3, "mamba2": 2}[family]
        cfg.layer_pattern = cfg.layer_pattern[:cut]
    return cfg


FAMILIES = ["mil50", "hawk", "griffin", "mamba2", "mamba1_mix", "dm2_mix"]
# tiny variants that run by default on CPU (the others are `slow` there)
FAST_FAMILIES = {"griffin", "hawk", "mil50"}


def _build_model(family, size, dtype=torch.float32):
    torch.manual_seed(0)
    model = HybridLM(_model_cfg(family, size))
    for i, blk in enumerate(model.layers):
        _randomize(blk.mixer, seed=10 + i)
    return model.to(_device(size), dtype)


def _run_model(model, ids, seq_idx, n_steps):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, seq_idx=seq_idx)
    out.loss.backward()
    res = {"logits": out.logits, "loss": out.loss}
    res.update({f"d{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    B, L = ids.shape
    with torch.no_grad():
        cache = model.init_cache(B, max_seqlen=L + n_steps)
        res["prefill"] = model(ids[:, :L - n_steps], cache=cache).logits
        for t in range(L - n_steps, L):
            res[f"step{t}"] = model.step(ids[:, t], cache)
    return res


# batch, length (longer than the local-attention windows: 16 at debug size, 1024 at small), decode steps
_MODEL_RUN = {"tiny": (2, 25, 3), "real": (2, 1100, 6)}


@pytest.mark.parametrize(("family", "size", "dtype"), _settings(FAMILIES, FAST_FAMILIES))
def test_model_kernels_match_references(family, size, dtype, monkeypatch):
    """HybridLM, kernels ON vs OFF: logits and loss of a packed batch, every parameter gradient, and
    prefill + cached decode logits."""
    device = _device(size)
    model = _build_model(family, size, dtype)
    B, L, n_steps = _MODEL_RUN[size]
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, model.cfg.vocab_size, (B, L), generator=gen).to(device)
    seq_idx = _packed_seq_idx(B, L, device, seed=7)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    on = _run_model(model, ids, seq_idx, n_steps)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    off = _run_model(model, ids, seq_idx, n_steps)
    truth = None
    if dtype != torch.float32:
        m32 = _build_model(family, size)
        m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        truth = _run_model(m32, ids, seq_idx, n_steps)
    _check(on, off, dtype, truth, {f"d{n}" for n, p in model.named_parameters() if p.dim() <= 1})


# length, prefill split, second prefill chunk (then token-by-token to the end), packed document lengths
_MODEL_MODES = {"tiny": (25, 13, 5, [7, 1, 12]), "real": (1100, 700, 64, [300, 1, 700])}


@pytest.mark.parametrize(("family", "size"), _sizes(FAMILIES, FAST_FAMILIES))
def test_model_cached_decode_and_packing_with_kernels(family, size, monkeypatch):
    """Kernels on (fp32): prefill in two chunks + token-by-token decode == the full forward; a packed
    row == its documents one at a time."""
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    device = _device(size)
    model = _build_model(family, size).eval()
    L, split, chunk, lens = _MODEL_MODES[size]
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, model.cfg.vocab_size, (2, L), generator=g).to(device)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.init_cache(2, max_seqlen=L)
        a = model(ids[:, :split], cache=cache).logits
        b = model(ids[:, split:split + chunk], cache=cache).logits
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(split + chunk, L)], 1)
    _close(a, full[:, :split], size)
    _close(b, full[:, split:split + chunk], size)
    _close(steps, full[:, split + chunk:], size)

    docs = [torch.randint(0, model.cfg.vocab_size, (1, n), generator=g).to(device) for n in lens]
    seq_idx = torch.cat([torch.full((1, n), i) for i, n in enumerate(lens)], 1).to(device)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), seq_idx=seq_idx).logits
        sep = torch.cat([model(d).logits for d in docs], 1)
    _close(packed, sep, size)


def test_tiny_runs_the_kernels(monkeypatch):
    """Guard: with HYBRIDIZE_KERNELS=1 the tiny tests really go through the Triton kernels (through the
    interpreter on CPU), not silently through the references."""
    import hybridize.ops.ssd.triton as ssd_triton

    calls = []
    real = ssd_triton.ssd_chunked_triton
    monkeypatch.setattr(ssd_triton, "ssd_chunked_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    m, hidden = _build_mixer("mamba2", "tiny")
    with torch.no_grad():
        y, _ = m(torch.randn(1, 5, hidden, device=_device("tiny")))
    assert calls, "the SSD kernel was not called"
    assert math.isfinite(float(y.sum()))

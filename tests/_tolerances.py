"""Error measures shared by the real-shape kernel tests (GPU): relative errors normalised by the
reference's norm / largest magnitude, so one bound serves tensors of any scale."""
import torch


def rel_errors(got, want) -> tuple:
    """(relative Frobenius error, relative max error) of got vs want, both in fp32."""
    g, w = got.float(), want.float()
    fro = ((g - w).norm() / w.norm().clamp_min(1e-12)).item()
    mx = ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
    return fro, mx


def assert_real(name, got, want, low_precision, *, fro_tol=1e-2, max_tol=1e-4):
    """16-bit: relative Frobenius ≤ fro_tol (one rounding per element averages out); fp32: relative max
    ≤ max_tol (summation order only; a wrong index or mask gives O(1))."""
    fro, mx = rel_errors(got, want)
    if low_precision:
        assert fro <= fro_tol, f"{name}: relative Frobenius error {fro:.3g} > {fro_tol} (max {mx:.3g})"
    else:
        assert mx <= max_tol, f"{name}: relative max error {mx:.3g} > {max_tol} (Frobenius {fro:.3g})"


def compare_grads(got: dict, want: dict, dtype, reduced=(), *, fp32_max=1e-3, bf16_fro=2e-2, reduced_fro=5e-2):
    """Every tensor of `want` (outputs, states, gradients by name) vs `got`; names in `reduced` are
    gradients summed over all tokens (cancellation: looser 16-bit bound)."""
    for k in want:
        fro, mx = rel_errors(got[k], want[k])
        if dtype == torch.float32:
            assert mx <= fp32_max, f"{k}: relative max error {mx:.3g} (Frobenius {fro:.3g})"
        else:
            tol = reduced_fro if k in reduced else bf16_fro
            assert fro <= tol, f"{k}: relative Frobenius error {fro:.3g} > {tol} (max {mx:.3g})"

"""Gated linear recurrence scan of the RG-LRU. Dispatch: the Triton kernels on CUDA (see `triton.py`),
else the PyTorch reference (`reference.py`). The kernel module is imported lazily: triton reads
TRITON_INTERPRET when a kernel module is first imported."""
from hybridize.ops._dispatch import use_kernels
from hybridize.ops.rglru import reference

rglru_scan_reference = reference.rglru_scan
rglru_step_reference = reference.rglru_step


def rglru_scan(x, a, *, initial_state=None, reset=None, return_final_state=True):
    """h_t = a_t * h_{t-1} + x_t with resets; see `reference.rglru_scan` for shapes."""
    if use_kernels(x, a, initial_state, reset):
        from hybridize.ops.rglru.triton import rglru_scan_triton
        return rglru_scan_triton(x, a, initial_state=initial_state, reset=reset,
                                 return_final_state=return_final_state)
    return reference.rglru_scan(x, a, initial_state=initial_state, reset=reset,
                                return_final_state=return_final_state)


def rglru_step(x, a, state):
    """One step, state (B, C) updated in place; see `reference.rglru_step`."""
    if use_kernels(x, a, state):
        from hybridize.ops.rglru.triton import rglru_step_triton
        return rglru_step_triton(x, a, state)
    return reference.rglru_step(x, a, state)


__all__ = ["rglru_scan", "rglru_step", "rglru_scan_reference", "rglru_step_reference"]

"""Fused input projections for inference: the nn.Linear layers of a module that read the same input
(attention's q/k/v, the gated MLP's gate/up, the RG-LRU block's two branches) run as one matmul.

Why: at batch-1 decode every projection is a GEMV, and a small matrix reaches only a fraction of HBM
bandwidth (H100 profile: ~47 % for q / o, ~13 % for GQA's k / v). One (ΣN_i) × D matmul reads them all
at the rate of a big one.

How (`FusedProjections.fuse_projections_`): one (ΣN_i, D) tensor per module holds the weights (and one
(ΣN_i,) tensor the biases); the existing Parameters are re-pointed at row slices of it
(``param.data = fused[a:b]``). Hence:

* no extra memory; the Parameters keep their identity (optimizers, hooks), state_dict keys and values,
  and checkpoints are unchanged (HF names q_proj / k_proj / …);
* in-place writes to the Parameters (``load_state_dict``, optimizer steps, ``init``) land in the fused
  tensor, which is a plain attribute: not a buffer, not in the state_dict. ``save_pretrained``,
  ``torch.save`` and safetensors' ``save_file(model.state_dict())`` save the usual tensors; safetensors'
  ``save_model`` / ``load_model`` refuse Parameters that are views of a bigger tensor (any model's):
  ``unfuse_projections_()`` first;
* the fused matmul runs when no gradient is wanted for the Parameters (``no_grad`` / ``inference_mode``,
  or frozen Parameters); with autograd on them, the separate Linears run on the same storage, so
  training after fusion computes the same gradients as before.

Staleness: whatever gives a Parameter new storage would leave the fused tensor behind. ``.to()`` /
``.half()`` / ``.cuda()`` / ``to_empty()`` (all through `_apply`), ``load_state_dict(assign=True)``
(a post-hook) and deepcopy / pickling (``__setstate__``) re-fuse from the Parameters. Anything else
(``param.data = …`` by hand, FSDP flattening) is detected by eager calls (storage pointers: a warning,
then the separate Linears, which read the Parameters) and repaired by the next ``fuse_projections_()``
(the generation engine calls it at setup). Compiled code (torch.compile) does not check: fuse, then
compile.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from hybridize.ops.gemv import fused_linear
from hybridize.ops.gemv import linear as gemv_linear

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


@dataclass
class _Fused:
    """weight (ΣN_i, D), bias (ΣN_i,) or None, sizes N_i, and the data pointers of the fused Parameters
    (weights, then biases, in `_fused_names` order) right after fusing: a Parameter whose pointer
    differs has been given other storage."""
    weight: Tensor
    bias: Optional[Tensor]
    sizes: tuple
    ptrs: tuple


def _refuse_after_load(module, incompatible_keys) -> None:
    """load_state_dict post-hook: ``assign=True`` replaces the Parameters; fuse the new ones."""
    if module._fused is not None and not module._fusion_valid():
        module._fused = None
        module.fuse_projections_()


class FusedProjections:
    """Mixin for an nn.Module whose nn.Linear children named in ``_fused_names`` read the same input
    (same in_features, dtype, device; all with a bias or none). List it before the nn.Module base.
    ``_project(x)`` returns their outputs, from one matmul once `fuse_projections_` ran."""

    _fused_names: tuple = ()
    _fused: Optional[_Fused] = None          # instances set their own in fuse_projections_

    def _fused_linears(self) -> list:
        return [getattr(self, n) for n in self._fused_names]

    def _fused_params(self) -> list:
        lins = self._fused_linears()
        return [lin.weight for lin in lins] + [lin.bias for lin in lins if lin.bias is not None]

    def _fusion_valid(self) -> bool:
        """Whether every fused Parameter still is the slice of the fused tensor it was made (host only)."""
        f = self._fused
        if f is None:
            return False
        params = self._fused_params()
        dev = f.weight.device
        return len(params) == len(f.ptrs) and all(p.data_ptr() == e and p.device == dev
                                                  for p, e in zip(params, f.ptrs))

    @torch.no_grad()
    def fuse_projections_(self):
        """Put the `_fused_names` weights (and biases) into one tensor and re-point the Parameters at its
        slices (see the module docstring). Idempotent; re-fuses when the Parameters got new storage.
        Transient memory: one copy of this module's fused weights. Returns self."""
        if self._fused is not None and self._fusion_valid():
            return self
        lins = self._fused_linears()
        ws = [lin.weight for lin in lins]
        if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
            raise ValueError(f"{type(self).__name__}: cannot fuse {self._fused_names}: their weights differ in "
                             f"dtype / device / in_features {[(w.dtype, w.device, w.shape[1]) for w in ws]}")
        biased = [lin.bias is not None for lin in lins]
        if any(biased) and not all(biased):
            raise ValueError(f"{type(self).__name__}: cannot fuse {self._fused_names}: only some have a bias")
        self._fused = None                                    # drop the stale tensor before allocating
        weight = torch.cat([w.detach() for w in ws])
        bias = torch.cat([lin.bias.detach() for lin in lins]) if all(biased) else None
        sizes, off = [], 0
        for lin in lins:
            n = lin.weight.shape[0]
            lin.weight.data = weight[off:off + n]             # same Parameter object, storage of `weight`
            if bias is not None:
                lin.bias.data = bias[off:off + n]
            sizes.append(n)
            off += n
        self._fused = _Fused(weight, bias, tuple(sizes), tuple(p.data_ptr() for p in self._fused_params()))
        if not getattr(self, "_fusion_hooked", False):
            self.register_load_state_dict_post_hook(_refuse_after_load)
            self._fusion_hooked = True
        return self

    @torch.no_grad()
    def unfuse_projections_(self):
        """Give every Parameter its own storage again (values kept) and drop the fused tensor. Returns self."""
        if self._fused is not None:
            for p in self._fused_params():
                p.data = p.data.clone()
            self._fused = None
        return self

    def projections_fused(self) -> bool:
        """Whether the fused matmul serves inference calls (fused and not stale)."""
        return self._fusion_valid()

    def _inference_fused(self) -> Optional[_Fused]:
        """The fused tensors if they serve this call (fused, not stale, no gradient wanted), else None."""
        f = self._fused
        if f is None or (torch.is_grad_enabled() and any(p.requires_grad for p in self._fused_params())):
            return None
        if not _is_compiling() and not self._fusion_valid():
            warnings.warn(f"{type(self).__name__}: the fused projections {self._fused_names} are stale (a "
                          "Parameter was given new storage); using the separate Linears. Call "
                          "fuse_projections_() again to re-fuse.", stacklevel=4)
            return None
        return f

    def _project(self, x: Tensor, norm: Optional[torch.nn.Module] = None) -> tuple:
        """x (..., D) → the outputs (..., N_i) of the `_fused_names` Linears applied to ``norm(x)`` (or x),
        in that order: one matmul (split views of its output) when fused and no gradient is wanted for the
        Parameters; at batch-1 decode the RMSNorm runs inside that GEMV (`hybridize.ops.gemv.fused_linear`)."""
        f = self._inference_fused()
        if f is None:
            x = x if norm is None else norm(x)
            return tuple(lin(x) for lin in self._fused_linears())
        if norm is not None:
            return fused_linear(x, f.weight, f.bias, norm=norm).split(f.sizes, dim=-1)
        return gemv_linear(x, f.weight, f.bias).split(f.sizes, dim=-1)   # F.linear unless batch-1 decode

    # ------------------------------------------------------------------ keep the fused tensor in sync
    def _apply(self, fn, recurse=True):
        """.to() / .half() / .cuda() / to_empty(): the Parameters get new storage; fuse those."""
        out = super()._apply(fn, recurse)
        if self._fused is not None and not self._fusion_valid():
            self._fused = None
            self.fuse_projections_()
        return out

    def __getstate__(self):
        # deepcopy clones each Parameter on its own (Parameter.__deepcopy__), and pickling keeps the fused
        # tensor apart from the Parameters: the copy re-fuses its own Parameters instead of carrying a
        # second, detached copy of the weights
        state = super().__getstate__()
        if state.get("_fused") is not None:
            state["_fused"] = None
            state["_refuse_on_setstate"] = True
        return state

    def __setstate__(self, state):
        refuse = state.pop("_refuse_on_setstate", False)
        super().__setstate__(state)
        if refuse:
            self.fuse_projections_()

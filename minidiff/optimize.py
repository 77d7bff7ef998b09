"""``minidiff.optimize(unet)``: the one-line opt-in fast path, for inference and training.

What it combines, and why (measured on the 2-core AVX2 dev box, float32, batch 8; the numbers are in
benchmarks/results/unet_vs_diffusers.json):
- ``channels_last`` weights. Convolutions are most of the forward; oneDNN's NHWC kernels run the 3x3
  ones ~10% faster (up to 1.5x on 4x4 maps), the C++ GroupNorm+act reads NHWC directly (~1.5x faster
  than on NCHW), and attention's (B, C, H, W) -> (B, H*W, C) becomes a view instead of a copy. Every
  activation follows the weights' layout from conv_in on; the output is made contiguous again.
  Training gains nothing from it here, and loses nothing measurable.
- ``compile=True``: torch.compile (inductor) of the forward with the pure-torch reference ops (the
  C++/Triton kernels are opaque to the compiler and would split the graph), so inductor fuses
  GroupNorm+act and the residual adds itself. With ``freeze`` inference calls use inductor's
  "freezing": the weights become constants, prepacked for oneDNN with bias and activation fused into
  the convolutions. A compile takes minutes on a small CPU, and again for each new input shape.
Measured and left out: one fused q/k/v matmul (no gain: the projections are < 4% of the forward) and
prepacking oneDNN conv weights without the compiler (< 2%, and only through private ops).

``optimize`` works in place and returns ``unet``; ``restore(unet)`` undoes it (import it from
``minidiff.optimize``). Parameter names, values and state_dict keys are unchanged (save_pretrained
writes contiguous copies), so saving, loading, EMA and optimizers behave as before. Autograd works
through every path. A frozen graph runs only for calls that record no gradient (``torch.no_grad``, as
``minidiff.sample`` does) and only while the weights are the ones it was built from (the parameters'
version counters tell: an optimizer step or load_state_dict changes them); other calls run the
unfrozen compiled graph, until ``optimize`` is called again to freeze the current weights.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable

import torch
from torch import nn

from . import ops
from .models import UNet

_STATE = "_minidiff_optimize"  # the attribute holding what restore() must undo


def _forward(unet: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The class's own forward, with the module as an argument: what torch.compile traces. Its unfrozen
    graphs take the weights as inputs, so models of one architecture share them (no recompiling)."""
    return type(unet).forward(unet, *args, **kwargs)


def _fresh_forward() -> Callable[..., torch.Tensor]:
    """``_forward`` with a code object of its own, hence its own torch.compile cache: a frozen graph
    holds the weights it was built from, so every optimize() call needs a new one (and the graph is
    freed with the state that holds this function)."""
    return types.FunctionType(_forward.__code__.replace(), _forward.__globals__, "frozen_forward")


def _weights_version(unet: nn.Module) -> tuple[tuple[int, int], ...]:
    """Changes whenever a parameter is replaced or modified in place (optimizer steps, load_state_dict)."""
    return tuple((p.data_ptr(), p._version) for p in unet.parameters())


def _records_grad(unet: nn.Module, args: tuple, kwargs: dict) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in unet.parameters())


def _fast_forward(unet: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``unet.forward`` once optimized. With compile: the frozen graph for inference on the weights it
    was built from, else the unfrozen one, both with the reference ops (see the module docstring).
    To freeze again after the weights changed, call ``optimize`` again."""
    state = unet.__dict__[_STATE]
    if not state["compile"]:
        return type(unet).forward(unet, *args, **kwargs).contiguous()
    freezing = contextlib.nullcontext()
    compiled = state["compiled"]
    if state["frozen"] is not None and not _records_grad(unet, args, kwargs):
        version = _weights_version(unet)
        if state["frozen_version"] is None:  # the first frozen call builds the graph from these weights
            state["frozen_version"] = version
        if version == state["frozen_version"]:
            import torch._inductor.config as inductor_config  # compile=True has imported it already

            # inductor reads the flag when it compiles a graph (the guards then pin the parameters'
            # identity); torch.compile(options={"freezing": True}) does not reach that point
            freezing, compiled = inductor_config.patch(freezing=True), state["frozen"]
    with ops.backend("reference"), freezing:
        return compiled(unet, *args, **kwargs).contiguous()


def optimize(unet: UNet, *, channels_last: bool = True, compile: bool = False, freeze: bool = True,
             compile_backend: str = "inductor") -> UNet:
    """Make ``unet`` (a minidiff UNet) faster in place, with the same outputs to float tolerance;
    returns it. See the module docstring for what each option does and costs.

    ``channels_last``: NHWC weights and activations. ``compile``: torch.compile the forward
    (``compile_backend``, e.g. "inductor", or "aot_eager" to check a model traces). ``freeze``: with
    compile and inductor, fold the weights into the inference graph. Calling ``optimize`` again on an
    optimized model first restores it, so the options of the last call apply.
    """
    for name, value in (("channels_last", channels_last), ("compile", compile), ("freeze", freeze)):
        if not isinstance(value, bool):
            raise TypeError(f"optimize: {name} must be a bool, got {value!r}")
    if not isinstance(unet, UNet):
        raise TypeError(f"optimize expects a minidiff UNet, got {type(unet).__name__}")
    restore(unet)
    state: dict[str, Any] = {"channels_last": channels_last, "compile": compile}
    if channels_last:  # the activations follow the weights' layout from conv_in on
        unet.to(memory_format=torch.channels_last)
    if compile:
        state["compiled"] = torch.compile(_forward, backend=compile_backend, dynamic=False)
        frozen = freeze and compile_backend == "inductor"
        state["frozen"] = torch.compile(_fresh_forward(), backend=compile_backend, dynamic=False) if frozen else None
        state["frozen_version"] = None
    unet.__dict__[_STATE] = state
    # a partial, not a bound method: a deepcopy (EMA) then calls the copy, not this module
    unet.forward = functools.partial(_fast_forward, unet)
    return unet


def restore(unet: UNet) -> UNet:
    """Undo ``optimize``: contiguous weights and the class's forward; returns ``unet``. A no-op on a
    model that is not optimized."""
    state = unet.__dict__.pop(_STATE, None)
    if state is None:
        return unet
    unet.__dict__.pop("forward", None)
    if state["channels_last"]:
        unet.to(memory_format=torch.contiguous_format)
    return unet

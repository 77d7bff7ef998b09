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
- ``winograd=True``: 3x3 stride-1 convolutions with >= 16 input and output channels run as Winograd
  F(4x4, 3x3) or F(2x2, 3x3) on float32 CPU tensors (ops/winograd.py: 4x or 2.25x fewer multiplications;
  C++ transforms fused, chunk by chunk, with a register-blocked matrix kernel). Measured per convolution
  against oneDNN (channels_last, batch 8, one thread): F(4x4) inference (the filter transform cached until
  the weight changes) 2.0-2.9x at 64-512 channels on 8x8 to 32x32 maps, 1.5x at 64 channels on 7x7 and
  14x14, 2.0x at 32 channels on 28x28, 1.25x at 16 channels; forward+backward 1.8-2.9x at 64-256 channels,
  1.3-1.9x at 32-64 channels on 7x7 to 28x28. The tile follows the tile count T = batch * ceil(H / m) *
  ceil(W / m) (WINOGRAD_MIN_TILES): each of the P positions multiplies T rows by all of U (P C K floats),
  and training also computes U, its transpose and the weight gradient at every step, so F(4x4) needs
  T >= 16 in inference and T >= 32 in training (8x8 maps at batch 8), F(2x2) T >= 32, and training also a
  tile per MiB of U (512 channels on 8x8 at batch 8: F(2x2) 1.6x, F(4x4) 1.4x); fewer tiles keep oneDNN.
  So 4x4 maps at batch 8 take F(2x2): 1.1-1.3x in inference (F(4x4) 1.3x alone but 0.9x inside a UNet,
  U no longer in cache), 1.2x in training (F(4x4) 0.7x). conv_in and conv_out (3 channels) keep oneDNN
  (0.7x by F(4x4)). Whole UNets, one thread, x diffusers eager, optimize() without -> with winograd: forward at
  batch 8 0.89 -> 0.53 (ddpm-butterflies-32), 0.95 -> 0.51 (ddpm-cifar10-32), 0.87 -> 0.71 (course-mnist-28,
  32-64 channels); at batch 1 0.86 -> 0.64 and 0.89 -> 0.59; training step (batch 8, AdamW) 1.00 -> 0.63,
  1.00 -> 0.53, 1.13 -> 0.93. Two threads, butterflies forward: 0.60. The backward recomputes the transformed
  input tiles, so training keeps what oneDNN keeps (each convolution's input). Outputs differ from oneDNN's
  by ~1e-5 relative (F(4x4); whole UNets 4e-6 to 9e-6). Not with ``compile`` (the kernels are opaque to it).
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
from .ops.winograd import has_fast_path, transform_weight, winograd_conv3x3

_STATE = "_minidiff_optimize"  # the attribute holding what restore() must undo
_WINOGRAD_CACHE = "_minidiff_winograd"  # a convolution's (weight version, {tile: transformed weight})
WINOGRAD_MIN_CHANNELS = 16  # fewer input or output channels: the transforms cost more than they save
# The fewest tiles, batch * ceil(H / m) * ceil(W / m), for F(m x m, 3x3), by mode and m, larger tiles first
# (measured, see the module docstring): fewer tiles cannot pay for reading U (P C K floats, P = (m + 2)^2)
# and, in training, for computing U, its transpose and the weight gradient from dU at every step.
WINOGRAD_MIN_TILES = {"inference": {4: 16, 2: 32}, "training": {4: 32, 2: 32}}
# Training also wants a tile per MiB of U: those passes over U slow down once it outgrows the caches
WINOGRAD_TRAINING_TILES_PER_MIB = 1


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


def _is_winograd_candidate(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros"
            and min(module.in_channels, module.out_channels) >= WINOGRAD_MIN_CHANNELS)


def _winograd_tile(x: torch.Tensor, out_channels: int, training: bool) -> int | None:
    """The Winograd tile size m for ``x`` (B, C, H, W) by the rules above, or None for oneDNN."""
    b, c, h, w = x.shape
    for tile, fewest in WINOGRAD_MIN_TILES["training" if training else "inference"].items():
        tiles = b * -(-h // tile) * -(-w // tile)
        u_mib = (tile + 2) ** 2 * c * out_channels * 4 / 2 ** 20
        if tiles >= fewest and (not training or tiles >= WINOGRAD_TRAINING_TILES_PER_MIB * u_mib):
            return tile
    return None


def _winograd_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` by Winograd F(m x m, 3x3) on float32 CPU tensors with m picked by ``_winograd_tile`` (the
    filter transform cached for calls that record no gradient), else by the module's own forward."""
    weight = conv.weight
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    tile = _winograd_tile(x, conv.out_channels, training) if x.dim() == 4 else None
    if tile is None or not has_fast_path(x, weight) or torch.is_autocast_enabled(x.device.type):
        return type(conv).forward(conv, x)
    if training:
        return winograd_conv3x3(x, weight, conv.bias, tile=tile)
    version = (weight.data_ptr(), weight._version)
    cached = conv.__dict__.get(_WINOGRAD_CACHE)
    if cached is None or cached[0] != version:
        cached = conv.__dict__[_WINOGRAD_CACHE] = (version, {})
    if tile not in cached[1]:
        with torch.no_grad():
            cached[1][tile] = transform_weight(weight, tile)
    return winograd_conv3x3(x, weight, conv.bias, tile=tile, transformed_weight=cached[1][tile])


def optimize(unet: UNet, *, channels_last: bool = True, compile: bool = False, freeze: bool = True,
             compile_backend: str = "inductor", winograd: bool = False) -> UNet:
    """Make ``unet`` (a minidiff UNet) faster in place, with the same outputs to float tolerance;
    returns it. See the module docstring for what each option does and costs.

    ``channels_last``: NHWC weights and activations. ``compile``: torch.compile the forward
    (``compile_backend``, e.g. "inductor", or "aot_eager" to check a model traces). ``freeze``: with
    compile and inductor, fold the weights into the inference graph. ``winograd``: Winograd F(4x4, 3x3)
    or F(2x2, 3x3) for the 3x3 convolutions of >= 16 channels (CPU, float32; not with ``compile``).
    Calling ``optimize`` again on an optimized model first restores it, so the options of the last call
    apply.
    """
    for name, value in (("channels_last", channels_last), ("compile", compile), ("freeze", freeze),
                        ("winograd", winograd)):
        if not isinstance(value, bool):
            raise TypeError(f"optimize: {name} must be a bool, got {value!r}")
    if not isinstance(unet, UNet):
        raise TypeError(f"optimize expects a minidiff UNet, got {type(unet).__name__}")
    if winograd and compile:
        raise ValueError("optimize: winograd=True runs C++ kernels that torch.compile cannot trace; "
                         "use it without compile=True")
    restore(unet)
    state: dict[str, Any] = {"channels_last": channels_last, "compile": compile, "winograd": []}
    if channels_last:  # the activations follow the weights' layout from conv_in on
        unet.to(memory_format=torch.channels_last)
    if winograd:
        state["winograd"] = [m for m in unet.modules() if _is_winograd_candidate(m)]
        for conv in state["winograd"]:  # partials, like unet.forward below
            conv.forward = functools.partial(_winograd_forward, conv)
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
    """Undo ``optimize``: contiguous weights and the classes' forwards; returns ``unet``. A no-op on a
    model that is not optimized."""
    state = unet.__dict__.pop(_STATE, None)
    if state is None:
        return unet
    unet.__dict__.pop("forward", None)
    for conv in state["winograd"]:
        conv.__dict__.pop("forward", None)
        conv.__dict__.pop(_WINOGRAD_CACHE, None)
    if state["channels_last"]:
        unet.to(memory_format=torch.contiguous_format)
    return unet

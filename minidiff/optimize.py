"""``minidiff.optimize(unet)``: the one-line opt-in fast path, for inference and training.

What it combines, and why (measured on the 2-core AVX2 dev box, float32, batch 8; the numbers are in
benchmarks/results/unet_vs_diffusers.json):
- ``channels_last`` weights. Convolutions are most of the forward; oneDNN's NHWC kernels run the 3x3
  ones ~10% faster (up to 1.5x on 4x4 maps), the C++ GroupNorm+act kernels (forward and backward) read
  NHWC directly, and attention's (B, C, H, W) -> (B, H*W, C) becomes a view instead of a copy. Every
  activation follows the weights' layout from conv_in on; the output is made contiguous again. A plain
  UNet already runs CPU inference and guidance with channels_last activations, and oneDNN then converts
  each weight at each call (~4% of a cifar10-32 forward), which channels_last weights save. Training gains
  little from it here.
- ``compile=True``: torch.compile (inductor) of the forward with the pure-torch reference ops (the
  C++/Triton kernels are opaque to the compiler and would split the graph), so inductor fuses
  GroupNorm+act and the residual adds itself. With ``freeze`` inference calls use inductor's
  "freezing": the weights become constants, prepacked for oneDNN with bias and activation fused into
  the convolutions. A compile takes minutes on a small CPU, and again for each new input shape.
- ``winograd=True``: 3x3 stride-1 convolutions with >= 16 input and output channels may run as Winograd
  F(4x4, 3x3) or F(2x2, 3x3) on float32 CPU tensors (ops/winograd.py: 4x or 2.25x fewer multiplications;
  C++ transforms fused, chunk by chunk, with a register-blocked matrix kernel). Which kernel pays depends on
  the shapes, the mode, the thread count and the caches (benchmarks/ops.py, butterflies' convolutions,
  batch 8, two threads, against oneDNN, the best kernel per shape: 1.85-2.94x for inference from 64 channels
  on 32x32 maps to 512 on 4x4, 2.3x in training at 64 channels on 32x32 falling to 0.85x on 4x4 maps, where the
  filter transforms each step (16 or 36 C K floats, written and read three times) cost more than the
  products save; the tiles per chunk move each of these by up to 1.5x), so it is
  measured, not guessed: at the first call for each input shape, layout, mode (inference, or training with
  its backward) and thread count, oneDNN and each of WINOGRAD_KERNELS take turns for AUTOTUNE_RUNS rounds on
  random inputs of that shape and the fastest is kept for every convolution of those shapes (like cuDNN's
  benchmark mode; it costs that first call about a second per distinct shape). Inference caches each
  convolution's filter transform until its weight changes; the backward recomputes the transformed input
  tiles, so training keeps what oneDNN keeps (each convolution's input). Outputs differ from oneDNN's by
  ~1e-5 relative (F(4x4); whole UNets 4e-6 to 1e-5). Not with ``compile`` (the kernels are opaque to it).
  Whole UNets: see the README's table.
Measured and left out: prepacking oneDNN conv weights without the compiler (< 2%, and only through
private ops), and channels_last weights as the UNet's default (they would save the plain UNet the
per-call weight conversion, but then ``safetensors.torch.save_file(unet.state_dict())`` refuses the
non-contiguous weights).

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
import time
import types
from typing import Any, Callable

import torch
from torch import nn

from . import ops
from .models import UNet
from .ops.reference import memory_format
from .ops.winograd import has_fast_path, prepare_weight, winograd_conv3x3

_STATE = "_minidiff_optimize"  # the attribute holding what restore() must undo
_WINOGRAD_CACHE = "_minidiff_winograd"  # a convolution's (weight version, {tile: transformed weight})
WINOGRAD_MIN_CHANNELS = 16  # fewer input or output channels: the transforms cost more than they save
# The Winograd kernels timed against oneDNN for each convolution shape: (tile m, tiles per chunk)
WINOGRAD_KERNELS = ((4, 32), (4, 128), (2, 32), (2, 128))
AUTOTUNE_RUNS = 3  # timed rounds of all kernels (after a warm-up call each); each kernel's fastest call counts
_KERNEL_CHOICES: dict[tuple, tuple[int, int] | None] = {}  # see _kernel


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
        return type(unet).forward(unet, *args, **kwargs)
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
        return compiled(unet, *args, **kwargs)


def _is_winograd_candidate(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros"
            and min(module.in_channels, module.out_channels) >= WINOGRAD_MIN_CHANNELS)


def _call_seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fastest(fns: dict[Any, Callable[[], Any]], runs: int = AUTOTUNE_RUNS) -> Any:
    """The key of the fastest of ``fns``: one warm-up call each, then ``runs`` rounds in which each runs once
    (taking turns, so that the machine's drift hits all alike); each one's fastest call counts (other processes
    only ever add time)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(runs):
        for key, fn in fns.items():
            best[key] = min(best[key], _call_seconds(fn))
    return min(best, key=best.get)


def _autotune(x: torch.Tensor, conv: nn.Conv2d, training: bool) -> tuple[int, int] | None:
    """The fastest of oneDNN (None) and the WINOGRAD_KERNELS (tile, chunk tiles) for ``conv`` on inputs shaped
    and laid out like ``x``: inference with the filter transform cached, or training (forward and backward)."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(x.shape, generator=g).to(memory_format=memory_format(x)).requires_grad_(training)
    weight = conv.weight.detach().clone().requires_grad_(training)
    bias = None if conv.bias is None else conv.bias.detach().clone().requires_grad_(training)
    inputs = [t for t in (xs, weight, bias) if t is not None]
    dy = torch.randn(x.shape[0], conv.out_channels, *x.shape[2:], generator=g) if training else None
    filters = {tile: prepare_weight(weight, tile) for tile in {t for t, _ in WINOGRAD_KERNELS}}

    def run(kernel: tuple[int, int] | None) -> None:
        if kernel is None:
            y = conv._conv_forward(xs, weight, bias)
        else:
            tile, chunk = kernel
            y = winograd_conv3x3(xs, weight, bias, tile=tile, chunk_tiles=chunk,
                                 transformed_weight=None if training else filters[tile])
        if training:
            torch.autograd.grad(y, inputs, dy)

    with torch.enable_grad() if training else torch.no_grad():
        return _fastest({kernel: functools.partial(run, kernel) for kernel in (None, *WINOGRAD_KERNELS)})


def _kernel(x: torch.Tensor, conv: nn.Conv2d, training: bool) -> tuple[int, int] | None:
    """The kernel for ``conv(x)``: autotuned at the first call for each input shape, layout, mode and thread
    count, then remembered for every convolution of the same shapes."""
    key = (tuple(x.shape), memory_format(x), conv.out_channels, conv.bias is not None, training,
           torch.get_num_threads())
    if key not in _KERNEL_CHOICES:
        _KERNEL_CHOICES[key] = _autotune(x, conv, training)
    return _KERNEL_CHOICES[key]


def _winograd_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` by the fastest kernel for its shapes (``_kernel``): Winograd on float32 CPU tensors (the
    filter transform cached for calls that record no gradient), or the module's own forward (oneDNN)."""
    weight = conv.weight
    if x.dim() != 4 or not has_fast_path(x, weight) or torch.is_autocast_enabled(x.device.type):
        return type(conv).forward(conv, x)
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    kernel = _kernel(x, conv, training)
    if kernel is None:
        return type(conv).forward(conv, x)
    tile, chunk = kernel
    if training:
        return winograd_conv3x3(x, weight, conv.bias, tile=tile, chunk_tiles=chunk)
    version = (weight.data_ptr(), weight._version)
    cached = conv.__dict__.get(_WINOGRAD_CACHE)
    if cached is None or cached[0] != version:
        cached = conv.__dict__[_WINOGRAD_CACHE] = (version, {})
    if tile not in cached[1]:
        cached[1][tile] = prepare_weight(weight, tile)
    return winograd_conv3x3(x, weight, conv.bias, tile=tile, chunk_tiles=chunk, transformed_weight=cached[1][tile])


def optimize(unet: UNet, *, channels_last: bool = True, compile: bool = False, freeze: bool = True,
             compile_backend: str = "inductor", winograd: bool = False) -> UNet:
    """Make ``unet`` (a minidiff UNet) faster in place, with the same outputs to float tolerance;
    returns it. See the module docstring for what each option does and costs.

    ``channels_last``: NHWC weights and activations. ``compile``: torch.compile the forward
    (``compile_backend``, e.g. "inductor", or "aot_eager" to check a model traces). ``freeze``: with
    compile and inductor, fold the weights into the inference graph. ``winograd``: Winograd F(4x4, 3x3)
    or F(2x2, 3x3) for the 3x3 convolutions of >= 16 channels where it is faster than oneDNN, timed at the
    first call of each shape (CPU, float32; not with ``compile``).
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

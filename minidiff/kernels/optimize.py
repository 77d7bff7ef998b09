"""``minidiff.optimize(unet)``: the one-line opt-in fast path, for inference and training.

A minidiff model runs pure PyTorch by default and builds nothing. ``optimize`` changes one model, in place:
- ``kernels``: its layers' GroupNorm+activation and attention run the fused kernels of ``fused.py`` (C++ on
  CPU tensors by default; see ``fused.KERNELS``), set per layer, so other models keep their own ops;
- ``channels_last``: NHWC weights and activations (oneDNN's NHWC convolutions, and the C++ GroupNorm kernels
  read NHWC directly); the output is made contiguous again;
- ``winograd`` (CPU, float32): each 3x3 stride-1 convolution with >= WINOGRAD_MIN_CHANNELS channels runs the
  fastest of oneDNN and the Winograd kernels of ``winograd.py``, timed at its first call for each input shape,
  layout, mode (inference, or training with its backward) and thread count, like cuDNN's benchmark mode;
  inference caches each convolution's filter transform until its weight changes;
- ``compile``: torch.compile of the forward with the pure-torch ops (the C++ kernels are opaque to the compiler),
  and with ``freeze`` inductor's freezing for calls that record no gradient, while the weights are the ones the
  frozen graph was built from (the parameters' version counters tell). Not with ``winograd``.
The C++ kernels are compiled when ``optimize`` is called (once per CPU, then cached; it says so on stderr).
Parameter names, values and state_dict keys are unchanged, so saving, loading, EMA and optimizers behave as
before; outputs equal the plain model's to float tolerance. ``restore(unet)`` undoes it. What each option
gains is measured by benchmarks/unet_vs_diffusers.py and benchmarks/ops.py (numbers in the README).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import types
from typing import Any, Callable

import torch
from torch import nn

from ..models import UNet
from ..models.functional import UsesOps, memory_format
from . import cpu, winograd
from .fused import KERNELS, ops_for
from .winograd import has_fast_path, prepare_weight, winograd_conv3x3

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
    with freezing:
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
        if not _KERNEL_CHOICES:
            print("minidiff.optimize: timing oneDNN against the Winograd kernels at the first call of each "
                  "convolution shape (once per shape, mode and thread count)", file=sys.stderr)
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


def _build_cpu_kernels(winograd_too: bool) -> None:
    """Compile (or find in the cache) the C++ kernels now rather than at some later forward."""
    cpu.load()
    if winograd_too:
        winograd.load()


def optimize(unet: UNet, *, kernels: str | None = None, channels_last: bool = True, winograd: bool | None = None,
             compile: bool = False, freeze: bool = True, compile_backend: str = "inductor") -> UNet:
    """Make ``unet`` (a minidiff UNet) faster in place, with the same outputs to float tolerance; returns it.
    See the module docstring for what each option does.

    ``kernels``: the fused ops of its layers, one of fused.KERNELS; default "auto" (the environment variable
    MINIDIFF_KERNELS overrides the default, a debugging aid), "reference" with ``compile``. ``channels_last``:
    NHWC weights and activations. ``winograd``: time Winograd against oneDNN per convolution shape and keep the
    faster (CPU, float32); default on unless ``compile``. ``compile``: torch.compile the forward
    (``compile_backend``, e.g. "inductor", or "aot_eager" to check a model traces); ``freeze``: with compile
    and inductor, fold the weights into the inference graph.
    Calling ``optimize`` again on an optimized model first restores it, so the options of the last call apply.
    """
    for name, value in (("channels_last", channels_last), ("compile", compile), ("freeze", freeze)):
        if not isinstance(value, bool):
            raise TypeError(f"optimize: {name} must be a bool, got {value!r}")
    if winograd is not None and not isinstance(winograd, bool):
        raise TypeError(f"optimize: winograd must be a bool or None, got {winograd!r}")
    if not isinstance(unet, UNet):
        raise TypeError(f"optimize expects a minidiff UNet, got {type(unet).__name__}")
    if winograd and compile:
        raise ValueError("optimize: winograd=True runs C++ kernels that torch.compile cannot trace; "
                         "use it without compile=True")
    if kernels is None:
        kernels = "reference" if compile else os.environ.get("MINIDIFF_KERNELS", "auto")
    if kernels not in KERNELS:
        raise ValueError(f"optimize: kernels={kernels!r} is not known; allowed: {list(KERNELS)}")
    if compile and kernels != "reference":
        raise ValueError("optimize: compile=True traces the pure-torch ops; the fused kernels are opaque to it "
                         f"(got kernels={kernels!r}; leave it out or pass 'reference')")
    winograd = not compile if winograd is None else winograd
    ops = ops_for(kernels)
    restore(unet)
    on_cpu = unet.device.type == "cpu"
    if on_cpu and (winograd or kernels in ("auto", "cpu")):
        _build_cpu_kernels(winograd)
    state: dict[str, Any] = {"channels_last": channels_last, "compile": compile, "winograd": [], "ops": []}
    if channels_last:  # the activations follow the weights' layout from conv_in on
        unet.to(memory_format=torch.channels_last)
    if kernels != "reference":
        state["ops"] = [m for m in unet.modules() if isinstance(m, UsesOps)]
        for module in state["ops"]:
            module.ops = ops
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
    """Undo ``optimize``: contiguous weights, the classes' forwards and the pure-torch ops; returns ``unet``. A no-op on a
    model that is not optimized."""
    state = unet.__dict__.pop(_STATE, None)
    if state is None:
        return unet
    unet.__dict__.pop("forward", None)
    for conv in state["winograd"]:
        conv.__dict__.pop("forward", None)
        conv.__dict__.pop(_WINOGRAD_CACHE, None)
    for module in state["ops"]:
        module.__dict__.pop("ops", None)
    if state["channels_last"]:
        unet.to(memory_format=torch.contiguous_format)
    return unet

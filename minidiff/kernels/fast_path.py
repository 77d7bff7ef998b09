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
  frozen graph was built from (the parameters' version counters tell). Not with ``winograd``;
- ``dtype`` (bfloat16 or float16): the forward runs under ``torch.autocast`` in that dtype and returns the
  weights' dtype (float32), so the sampler's and the loss's arithmetic stay float32; the weights are not cast.
  On CUDA it is used as asked. On a CPU, reduced precision pays only where the CPU computes it natively (AMX
  tiles, avx512_bf16 / avx512_fp16 dot products) and even then not always (avx512_bf16 without AMX can be slower
  than float32): without native bf16 a one-time warning says so and the model stays float32; float16 on a CPU
  without it is an error; otherwise each input shape's first call times float32 against autocast (forward, and
  backward where autograd records) and keeps the faster, with a one-time warning when that is float32.
The C++ kernels are compiled when ``optimize`` is called (once per CPU, then cached; it says so on stderr).
Parameter names, values and state_dict keys are unchanged, so saving, loading, EMA and optimizers behave as
before; outputs equal the plain model's to float tolerance. ``restore(unet)`` undoes it. What each option
gains is measured by benchmarks/unet_vs_diffusers.py, benchmarks/ops.py and (``dtype``) benchmarks/precision.py
(numbers in the README).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import time
import types
import warnings
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
REDUCED_DTYPES = (torch.bfloat16, torch.float16)
DTYPE_TIMING_RUNS = 2  # timed rounds of float32 and autocast at a call signature's first call (after a warm-up)
_SAID: set[str] = set()  # the messages _say_once has given


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
    """``unet.forward`` once optimized: under autocast if ``dtype`` asked for it and (on a CPU) it is the faster
    for this call signature, returning the weights' dtype."""
    state = unet.__dict__[_STATE]
    dtype = _compute_dtype(unet, state, args, kwargs)
    if dtype is None:
        return _optimized_forward(unet, state, args, kwargs)
    with torch.autocast(unet.device.type, dtype=dtype):
        out = _optimized_forward(unet, state, args, kwargs)
    return out.to(unet.dtype)


def _optimized_forward(unet: nn.Module, state: dict[str, Any], args: tuple, kwargs: dict) -> torch.Tensor:
    """The forward with the chosen kernels. With compile: the frozen graph for inference on the weights it
    was built from, else the unfrozen one, both with the reference ops (see the module docstring).
    To freeze again after the weights changed, call ``optimize`` again."""
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


def _say_once(message: str, warn: bool = True) -> None:
    """A RuntimeWarning (or, ``warn=False``, a note on stderr), once per process."""
    if message not in _SAID:
        _SAID.add(message)
        if warn:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        else:
            print(message, file=sys.stderr)


def _check_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` on ``device`` (None: float32), or a ValueError where it is unsupported."""
    if dtype is None or dtype == torch.float32:
        return None
    if dtype not in REDUCED_DTYPES:
        raise ValueError(f"optimize: dtype={dtype} is not supported; allowed: None, torch.float32, "
                         "torch.bfloat16, torch.float16")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"optimize: dtype=torch.bfloat16 needs a GPU with bf16 ({device} has none); "
                             "use torch.float16")
        return dtype
    if device.type != "cpu":
        raise ValueError(f"optimize: dtype={dtype} is supported on CPU and CUDA models, not on {device}")
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    if dtype == torch.float16:
        if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            raise ValueError("optimize: dtype=torch.float16 on a CPU needs native float16 (avx512_fp16 or AMX-FP16"
                             " on x86), which this CPU lacks; use torch.bfloat16 or float32 (dtype=None)")
        return dtype
    native = (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) if x86 \
        else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not native:
        _say_once("minidiff.optimize: this CPU has no native bfloat16 (avx512_bf16 or AMX): emulated bf16 is "
                  "slower than float32, so the model keeps float32")
        return None
    return dtype


def _compute_dtype(unet: nn.Module, state: dict[str, Any], args: tuple, kwargs: dict) -> torch.dtype | None:
    """The autocast dtype of this call: the checked ``dtype`` on CUDA; on a CPU the faster of float32 (None) and
    it, timed at the first call of each input signature, grad mode and thread count."""
    dtype = state["dtype"]
    if dtype is None or unet.device.type != "cpu":
        return dtype
    training = _records_grad(unet, args, kwargs)
    tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
    key = (tuple((tuple(t.shape), t.dtype) for t in tensors), training, torch.get_num_threads())
    if key not in state["dtype_choices"]:
        state["dtype_choices"][key] = _time_dtype(unet, state, args, kwargs, training)
    return state["dtype_choices"][key]


def _time_dtype(unet: nn.Module, state: dict[str, Any], args: tuple, kwargs: dict, training: bool
                ) -> torch.dtype | None:
    """The faster of float32 (None) and autocast in ``state["dtype"]`` for this call: the forward, and with
    ``training`` the gradients of its output's sum (taken by autograd.grad: nothing accumulates in .grad)."""
    dtype = state["dtype"]
    leaves = [t for t in (*unet.parameters(), *args, *kwargs.values()) if torch.is_tensor(t) and t.requires_grad]

    def run(candidate: torch.dtype | None) -> None:
        with torch.autocast("cpu", dtype=candidate or torch.float32, enabled=candidate is not None):
            out = _optimized_forward(unet, state, args, kwargs)
        if training:
            torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)

    _say_once(f"minidiff.optimize: timing float32 against {dtype} autocast at the first call of each input "
              "shape", warn=False)
    faster = _fastest({None: functools.partial(run, None), dtype: functools.partial(run, dtype)},
                      runs=DTYPE_TIMING_RUNS)
    if faster is None:
        _say_once(f"minidiff.optimize: {dtype} measured slower than float32 for this model on this CPU (as on CPUs "
                  "without AMX tiles); it keeps float32 for such calls (benchmarks/precision.py compares them)")
    return faster


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
             compile: bool = False, freeze: bool = True, compile_backend: str = "inductor",
             dtype: torch.dtype | None = None) -> UNet:
    """Make ``unet`` (a minidiff UNet) faster in place, with the same outputs to float tolerance; returns it.
    See the module docstring for what each option does.

    ``kernels``: the fused ops of its layers, one of fused.KERNELS; default "auto" (the environment variable
    MINIDIFF_KERNELS overrides the default, a debugging aid), "reference" with ``compile``. ``channels_last``:
    NHWC weights and activations. ``winograd``: time Winograd against oneDNN per convolution shape and keep the
    faster (CPU, float32); default on unless ``compile``. ``compile``: torch.compile the forward
    (``compile_backend``, e.g. "inductor", or "aot_eager" to check a model traces); ``freeze``: with compile
    and inductor, fold the weights into the inference graph. ``dtype``: torch.bfloat16 or torch.float16 to
    compute under autocast where that is supported and (on a CPU) faster; None or torch.float32: float32.
    Move the model to its device before optimizing it: ``dtype`` is checked for that device.
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
    autocast_dtype = _check_dtype(dtype, unet.device)
    restore(unet)
    on_cpu = unet.device.type == "cpu"
    if on_cpu and (winograd or kernels in ("auto", "cpu")):
        _build_cpu_kernels(winograd)
    state: dict[str, Any] = {"channels_last": channels_last, "compile": compile, "winograd": [], "ops": [],
                             "dtype": autocast_dtype, "dtype_choices": {}}
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

"""Winograd convolution F(m x m, 3x3), m = 2 or 4 (Lavin & Gray 2015, "Fast Algorithms for Convolutional
Neural Networks").

A 3x3 stride-1 padding-1 convolution cut into m x m output tiles, each computed from its a x a input patch d
(a = m + 2; neighbouring patches share two rows or columns):

    Y_k = A^T [ sum_c (G g_kc G^T) ⊙ (B^T d_c B) ] A

With U = G g G^T (the filter transform, cached for inference) and V = B^T d B (the input transform), the sum
over channels is, for each of the P = a^2 positions p of a transformed tile, one matrix product
M[p] = V[p] U[p]: (tiles, C) @ (C, K). Multiplies per output pixel and (c, k): P / m^2 = 4 for F(2x2, 3x3),
2.25 for F(4x4, 3x3), against 9 for the direct convolution; the transforms are additions and small
multiples. Larger tiles cost precision: F(4x4, 3x3)'s matrices (points 0, +-1, +-2, inf) hold 4, 5, 8 and
1/24, and in float32 its outputs and gradients are off F.conv2d's by up to ~1.5e-5 of their largest value at
64-512 channels, against ~5e-6 for F(2x2, 3x3).

Why: oneDNN's direct 3x3 convolution already runs near the CPU's FMA peak, so only fewer multiplications make it
faster. Float32 CPU tensors with channels in multiples of 8 take the C++ path (NHWC), in chunks of about
CHUNK_TILES tiles (whole tile rows, or whole images) whose V and M stay in cache: input transform, the P
products, output transform. The products run in a 6x16 register-blocked kernel (GCC vector extensions: 12
accumulators of 8 floats), with U stored as 16-column panels whose rows are contiguous. The P positions of every
buffer lie an odd number of cache lines apart (``spaced``): at multiples of 4 KB they would share one L1 set.
Each transform is one template over tables written from MATRICES, unrolled so that zero entries cost nothing,
reading patches inside the image by strides and only border patches through a table of pointers. The backward
runs by chunks too and recomputes V from the input rather than saving it: dM = A dY A^T, dV[p] = dM[p] U[p]^T,
dx += B dV B^T (chunks of whole images, or two chunks apart, share no input pixel), dU[p] += dM[p]^T V[p] and
dweight = G^T dU G (into the weight's own layout). On several threads each thread sums dU over its chunks, the
copies added at the end; where such a copy would be large against the transformed tiles (few tiles, many
channels) the chunks write V and dM for all tiles instead, and each thread then computes whole positions of dU.
The filter transforms read the weight in place, in any layout. Everything else takes the pure-torch reference
(the same math, differentiated by autograd). Whether a kernel pays for a given shape is measured, not assumed:
``optimize`` times it against oneDNN (benchmarks/ops.py gives the numbers).
"""
from __future__ import annotations

import ctypes
import functools
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cpu
from ..models.functional import memory_format

TILES = (2, 4)  # output tile sizes m
# m -> (B^T (a, a), G (a, 3), A^T (m, a)); F(4x4, 3x3) interpolates at 0, +-1, +-2 and infinity
MATRICES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
# Tiles per chunk (rounded to whole tile rows), the default: on one thread 128 was the fastest, or within 5%,
# of 32-256 at 32-512 channels, forward and backward (smaller chunks read U, and in the backward accumulate dU,
# more often); on two threads 32 often wins (V and M stay in each core's L2). minidiff.optimize times both.
CHUNK_TILES = 128

_SOURCE = Path(__file__).with_name("winograd.cpp")  # built with cpu.py's build()


@functools.cache
def _transforms(tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MATRICES[tile] as float64 tensors: B^T, G, A^T."""
    return tuple(torch.tensor(t, dtype=torch.float64) for t in MATRICES[tile])


@functools.cache
def _matrices(tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F(tile x tile, 3x3)'s 2-D transforms as matrices on row-major flattened tiles, vec(X^T d X) =
    kron(X^T, X^T) vec(d): input (P, P), filter (P, 9), output (tile^2, P), in float64."""
    return tuple(torch.kron(t, t) for t in _transforms(tile))


def _tables() -> str:
    """The C++ ``Tile<m>`` tables, written from MATRICES."""
    def table(name: str, t: torch.Tensor) -> str:
        rows = ", ".join("{" + ", ".join(f"{v}f" for v in row) + "}" for row in t.tolist())
        return f"static constexpr float {name}[{t.shape[0]}][{t.shape[1]}] = {{{rows}}};"

    specs = []
    for tile in TILES:
        b_t, g, a_t = _transforms(tile)
        body = " ".join(table(name, t) for name, t in (("BT", b_t), ("B", b_t.T), ("G", g), ("GT", g.T),
                                                       ("AT", a_t), ("A", a_t.T)))
        specs.append(f"template <> struct Tile<{tile}> {{ {body} }};")
    return "\n".join(specs)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernels, built once (cpu.py's build), or None after a warning when they cannot be built."""
    try:
        lib = ctypes.CDLL(str(cpu.build(_SOURCE.read_text().replace("@TABLES@", _tables()), "winograd")))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"minidiff.kernels.winograd: the C++ kernels are unavailable ({err}); using the pure-torch "
                      "transforms", RuntimeWarning, stacklevel=3)
        return None
    lib.md_winograd_forward.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6
    lib.md_winograd_backward.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    lib.md_winograd_filter.argtypes = [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] + [
        ctypes.c_int64] * 2
    lib.md_winograd_filter_grad.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6
    lib.md_winograd_spaced.argtypes, lib.md_winograd_spaced.restype = [ctypes.c_int64], ctypes.c_int64
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_tile(tile: int) -> None:
    if tile not in TILES:
        raise ValueError(f"winograd: tile must be one of {TILES}, got {tile!r}")


def _positions(like: torch.Tensor, positions: int, rows: int, cols: int) -> torch.Tensor:
    """An empty (positions, rows * cols) array for the kernels, its rows a little more than rows * cols apart
    (winograd.cpp's spaced(): rows read together must not share a cache set)."""
    stride = load().md_winograd_spaced(rows * cols)
    return like.new_empty(positions, stride)[:, :rows * cols]


def _filter_strides(weight: torch.Tensor, transposed: bool) -> tuple[int, int, int, int]:
    """A (K, C, 3, 3) weight's strides as the kernels read its filters g_rs: (r, s, i, j), (r, s) = (c, k), or
    (k, c) when ``transposed``."""
    k, c, i, j = weight.stride()
    return (k, c, i, j) if transposed else (c, k, i, j)


def _filter(weight: torch.Tensor, tile: int, transposed: bool = False) -> torch.Tensor:
    """The C++ filter transform in the kernels' layout: U (P, C, K), or U^T (P, K, C) when ``transposed``, each
    position's matrix in 16-column panels, as a (P, rows * cols) tensor with spaced rows. The weight is read in
    place, in any layout."""
    k, c = weight.shape[:2]
    rows, cols = (k, c) if transposed else (c, k)
    u = _positions(weight, (tile + 2) ** 2, rows, cols)
    load().md_winograd_filter(tile, weight.data_ptr(), *_filter_strides(weight, transposed), u.data_ptr(), rows,
                                  cols)
    return u


def transform_weight(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """U = G g G^T for every (k, c): (K, C, 3, 3) -> (P, C, K), position p = a i + j of the a x a tile, in torch
    ops (differentiable)."""
    _check_tile(tile)
    k, c = weight.shape[:2]
    u = _matrices(tile)[1].to(weight) @ weight.reshape(k * c, 9).T  # (P, K * C)
    return u.view(-1, k, c).transpose(1, 2).contiguous()


def prepare_weight(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """U for ``winograd_conv3x3(..., transformed_weight=)``, an inference cache, in the layout of the kernels
    that will run: the C++ kernels' panels where ``has_fast_path`` holds for the weight, else
    ``transform_weight``'s. Not differentiable."""
    _check_tile(tile)
    with torch.no_grad():
        return _filter(weight, tile) if has_fast_path(weight, weight) else transform_weight(weight, tile)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> None:
    _check_tile(tile)
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"winograd_conv3x3 needs a (K, C, 3, 3) weight, got {tuple(weight.shape)}")
    if x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"winograd_conv3x3: input {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"winograd_conv3x3: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")


def _reference(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """The same algorithm in torch ops (any device and dtype; autograd differentiates it)."""
    b, c, h, w = x.shape
    a, th, tw = tile + 2, -(-h // tile), -(-w // tile)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, tile * tw + 1 - w, 1, tile * th + 1 - h))  # (B, m th + 2, ., C)
    s = xp.stride()
    d = xp.as_strided((a, a, b, th, tw, c), (s[1], s[2], s[0], tile * s[1], tile * s[2], s[3]))  # the patches
    to_v, _, to_y = (t.to(x) for t in _matrices(tile))
    v = (to_v @ d.reshape(a * a, -1)).view(a * a, -1, c)  # (P, T, C)
    m = torch.bmm(v, u)  # (P, T, K)
    y = (to_y @ m.view(a * a, -1)).view(tile, tile, b, th, tw, -1)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(b, tile * th, tile * tw, -1)[:, :h, :w]  # (B, H, W, K)
    return (y if bias is None else y + bias).permute(0, 3, 1, 2)


def _chunk_rows(tile: int, b: int, h: int, w: int, chunk_tiles: int) -> int:
    """Tile rows per chunk: about ``chunk_tiles`` tiles, and work for every thread. Whole images where one
    fits (such chunks share no pixel: the backward runs them in one pass), else at least two chunks per thread
    (the backward runs the even chunks, then the odd ones)."""
    th, tw, threads = -(-h // tile), -(-w // tile), torch.get_num_threads()
    if th * tw <= chunk_tiles:
        return th * max(1, min(chunk_tiles // (th * tw), -(-b // threads)))
    return max(1, min(chunk_tiles // tw, -(-b * th // (2 * threads)) if threads > 1 else b * th))


def _shared_backward(tile: int, b: int, h: int, w: int, c: int, k: int) -> bool:
    """Whether the backward computes dU by whole positions from shared transforms (winograd.cpp's
    backward_shared) rather than by chunks into per-thread copies: on several threads, where a copy of dU
    (C K per position) would be at least half the size of the transformed tiles (T (C + K))."""
    tiles = b * -(-h // tile) * -(-w // tile)
    return torch.get_num_threads() > 1 and 2 * c * k >= tiles * (c + k)


class _WinogradConv(torch.autograd.Function):
    """The fast path: NHWC float32 CPU tensors through the fused C++ kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor, tile: int,
                chunk_tiles: int):
        (b, c, h, w), k = x.shape, weight.shape[0]
        x = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): a view for channels_last input
        bias = None if bias is None else bias.contiguous()
        y = x.new_empty(b, h, w, k)
        load().md_winograd_forward(tile, x.data_ptr(), u.data_ptr(), _ptr(bias), y.data_ptr(), b, h, w, c, k,
                                       _chunk_rows(tile, b, h, w, chunk_tiles))
        ctx.save_for_backward(x, weight)  # the backward recomputes V from x
        ctx.tile, ctx.chunk_tiles = tile, chunk_tiles
        return y.permute(0, 3, 1, 2)  # (B, K, H, W), channels_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (x, weight), tile, needs = ctx.saved_tensors, ctx.tile, ctx.needs_input_grad
        (b, h, w, c), k, lib = x.shape, weight.shape[0], load()
        dy_nhwc = dy.permute(0, 2, 3, 1).contiguous()
        dx = x.new_zeros(x.shape) if needs[0] else None
        du = _positions(x, (tile + 2) ** 2, k, c) if needs[1] else None  # dU^T
        u_kc = _filter(weight, tile, transposed=True) if needs[0] else None
        lib.md_winograd_backward(tile, x.data_ptr(), _ptr(u_kc), dy_nhwc.data_ptr(), _ptr(dx), _ptr(du), b, h, w,
                                 c, k, _chunk_rows(tile, b, h, w, ctx.chunk_tiles),
                                 _shared_backward(tile, b, h, w, c, k))
        dweight = None
        if du is not None:  # in the weight's layout, which the gradient accumulation then keeps without a copy
            dweight = torch.empty_like(weight)
            lib.md_winograd_filter_grad(tile, du.data_ptr(), dweight.data_ptr(), *_filter_strides(dweight, True), k, c)
        return (None if dx is None else dx.permute(0, 3, 1, 2), dweight,
                dy_nhwc.sum((0, 1, 2)) if needs[2] else None, None, None, None)


def has_fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``winograd_conv3x3(x, weight)`` runs the C++ kernels: float32 CPU tensors, input and output
    channels in multiples of 8 (the kernels' vector width), a compiler."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0 and not torch.compiler.is_compiling()
            and load() is not None)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, tile: int = 4,
                     transformed_weight: torch.Tensor | None = None, chunk_tiles: int = CHUNK_TILES) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a (K, C, 3, 3) ``weight`` by Winograd F(tile x tile, 3x3),
    ``tile`` 2 or 4: x (B, C, H, W), any H and W, NCHW or channels_last; the output has x's memory format.
    Differentiable in x, weight and bias. ``transformed_weight``: ``prepare_weight(weight, tile)`` computed
    beforehand (an inference cache; it must match ``weight``, which still receives the gradient; one made for
    the other kernels' layout is recomputed).
    ``chunk_tiles``: tiles per chunk of the C++ kernels (their speed, not their result, depends on it)."""
    _check(x, weight, bias, tile)
    if not isinstance(chunk_tiles, int) or chunk_tiles < 1:
        raise ValueError(f"winograd_conv3x3: chunk_tiles must be a positive int, got {chunk_tiles!r}")
    u = transformed_weight
    if not has_fast_path(x, weight):  # autograd differentiates the filter transform if the weight needs it
        if u is None or u.dim() != 3 or (torch.is_grad_enabled() and weight.requires_grad):
            u = transform_weight(weight, tile)
        y = _reference(x, u, bias, tile)
    else:  # _WinogradConv computes the weight's gradient itself: U is only a value
        k, c = weight.shape[:2]
        layout = ((tile + 2) ** 2, c * k), (load().md_winograd_spaced(c * k), 1)
        if u is None or (u.shape, u.stride()) != layout:
            u = _filter(weight, tile)
        y = _WinogradConv.apply(x, weight, bias, u.detach(), tile, chunk_tiles)
    return y.contiguous(memory_format=memory_format(x))

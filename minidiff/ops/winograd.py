"""Winograd convolution F(2x2, 3x3) (Lavin & Gray 2015, "Fast Algorithms for Convolutional Neural Networks").

A 3x3 stride-1 padding-1 convolution cut into 2x2 output tiles, each computed from its 4x4 input patch d:

    Y_k = A^T [ sum_c (G g_kc G^T) ⊙ (B^T d_c B) ] A

With U = G g G^T (the filter transform, cached for inference) and V = B^T d B (the input transform), the
sum over channels is, for each of the 16 positions p of a transformed tile, one matrix product
M[p] = V[p] U[p]^T: (16, tiles, C) @ (16, C, K). That is 16 multiplies per (tile, c, k) for 4 outputs,
against 36 for the direct convolution: 2.25x fewer. The transforms are adds and subtracts.

Why: on the CPU, oneDNN's direct 3x3 convolution already runs near the fp32 matmul peak, so only fewer
multiplications make it faster. Float32 CPU tensors take the fast path: C++ tile transforms (NHWC, one pass
over memory each, built like ops/cpu.py's kernels) around torch.bmm (MKL), with a hand-written backward
(the transposed transforms; the weight gradient is V[p]^T dM[p]). Everything else takes the pure-torch
reference (the same math, differentiated by autograd). Error: ~1e-6 of the output's scale in float32 (the
transforms of F(2x2, 3x3) have entries 0, +-1, +-1/2).
"""
from __future__ import annotations

import ctypes
import functools
import subprocess
import warnings

import torch
import torch.nn.functional as F

from . import cpu

B_T = torch.tensor([[1.0, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
G = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
A_T = torch.tensor([[1.0, 1, 1, 0], [0, 1, -1, -1]])
# the 2-D transforms as matrices on row-major flattened tiles: vec(X^T d X) = kron(X^T, X^T) vec(d)
_INPUT, _FILTER, _OUTPUT = torch.kron(B_T, B_T), torch.kron(G, G), torch.kron(A_T, A_T)  # (16,16) (16,9) (4,16)
# The forward runs in chunks of tiles, so that V and M stay in cache between the transforms and the
# product: 256 tiles (1-4 MB for 128-512 channels) was 10% faster than no chunks at 128 channels, 32x32, and
# as fast at 256 and 512 channels (smaller chunks slow the matrix products down).
CHUNK_TILES = 256

_SOURCE = r"""
#include <cstdint>
#include <vector>
// Tile t = (b, ty, tx) of B*th*tw reads the 4x4 patch at rows 2ty-1.., columns 2tx-1.. (zero outside the
// image) and owns the outputs at rows 2ty, 2ty+1 and columns 2tx, 2tx+1. Images NHWC; V, M: (16, tiles, C).
// The forward transforms take the tiles t0 <= t < t0 + nt, with V and M of those tiles only.
#define TILE_POS const int64_t b = t / (th * tw), ty = t / tw % th, tx = t % tw
#define PIXEL(img, yy, xx, n) \
    ((yy) >= 0 && (yy) < H && (xx) >= 0 && (xx) < W ? img + ((b * H + (yy)) * W + (xx)) * n : nullptr)

// V = B^T d B
extern "C" void md_winograd_input(const float* x, float* v, int64_t B, int64_t H, int64_t W, int64_t C,
                                  int64_t th, int64_t tw, int64_t t0, int64_t nt) {
    const std::vector<float> zeros(C, 0.0f);
    #pragma omp parallel for schedule(static)
    for (int64_t t = t0; t < t0 + nt; ++t) {
        TILE_POS;
        const float* d[16];
        for (int i = 0; i < 16; ++i) {
            const float* p = PIXEL(x, 2 * ty - 1 + i / 4, 2 * tx - 1 + i % 4, C);
            d[i] = p ? p : zeros.data();
        }
        float* out = v + (t - t0) * C;
        const int64_t ps = nt * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            float r[4][4];  // B^T d: rows
            for (int j = 0; j < 4; ++j) {
                const float d0 = d[j][c], d1 = d[4 + j][c], d2 = d[8 + j][c], d3 = d[12 + j][c];
                r[0][j] = d0 - d2; r[1][j] = d1 + d2; r[2][j] = d2 - d1; r[3][j] = d1 - d3;
            }
            for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns
                out[(4 * i) * ps + c] = r[i][0] - r[i][2];
                out[(4 * i + 1) * ps + c] = r[i][1] + r[i][2];
                out[(4 * i + 2) * ps + c] = r[i][2] - r[i][1];
                out[(4 * i + 3) * ps + c] = r[i][1] - r[i][3];
            }
        }
    }
}

// Y = A^T M A + bias (outputs beyond H x W, from the padded last tile row or column, are dropped)
extern "C" void md_winograd_output(const float* m, const float* bias, float* y, int64_t B, int64_t H, int64_t W,
                                   int64_t K, int64_t th, int64_t tw, int64_t t0, int64_t nt) {
    std::vector<float> sink(4 * K);
    #pragma omp parallel for schedule(static) firstprivate(sink)
    for (int64_t t = t0; t < t0 + nt; ++t) {
        TILE_POS;
        float* o[4];
        for (int i = 0; i < 4; ++i) {
            float* p = PIXEL(y, 2 * ty + i / 2, 2 * tx + i % 2, K);
            o[i] = p ? p : sink.data() + i * K;
        }
        const float* in = m + (t - t0) * K;
        const int64_t ps = nt * K;
        #pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
            float s[2][4];
            for (int j = 0; j < 4; ++j) {
                const float m0 = in[j * ps + k], m1 = in[(4 + j) * ps + k], m2 = in[(8 + j) * ps + k],
                            m3 = in[(12 + j) * ps + k];
                s[0][j] = m0 + m1 + m2; s[1][j] = m1 - m2 - m3;
            }
            const float bk = bias ? bias[k] : 0.0f;
            for (int i = 0; i < 2; ++i) {
                o[2 * i][k] = s[i][0] + s[i][1] + s[i][2] + bk;
                o[2 * i + 1][k] = s[i][1] - s[i][2] - s[i][3] + bk;
            }
        }
    }
}

// dM = A dY A^T, the adjoint of md_winograd_output (outputs beyond H x W have no gradient)
extern "C" void md_winograd_output_grad(const float* dy, float* dm, int64_t B, int64_t H, int64_t W, int64_t K,
                                        int64_t th, int64_t tw) {
    const std::vector<float> zeros(K, 0.0f);
    const int64_t T = B * th * tw;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        TILE_POS;
        const float* g[4];
        for (int i = 0; i < 4; ++i) {
            const float* p = PIXEL(dy, 2 * ty + i / 2, 2 * tx + i % 2, K);
            g[i] = p ? p : zeros.data();
        }
        float* out = dm + t * K;
        const int64_t ps = T * K;
        #pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
            float e[4][2];
            for (int j = 0; j < 2; ++j) {
                const float g0 = g[j][k], g1 = g[2 + j][k];
                e[0][j] = g0; e[1][j] = g0 + g1; e[2][j] = g0 - g1; e[3][j] = -g1;
            }
            for (int i = 0; i < 4; ++i) {
                out[(4 * i) * ps + k] = e[i][0];
                out[(4 * i + 1) * ps + k] = e[i][0] + e[i][1];
                out[(4 * i + 2) * ps + k] = e[i][0] - e[i][1];
                out[(4 * i + 3) * ps + k] = -e[i][1];
            }
        }
    }
}

// dx += B dV B^T on each tile's patch, the adjoint of md_winograd_input; dx must be zero on entry. Patches
// overlap by two rows and columns: threads take whole tile rows, first the even ones (by b * th + ty), then the
// odd ones; rows two apart touch disjoint pixels.
extern "C" void md_winograd_input_grad(const float* dv, float* dx, int64_t B, int64_t H, int64_t W, int64_t C,
                                       int64_t th, int64_t tw) {
    const int64_t ps = B * th * tw * C;
    for (int parity = 0; parity < 2; ++parity) {
        #pragma omp parallel
        {
            std::vector<float> sink(C);
            #pragma omp for schedule(static)
            for (int64_t row = parity; row < B * th; row += 2) {
                const int64_t b = row / th, ty = row % th;
                for (int64_t tx = 0; tx < tw; ++tx) {
                    float* o[16];
                    for (int i = 0; i < 16; ++i) {
                        float* p = PIXEL(dx, 2 * ty - 1 + i / 4, 2 * tx - 1 + i % 4, C);
                        o[i] = p ? p : sink.data();
                    }
                    const float* in = dv + (row * tw + tx) * C;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; ++c) {
                        float r[4][4];  // B dV: the columns of B^T are (1,0,0,0) (0,1,-1,1) (-1,1,1,0) (0,0,0,-1)
                        for (int j = 0; j < 4; ++j) {
                            const float v0 = in[j * ps + c], v1 = in[(4 + j) * ps + c], v2 = in[(8 + j) * ps + c],
                                        v3 = in[(12 + j) * ps + c];
                            r[0][j] = v0; r[1][j] = v1 - v2 + v3; r[2][j] = v1 + v2 - v0; r[3][j] = -v3;
                        }
                        for (int i = 0; i < 4; ++i) {
                            o[4 * i][c] += r[i][0];
                            o[4 * i + 1][c] += r[i][1] - r[i][2] + r[i][3];
                            o[4 * i + 2][c] += r[i][1] + r[i][2] - r[i][0];
                            o[4 * i + 3][c] -= r[i][3];
                        }
                    }
                }
            }
        }
    }
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels, built once (ops/cpu.py's build), or None after a warning when they cannot be built."""
    try:
        lib = ctypes.CDLL(str(cpu.build(_SOURCE, "winograd")))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"minidiff.ops.winograd: the C++ kernels are unavailable ({err}); using the pure-torch "
                      "transforms", RuntimeWarning, stacklevel=3)
        return None
    for name, pointers, sizes in (("input", 2, 8), ("output", 3, 8), ("output_grad", 2, 6), ("input_grad", 2, 6)):
        getattr(lib, f"md_winograd_{name}").argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * sizes
    return lib


def _tiles(h: int, w: int) -> tuple[int, int]:
    return (h + 1) // 2, (w + 1) // 2


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T for every (k, c): (K, C, 3, 3) -> (16, K, C), position p = 4 i + j of the 4x4 tile."""
    k, c = weight.shape[:2]
    return (_FILTER.to(weight) @ weight.reshape(k * c, 9).T).view(16, k, c)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"winograd_conv3x3 needs a (K, C, 3, 3) weight, got {tuple(weight.shape)}")
    if x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"winograd_conv3x3: input {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"winograd_conv3x3: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")


def _reference(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same algorithm in torch ops (any device and dtype; autograd differentiates it)."""
    b, c, h, w = x.shape
    th, tw = _tiles(h, w)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + w % 2, 1, 1 + h % 2))  # (B, 2th+2, 2tw+2, C)
    s = xp.stride()
    d = xp.as_strided((4, 4, b, th, tw, c), (s[1], s[2], s[0], 2 * s[1], 2 * s[2], s[3]))  # 4x4 patches
    v = (_INPUT.to(x) @ d.reshape(16, -1)).view(16, -1, c)  # (16, T, C)
    m = torch.bmm(v, u.transpose(1, 2))  # (16, T, K)
    y = (_OUTPUT.to(x) @ m.view(16, -1)).view(2, 2, b, th, tw, -1)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(b, 2 * th, 2 * tw, -1)[:, :h, :w]  # (B, H, W, K)
    return (y if bias is None else y + bias).permute(0, 3, 1, 2)


class _WinogradConv(torch.autograd.Function):
    """The fast path: NHWC float32 CPU tensors through the C++ transforms and torch.bmm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor):
        lib, (b, c, h, w), k = _library(), x.shape, weight.shape[0]
        th, tw = _tiles(h, w)
        tiles = b * th * tw
        x = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): a view for channels_last input
        bias = None if bias is None else bias.contiguous()
        y = x.new_empty(b, h, w, k)
        keep = any(ctx.needs_input_grad[:2])  # the backward needs all of V; else V lives one chunk at a time
        v = x.new_empty(16, tiles, c) if keep else None
        if keep:
            lib.md_winograd_input(x.data_ptr(), v.data_ptr(), b, h, w, c, th, tw, 0, tiles)
        chunk = min(CHUNK_TILES, tiles)
        v_buf, m_buf = x.new_empty(16 * chunk * c), x.new_empty(16 * chunk * k)
        for t0 in range(0, tiles, chunk):
            n = min(chunk, tiles - t0)
            if keep:
                v_chunk = v[:, t0:t0 + n]
            else:
                v_chunk = v_buf[:16 * n * c].view(16, n, c)
                lib.md_winograd_input(x.data_ptr(), v_chunk.data_ptr(), b, h, w, c, th, tw, t0, n)
            m = torch.bmm(v_chunk, u.transpose(1, 2), out=m_buf[:16 * n * k].view(16, n, k))  # (16, n, K)
            lib.md_winograd_output(m.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), b, h, w,
                                   k, th, tw, t0, n)
        ctx.save_for_backward(v, u)
        return y.permute(0, 3, 1, 2)  # (B, K, H, W), channels_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        lib, (v, u), (b, k, h, w) = _library(), ctx.saved_tensors, dy.shape
        th, tw, c = *_tiles(h, w), v.shape[2]
        dy_nhwc = dy.permute(0, 2, 3, 1).contiguous()
        dm = v.new_empty(16, b * th * tw, k)
        lib.md_winograd_output_grad(dy_nhwc.data_ptr(), dm.data_ptr(), b, h, w, k, th, tw)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dv = torch.bmm(dm, u)  # (16, T, C)
            dx = v.new_zeros(b, h, w, c)
            lib.md_winograd_input_grad(dv.data_ptr(), dx.data_ptr(), b, h, w, c, th, tw)
            dx = dx.permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:  # dU[p] = dM[p]^T V[p], then the adjoint of the filter transform
            du = torch.bmm(dm.transpose(1, 2), v)  # (16, K, C)
            dweight = (du.view(16, k * c).T @ _FILTER).view(k, c, 3, 3)
        if ctx.needs_input_grad[2]:
            dbias = dy_nhwc.sum((0, 1, 2))
        return dx, dweight, dbias, None


def has_fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``winograd_conv3x3(x, weight)`` runs the C++ kernels (float32 CPU tensors, a compiler)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and not torch.compiler.is_compiling() and _library() is not None)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     transformed_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a (K, C, 3, 3) ``weight`` by Winograd F(2x2, 3x3):
    x (B, C, H, W), any H and W, NCHW or channels_last; the output has x's memory format. Differentiable
    in x, weight and bias. ``transformed_weight``: ``transform_weight(weight)`` computed beforehand (an
    inference cache; it must match ``weight``, which still receives the gradient)."""
    _check(x, weight, bias)
    if not has_fast_path(x, weight):  # autograd differentiates the filter transform if the weight needs it
        recompute = transformed_weight is None or (torch.is_grad_enabled() and weight.requires_grad)
        y = _reference(x, transform_weight(weight) if recompute else transformed_weight, bias)
    else:  # _WinogradConv computes the weight's gradient itself: U is only a value
        if transformed_weight is None:
            with torch.no_grad():
                transformed_weight = transform_weight(weight)
        y = _WinogradConv.apply(x, weight, bias, transformed_weight.detach().contiguous())
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

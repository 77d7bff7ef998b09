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

Why: on the CPU, oneDNN's direct 3x3 convolution already runs near the FMA peak (~40 of ~42 GF/s on one core
of the dev box), so only fewer multiplications make it faster. Float32 CPU tensors with channels in
multiples of 8 take the C++ path (NHWC), in chunks of about CHUNK_TILES tiles (whole tile rows) whose V and M
stay in cache: input transform, the P products, output transform. The products run in a 6x16
register-blocked kernel (GCC vector extensions: 12 accumulators of 8 floats) at ~38 GF/s, where MKL's bmm
reached ~30 at these shapes. Each transform is one template over tables written from MATRICES, unrolled so
that zero entries cost nothing. The backward runs by chunks too and recomputes V from the input rather than
saving it: dM = A dY A^T, dV[p] = dM[p] U[p]^T, dx += B dV B^T (chunks two apart share no input pixel: the
even chunks run first, then the odd ones), dU[p] += dM[p]^T V[p] and dweight = G^T dU G. Everything else
takes the pure-torch reference (the same math, differentiated by autograd).
"""
from __future__ import annotations

import ctypes
import functools
import subprocess
import warnings

import torch
import torch.nn.functional as F

from . import cpu

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
# Tiles per chunk (rounded to whole tile rows): 128 was the fastest, or within 5%, of 32-256 at 32-512
# channels, forward and backward; smaller chunks read U (and in the backward accumulate dU) more often.
CHUNK_TILES = 128

_SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num() { return 0; }
#endif

typedef float v8 __attribute__((vector_size(32)));  // 8 channels: C and K are multiples of 8
static inline v8 ld(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
static inline void st(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
static std::unique_ptr<float[]> buffer(int64_t n) { return std::unique_ptr<float[]>(new float[n]); }

template <int M> struct Tile;  // the transforms as constant tables: BT = B^T, B, G, GT = G^T, AT = A^T, A
@TABLES@

// y(i, j, Z[i][j]) for Z = L X L^T, L a constant (P x Q) table, X (Q x Q) read through x(k, l). The loops
// unroll completely, so zeros in L cost nothing and +-1 no multiply (the sums start at -0.0f, and -0.0f + v = v).
template <int P, int Q, typename X, typename Y>
static inline void sandwich(const float (&L)[P][Q], X x, Y y) {
    v8 r[P][Q];
    #pragma GCC unroll 8
    for (int i = 0; i < P; ++i)
        #pragma GCC unroll 8
        for (int l = 0; l < Q; ++l) {
            v8 s = v8{} * -1.0f;
            #pragma GCC unroll 8
            for (int k = 0; k < Q; ++k) if (L[i][k] != 0.0f) s += L[i][k] * x(k, l);
            r[i][l] = s;
        }
    #pragma GCC unroll 8
    for (int i = 0; i < P; ++i)
        #pragma GCC unroll 8
        for (int j = 0; j < P; ++j) {
            v8 s = v8{} * -1.0f;
            #pragma GCC unroll 8
            for (int l = 0; l < Q; ++l) if (L[j][l] != 0.0f) s += L[j][l] * r[i][l];
            y(i, j, s);
        }
}

// Tile t = (b, ty, tx) of B*th*tw reads the a x a patch from row M ty - 1, column M tx - 1 (zero outside the
// image) and owns the M x M outputs from (M ty, M tx); images NHWC. tiles() calls body(px, t - t0) for the tiles
// t0 <= t < t0 + n of a chunk, px the size x size pixels from (M ty + origin, M tx + origin), each a row of ch
// floats, or fill outside the image (zeros to read, a sink to write). A chunk's buffers hold position p of tile t
// at buf[(p * n + t - t0) * C + c].
struct Geometry {
    int64_t B, H, W, C, K, th, tw;
    template <int M, typename Ptr, typename F>
    void tiles(Ptr img, int64_t ch, int64_t t0, int64_t n, int origin, int size, Ptr fill, F body) const {
        for (int64_t t = t0; t < t0 + n; ++t) {
            const int64_t b = t / (th * tw), ty = t / tw % th, tx = t % tw;
            Ptr px[(M + 2) * (M + 2)];
            for (int i = 0; i < size * size; ++i) {
                const int64_t yy = M * ty + origin + i / size, xx = M * tx + origin + i % size;
                px[i] = yy >= 0 && yy < H && xx >= 0 && xx < W ? img + ((b * H + yy) * W + xx) * ch : fill;
            }
            body(px, t - t0);
        }
    }
};

template <int M>  // V = B^T d B
static void input_tiles(const Geometry& g, const float* x, float* v, const float* zeros, int64_t t0, int64_t n) {
    constexpr int A = M + 2;
    g.tiles<M>(x, g.C, t0, n, -1, A, zeros, [&](const float** d, int64_t t) {
        for (int64_t c = 0; c < g.C; c += 8)
            sandwich(Tile<M>::BT, [&](int i, int j) { return ld(d[i * A + j] + c); },
                     [&](int i, int j, v8 z) { st(v + ((i * A + j) * n + t) * g.C + c, z); });
    });
}

template <int M>  // Y = A^T M A + bias
static void output_tiles(const Geometry& g, const float* m, const float* bias, float* y, float* sink, int64_t t0,
                         int64_t n) {
    constexpr int A = M + 2;
    g.tiles<M>(y, g.K, t0, n, 0, M, sink, [&](float** o, int64_t t) {
        for (int64_t k = 0; k < g.K; k += 8) {
            const v8 bk = bias ? ld(bias + k) : v8{};
            sandwich(Tile<M>::AT, [&](int i, int j) { return ld(m + ((i * A + j) * n + t) * g.K + k); },
                     [&](int i, int j, v8 z) { st(o[i * M + j] + k, z + bk); });
        }
    });
}

template <int M>  // dM = A dY A^T, the adjoint of output_tiles
static void output_grad_tiles(const Geometry& g, const float* dy, float* dm, const float* zeros, int64_t t0,
                              int64_t n) {
    constexpr int A = M + 2;
    g.tiles<M>(dy, g.K, t0, n, 0, M, zeros, [&](const float** e, int64_t t) {
        for (int64_t k = 0; k < g.K; k += 8)
            sandwich(Tile<M>::A, [&](int i, int j) { return ld(e[i * M + j] + k); },
                     [&](int i, int j, v8 z) { st(dm + ((i * A + j) * n + t) * g.K + k, z); });
    });
}

template <int M>  // dx += B dV B^T on each tile's patch, the adjoint of input_tiles
static void input_grad_tiles(const Geometry& g, const float* dv, float* dx, float* sink, int64_t t0, int64_t n) {
    constexpr int A = M + 2;
    g.tiles<M>(dx, g.C, t0, n, -1, A, sink, [&](float** o, int64_t t) {
        for (int64_t c = 0; c < g.C; c += 8)
            sandwich(Tile<M>::B, [&](int i, int j) { return ld(dv + ((i * A + j) * n + t) * g.C + c); },
                     [&](int i, int j, v8 z) { float* p = o[i * A + j] + c; st(p, ld(p) + z); });
    });
}

// out[p][r][s] = (L X L^T)[p] with X[q] = in[q][r][s] for each (r, s): in (Q^2, R, S) -> out (P^2, R, S). With
// L = G: the filter transform, 3x3 -> a x a; with L = G^T, its adjoint.
template <int P, int Q>
static void filters(const float (&L)[P][Q], const float* in, float* out, int64_t R, int64_t S) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; ++r)
        for (int64_t s = 0; s < S; s += 8)
            sandwich(L, [&](int i, int j) { return ld(in + ((i * Q + j) * R + r) * S + s); },
                     [&](int i, int j, v8 z) { st(out + ((i * P + j) * R + r) * S + s, z); });
}

// c[i, j] (+)= sum_l a[i rs + l cs] b[l ldb + j] for R rows and 16 columns: 2R vector accumulators
template <int R>
static void micro(const float* a, int64_t rs, int64_t cs, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t inner, bool add) {
    v8 s[R][2] = {};
    for (int64_t l = 0; l < inner; ++l) {
        const v8 b0 = ld(b + l * ldb), b1 = ld(b + l * ldb + 8);
        for (int r = 0; r < R; ++r) {
            const float e = a[r * rs + l * cs];
            s[r][0] += e * b0;
            s[r][1] += e * b1;
        }
    }
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) {
            float* o = c + r * ldc + 8 * h;
            st(o, add ? ld(o) + s[r][h] : s[r][h]);
        }
}

// C (rows x cols, row stride ldc) (+)= A B, A's element (i, l) at a[i rs + l cs], B row-major (row stride ldb)
static void gemm(const float* a, int64_t rs, int64_t cs, const float* b, int64_t ldb, float* c, int64_t ldc,
                 int64_t rows, int64_t inner, int64_t cols, bool add) {
    constexpr int64_t KC = 256;  // a 16-column panel of B, KC rows (16 KB), stays in L1 while the rows pass
    static decltype(&micro<6>) const kernels[] = {micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16)
        for (int64_t l = 0; l < inner; l += KC)
            for (int64_t i = 0; i < rows; i += 6) {
                const float* ai = a + i * rs + l * cs;
                const float* bl = b + l * ldb + j;
                float* ci = c + i * ldc + j;
                kernels[std::min<int64_t>(6, rows - i) - 1](ai, rs, cs, bl, ldb, ci, ldc, std::min(KC, inner - l),
                                                            add || l > 0);
            }
    for (; j < cols; ++j)  // the last cols % 16 columns
        for (int64_t i = 0; i < rows; ++i) {
            float s = add ? c[i * ldc + j] : 0.0f;
            for (int64_t l = 0; l < inner; ++l) s += a[i * rs + l * cs] * b[l * ldb + j];
            c[i * ldc + j] = s;
        }
}

// Y (B, H, W, K) = conv(x (B, H, W, C)) + bias with u (P, C, K), by chunks of `rows` tile rows
template <int M>
static void forward(const Geometry& g, const float* x, const float* u, const float* bias, float* y, int64_t rows) {
    constexpr int P = (M + 2) * (M + 2);
    const int64_t T = g.B * g.th * g.tw, chunk = std::min(rows * g.tw, T);
    #pragma omp parallel
    {
        auto v = buffer(P * chunk * g.C), m = buffer(P * chunk * g.K);
        std::vector<float> zeros(g.C), sink(g.K);
        #pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < T; t0 += chunk) {
            const int64_t n = std::min(chunk, T - t0);
            input_tiles<M>(g, x, v.get(), zeros.data(), t0, n);
            for (int p = 0; p < P; ++p)
                gemm(v.get() + p * n * g.C, g.C, 1, u + p * g.C * g.K, g.K, m.get() + p * n * g.K, g.K, n, g.C, g.K,
                     false);
            output_tiles<M>(g, m.get(), bias, y, sink.data(), t0, n);
        }
    }
}

// dx (B, H, W, C; zero on entry) and dU (P, K, C) from dy (B, H, W, K), x and u_kc = U^T (P, K, C): either
// output may be null. Thread 0 sums dU in du itself (round robin gives it the first chunk, which writes rather
// than adds), the others in their own copies, added at the end.
template <int M>
static void backward(const Geometry& g, const float* x, const float* u_kc, const float* dy, float* dx, float* du,
                     int64_t rows) {
    constexpr int P = (M + 2) * (M + 2);
    const int64_t T = g.B * g.th * g.tw, chunk = std::min(rows * g.tw, T), chunks = (T + chunk - 1) / chunk;
    #pragma omp parallel
    {
        auto v = buffer(P * chunk * g.C), dm = buffer(P * chunk * g.K);
        std::vector<float> zeros(std::max(g.C, g.K)), sink(g.C);
        const bool own = du && omp_get_thread_num() > 0;
        auto own_du = buffer(own ? P * g.K * g.C : 0);
        float* acc = own ? own_du.get() : du;
        bool fresh = true;  // acc holds nothing yet
        for (int parity = 0; parity < 2; ++parity) {
            #pragma omp for schedule(static, 1)
            for (int64_t i = parity; i < chunks; i += 2) {
                const int64_t t0 = i * chunk, n = std::min(chunk, T - t0);
                output_grad_tiles<M>(g, dy, dm.get(), zeros.data(), t0, n);
                if (du) {
                    input_tiles<M>(g, x, v.get(), zeros.data(), t0, n);
                    for (int p = 0; p < P; ++p)  // dU[p] += dM[p]^T V[p]
                        gemm(dm.get() + p * n * g.K, 1, g.K, v.get() + p * n * g.C, g.C, acc + p * g.K * g.C, g.C,
                             g.K, n, g.C, !fresh);
                    fresh = false;
                }
                if (dx) {
                    for (int p = 0; p < P; ++p)  // dV[p] = dM[p] U[p]^T, into V's buffer
                        gemm(dm.get() + p * n * g.K, g.K, 1, u_kc + p * g.K * g.C, g.C, v.get() + p * n * g.C, g.C,
                             n, g.K, g.C, false);
                    input_grad_tiles<M>(g, v.get(), dx, sink.data(), t0, n);
                }
            }
        }
        if (own && !fresh) {
            #pragma omp critical
            for (int64_t i = 0; i < P * g.K * g.C; ++i) du[i] += acc[i];
        }
    }
}

#define GEOMETRY const Geometry g{B, H, W, C, K, (H + m - 1) / m, (W + m - 1) / m}
extern "C" void md_winograd_forward(int m, const float* x, const float* u, const float* bias, float* y, int64_t B,
                                    int64_t H, int64_t W, int64_t C, int64_t K, int64_t rows) {
    GEOMETRY;
    if (m == 2) forward<2>(g, x, u, bias, y, rows);
    else forward<4>(g, x, u, bias, y, rows);
}

extern "C" void md_winograd_backward(int m, const float* x, const float* u_kc, const float* dy, float* dx, float* du,
                                     int64_t B, int64_t H, int64_t W, int64_t C, int64_t K, int64_t rows) {
    GEOMETRY;
    if (m == 2) backward<2>(g, x, u_kc, dy, dx, du, rows);
    else backward<4>(g, x, u_kc, dy, dx, du, rows);
}

extern "C" void md_winograd_filter(int m, int adjoint, const float* in, float* out, int64_t R, int64_t S) {
    if (m == 2 && adjoint) filters(Tile<2>::GT, in, out, R, S);
    else if (m == 2) filters(Tile<2>::G, in, out, R, S);
    else if (adjoint) filters(Tile<4>::GT, in, out, R, S);
    else filters(Tile<4>::G, in, out, R, S);
}
"""


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
def _library() -> ctypes.CDLL | None:
    """The kernels, built once (ops/cpu.py's build), or None after a warning when they cannot be built."""
    try:
        lib = ctypes.CDLL(str(cpu.build(_SOURCE.replace("@TABLES@", _tables()), "winograd")))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"minidiff.ops.winograd: the C++ kernels are unavailable ({err}); using the pure-torch "
                      "transforms", RuntimeWarning, stacklevel=3)
        return None
    lib.md_winograd_forward.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6
    lib.md_winograd_backward.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6
    lib.md_winograd_filter.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_tile(tile: int) -> None:
    if tile not in TILES:
        raise ValueError(f"winograd: tile must be one of {TILES}, got {tile!r}")


def _filter(weight: torch.Tensor, tile: int, transposed: bool = False) -> torch.Tensor:
    """The C++ filter transform: U (P, C, K), or U^T (P, K, C) when ``transposed``."""
    w = weight.detach().permute(2, 3, 0, 1) if transposed else weight.detach().permute(2, 3, 1, 0)
    w = w.contiguous()  # (3, 3, rows, cols)
    u = w.new_empty((tile + 2) ** 2, *w.shape[2:])
    _library().md_winograd_filter(tile, 0, w.data_ptr(), u.data_ptr(), *w.shape[2:])
    return u


def transform_weight(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """U = G g G^T for every (k, c): (K, C, 3, 3) -> (P, C, K), position p = a i + j of the a x a tile.
    Differentiable (by autograd, in torch ops) when the weight requires grad."""
    _check_tile(tile)
    fast = has_fast_path(weight, weight)  # as for an input of C channels: float32 CPU, C and K multiples of 8
    if fast and not (torch.is_grad_enabled() and weight.requires_grad):
        return _filter(weight, tile)
    k, c = weight.shape[:2]
    u = _matrices(tile)[1].to(weight) @ weight.reshape(k * c, 9).T  # (P, K * C)
    return u.view(-1, k, c).transpose(1, 2).contiguous()


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


def _chunk_rows(tile: int, b: int, h: int, w: int) -> int:
    """Tile rows per chunk: about CHUNK_TILES tiles, and with several threads at least two chunks per thread
    (the backward runs the even chunks, then the odd ones)."""
    th, tw, threads = -(-h // tile), -(-w // tile), torch.get_num_threads()
    return max(1, min(CHUNK_TILES // tw, -(-b * th // (2 * threads)) if threads > 1 else b * th))


class _WinogradConv(torch.autograd.Function):
    """The fast path: NHWC float32 CPU tensors through the fused C++ kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor, tile: int):
        (b, c, h, w), k = x.shape, weight.shape[0]
        x = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): a view for channels_last input
        bias = None if bias is None else bias.contiguous()
        y = x.new_empty(b, h, w, k)
        _library().md_winograd_forward(tile, x.data_ptr(), u.data_ptr(), _ptr(bias), y.data_ptr(), b, h, w, c, k,
                                       _chunk_rows(tile, b, h, w))
        ctx.save_for_backward(x, weight)  # the backward recomputes V from x
        ctx.tile = tile
        return y.permute(0, 3, 1, 2)  # (B, K, H, W), channels_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (x, weight), tile, needs = ctx.saved_tensors, ctx.tile, ctx.needs_input_grad
        (b, h, w, c), k, lib = x.shape, weight.shape[0], _library()
        dy_nhwc = dy.permute(0, 2, 3, 1).contiguous()
        dx = x.new_zeros(x.shape) if needs[0] else None
        du = x.new_empty((tile + 2) ** 2, k, c) if needs[1] else None  # dU^T
        u_kc = _filter(weight, tile, transposed=True) if needs[0] else None
        lib.md_winograd_backward(tile, x.data_ptr(), _ptr(u_kc), dy_nhwc.data_ptr(), _ptr(dx), _ptr(du), b, h, w,
                                 c, k, _chunk_rows(tile, b, h, w))
        dweight = None
        if du is not None:
            dweight = x.new_empty(3, 3, k, c)
            lib.md_winograd_filter(tile, 1, du.data_ptr(), dweight.data_ptr(), k, c)
            dweight = dweight.permute(2, 3, 0, 1)  # (K, C, 3, 3)
        return (None if dx is None else dx.permute(0, 3, 1, 2), dweight,
                dy_nhwc.sum((0, 1, 2)) if needs[2] else None, None, None)


def has_fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``winograd_conv3x3(x, weight)`` runs the C++ kernels: float32 CPU tensors, input and output
    channels in multiples of 8 (the kernels' vector width), a compiler."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0 and not torch.compiler.is_compiling()
            and _library() is not None)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, tile: int = 4,
                     transformed_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a (K, C, 3, 3) ``weight`` by Winograd F(tile x tile, 3x3),
    ``tile`` 2 or 4: x (B, C, H, W), any H and W, NCHW or channels_last; the output has x's memory format.
    Differentiable in x, weight and bias. ``transformed_weight``: ``transform_weight(weight, tile)`` computed
    beforehand (an inference cache; it must match ``weight``, which still receives the gradient)."""
    _check(x, weight, bias, tile)
    if not has_fast_path(x, weight):  # autograd differentiates the filter transform if the weight needs it
        recompute = transformed_weight is None or (torch.is_grad_enabled() and weight.requires_grad)
        y = _reference(x, transform_weight(weight, tile) if recompute else transformed_weight, bias, tile)
    else:  # _WinogradConv computes the weight's gradient itself: U is only a value
        if transformed_weight is None:
            with torch.no_grad():
                transformed_weight = transform_weight(weight, tile)
        y = _WinogradConv.apply(x, weight, bias, transformed_weight.detach().contiguous(), tile)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

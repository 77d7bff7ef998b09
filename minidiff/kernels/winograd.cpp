// Winograd F(m x m, 3x3) kernels of winograd.py (its docstring explains them). winograd.py puts
// the transform tables, written from its MATRICES, in place of the TABLES marker below before compiling.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num() { return 0; }
static int omp_get_max_threads() { return 1; }
#endif

typedef float v8 __attribute__((vector_size(32)));  // 8 channels: C and K are multiples of 8
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // the same, unaligned: loads and stores
static inline v8 ld(const float* p) { return *reinterpret_cast<const v8u*>(p); }
static inline void st(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
static std::unique_ptr<float[]> buffer(int64_t n) { return std::unique_ptr<float[]>(new float[n]); }
// n floats or a few more: an odd number of 64-byte lines, so that the rows of a (rows, spaced(n)) array, read or
// written together, fall in different cache sets (at a multiple of 4 KB apart they would share one)
static int64_t spaced(int64_t n) { return 16 * ((n + 15) / 16 | 1); }

template <int M> struct Tile;  // the transforms as constant tables: BT = B^T, B, G, GT = G^T, AT = A^T, A
@TABLES@

// y(i, j, Z[i][j]) for Z = L X L^T, L a constant (P x Q) table, X (Q x Q) read through x(k, l): a column of X
// at a time, then a row of L X. The loops over L's entries unroll, so zeros in L cost nothing and +-1 no
// multiply (the sums start at -0.0f, and -0.0f + v = v); the outer ones do not, to keep the sums in registers.
template <int P, int Q, typename X, typename Y>
static inline void sandwich(const float (&L)[P][Q], X x, Y y) {
    v8 r[P][Q];
    #pragma GCC unroll 1
    for (int l = 0; l < Q; ++l) {
        v8 col[Q];
        #pragma GCC unroll 8
        for (int k = 0; k < Q; ++k) col[k] = x(k, l);
        #pragma GCC unroll 8
        for (int i = 0; i < P; ++i) {
            v8 s = v8{} * -1.0f;
            #pragma GCC unroll 8
            for (int k = 0; k < Q; ++k) if (L[i][k] != 0.0f) s += L[i][k] * col[k];
            r[i][l] = s;
        }
    }
    #pragma GCC unroll 1
    for (int i = 0; i < P; ++i) {
        v8 row[Q];
        #pragma GCC unroll 8
        for (int l = 0; l < Q; ++l) row[l] = r[i][l];
        #pragma GCC unroll 8
        for (int j = 0; j < P; ++j) {
            v8 s = v8{} * -1.0f;
            #pragma GCC unroll 8
            for (int l = 0; l < Q; ++l) if (L[j][l] != 0.0f) s += L[j][l] * row[l];
            y(i, j, s);
        }
    }
}

// A tile's patch: at(i, j) the row of floats of pixel (i, j). Inside the image the patch is strided; across its
// border, a table of pointers to the image or to a fill row (zeros to read, a sink to write).
template <typename Ptr> struct Inside {
    Ptr base; int64_t row, pixel;
    Ptr at(int i, int j) const { return base + i * row + j * pixel; }
};
template <typename Ptr, int S> struct Border {
    Ptr px[S * S];
    Ptr at(int i, int j) const { return px[i * S + j]; }
};

// Tile t = (b, ty, tx) of B*th*tw reads the a x a patch from row M ty - 1, column M tx - 1 (zero outside the
// image) and owns the M x M outputs from (M ty, M tx); images NHWC. tiles() calls body(patch, t - t0) for the
// tiles t0 <= t < t0 + n of a chunk, patch the S x S pixels from (M ty + origin, M tx + origin), each a row of ch
// floats. A chunk's buffers hold position p of tile t at buf[p * stride + (t - t0) * C + c].
struct Geometry {
    int64_t B, H, W, C, K, th, tw;
    template <int M, int S, typename Ptr, typename F>
    void tiles(Ptr img, int64_t ch, int64_t t0, int64_t n, int origin, Ptr fill, F body) const {
        for (int64_t t = t0; t < t0 + n; ++t) {
            const int64_t b = t / (th * tw), y0 = M * (t / tw % th) + origin, x0 = M * (t % tw) + origin;
            if (y0 >= 0 && y0 + S <= H && x0 >= 0 && x0 + S <= W) {
                body(Inside<Ptr>{img + ((b * H + y0) * W + x0) * ch, W * ch, ch}, t - t0);
                continue;
            }
            Border<Ptr, S> patch;
            for (int i = 0; i < S * S; ++i) {
                const int64_t yy = y0 + i / S, xx = x0 + i % S;
                patch.px[i] = yy >= 0 && yy < H && xx >= 0 && xx < W ? img + ((b * H + yy) * W + xx) * ch : fill;
            }
            body(patch, t - t0);
        }
    }
};

// The transforms of a chunk's tiles; scalars are copied into the lambdas, so that the compiler keeps them in
// registers across the stores.
template <int M>  // V = B^T d B
static void input_tiles(const Geometry& g, const float* x, float* v, int64_t stride, const float* zeros, int64_t t0,
                        int64_t n) {
    constexpr int A = M + 2;
    const int64_t C = g.C;
    g.tiles<M, A>(x, C, t0, n, -1, zeros, [=](const auto& d, int64_t t) {
        float* out = v + t * C;
        for (int64_t c = 0; c < C; c += 8)
            sandwich(Tile<M>::BT, [&](int i, int j) { return ld(d.at(i, j) + c); },
                     [&](int i, int j, v8 z) { st(out + (i * A + j) * stride + c, z); });
    });
}

template <int M>  // Y = A^T M A + bias
static void output_tiles(const Geometry& g, const float* m, int64_t stride, const float* bias, float* y, float* sink,
                         int64_t t0, int64_t n) {
    constexpr int A = M + 2;
    const int64_t K = g.K;
    g.tiles<M, M>(y, K, t0, n, 0, sink, [=](const auto& o, int64_t t) {
        const float* in = m + t * K;
        for (int64_t k = 0; k < K; k += 8) {
            const v8 bk = bias ? ld(bias + k) : v8{};
            sandwich(Tile<M>::AT, [&](int i, int j) { return ld(in + (i * A + j) * stride + k); },
                     [&](int i, int j, v8 z) { st(o.at(i, j) + k, z + bk); });
        }
    });
}

template <int M>  // dM = A dY A^T, the adjoint of output_tiles
static void output_grad_tiles(const Geometry& g, const float* dy, float* dm, int64_t stride, const float* zeros,
                              int64_t t0, int64_t n) {
    constexpr int A = M + 2;
    const int64_t K = g.K;
    g.tiles<M, M>(dy, K, t0, n, 0, zeros, [=](const auto& e, int64_t t) {
        float* out = dm + t * K;
        for (int64_t k = 0; k < K; k += 8)
            sandwich(Tile<M>::A, [&](int i, int j) { return ld(e.at(i, j) + k); },
                     [&](int i, int j, v8 z) { st(out + (i * A + j) * stride + k, z); });
    });
}

template <int M>  // dx += B dV B^T on each tile's patch, the adjoint of input_tiles
static void input_grad_tiles(const Geometry& g, const float* dv, int64_t stride, float* dx, float* sink, int64_t t0,
                             int64_t n) {
    constexpr int A = M + 2;
    const int64_t C = g.C;
    g.tiles<M, A>(dx, C, t0, n, -1, sink, [=](const auto& o, int64_t t) {
        const float* in = dv + t * C;
        for (int64_t c = 0; c < C; c += 8)
            sandwich(Tile<M>::B, [&](int i, int j) { return ld(in + (i * A + j) * stride + c); },
                     [&](int i, int j, v8 z) { float* p = o.at(i, j) + c; st(p, ld(p) + z); });
    });
}

// The 3x3 filters g_rs, r < R, s < S, of a weight read in place: element (i, j) of g_rs at
// w[r rs + s ss + i is + j js]; `at(r, s, i, j)` is that float, and 8 of them, s..s + 7, are one vector (loaded
// as one where ss is 1, as in channels_last weights, else gathered).
struct Filters {
    float* w; int64_t rs, ss, is, js;
    float* at(int64_t r, int64_t s, int i, int j) const { return w + r * rs + s * ss + i * is + j * js; }
    v8 load(const float* q) const {
        if (ss == 1) return ld(q);
        v8 v;
        for (int h = 0; h < 8; ++h) v[h] = q[h * ss];
        return v;
    }
    void store(float* q, v8 v) const {
        if (ss == 1) return st(q, v);
        for (int h = 0; h < 8; ++h) q[h * ss] = v[h];
    }
};

// The filter transform U = G g G^T of every filter of f, as (P, R, S) with each position's (R, S) spaced(R S)
// floats from the last and written as `panels` for gemm (the kernels' U)
template <int A>
static void filters(const float (&G)[A][3], const Filters& f, float* u, int64_t R, int64_t S) {
    const int64_t stride = spaced(R * S);
    #pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < S; s += 8)  // r inner: the lines of g_rs, ..., g_r(s + 7) serve the next r's too
        for (int64_t r = 0; r < R; ++r) {
            const int64_t j = s / 16 * 16, at = j * R + r * std::min<int64_t>(16, S - j) + s - j;
            sandwich(G, [&](int i, int k) { return f.load(f.at(r, s, i, k)); },
                     [&](int i, int k, v8 z) { st(u + (i * A + k) * stride + at, z); });
        }
}

// Its adjoint, dg = G^T dU G, from dU (P, R, S) row-major (positions spaced) into the filters of f
template <int A>
static void filter_grads(const float (&GT)[3][A], const float* du, const Filters& f, int64_t R, int64_t S) {
    const int64_t stride = spaced(R * S);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; ++r)
        for (int64_t s = 0; s < S; s += 8)
            sandwich(GT, [&](int i, int k) { return ld(du + (i * A + k) * stride + r * S + s); },
                     [&](int i, int k, v8 z) { f.store(f.at(r, s, i, k), z); });
}

// c[i, j] (+)= sum_l a[i rs + l cs] b[l ldb + j] for R rows and 8 NV columns: R NV vector accumulators
template <int R, int NV>
static void micro(const float* a, int64_t rs, int64_t cs, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t inner, bool add) {
    v8 s[R][NV] = {};
    for (int64_t l = 0; l < inner; ++l) {
        v8 bl[NV];
        for (int h = 0; h < NV; ++h) bl[h] = ld(b + l * ldb + 8 * h);
        for (int r = 0; r < R; ++r) {
            const float e = a[r * rs + l * cs];
            for (int h = 0; h < NV; ++h) s[r][h] += e * bl[h];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < NV; ++h) {
            float* o = c + r * ldc + 8 * h;
            st(o, add ? ld(o) + s[r][h] : s[r][h]);
        }
}

// C (rows x cols, row stride ldc) (+)= A B, A's element (i, l) at a[i rs + l cs]; B (inner x cols) row-major
// (row stride ldb) or, for `panels`, in 16-column panels: columns j..j + w of all rows contiguous, w floats a row,
// from b + j inner (w = min(16, cols - j); cols is a multiple of 8). Panels keep a panel's rows on few pages.
static void gemm(const float* a, int64_t rs, int64_t cs, const float* b, int64_t ldb, bool panels, float* c,
                 int64_t ldc, int64_t rows, int64_t inner, int64_t cols, bool add) {
    constexpr int64_t KC = 256;  // a 16-column panel of B, KC rows (16 KB), stays in L1 while the rows pass
    static decltype(&micro<6, 2>) const kernels[2][6] = {
        {micro<1, 1>, micro<2, 1>, micro<3, 1>, micro<4, 1>, micro<5, 1>, micro<6, 1>},
        {micro<1, 2>, micro<2, 2>, micro<3, 2>, micro<4, 2>, micro<5, 2>, micro<6, 2>}};
    for (int64_t j = 0; j < cols; j += 16) {
        const int64_t w = std::min<int64_t>(16, cols - j), stride = panels ? w : ldb;
        const float* bj = panels ? b + j * inner : b + j;
        for (int64_t l = 0; l < inner; l += KC)
            for (int64_t i = 0; i < rows; i += 6)
                kernels[w / 8 - 1][std::min<int64_t>(6, rows - i) - 1](a + i * rs + l * cs, rs, cs, bj + l * stride,
                                                                       stride, c + i * ldc + j, ldc,
                                                                       std::min(KC, inner - l), add || l > 0);
    }
}

// Y (B, H, W, K) = conv(x (B, H, W, C)) + bias with u (P, C, K) as filters() writes it, by chunks of `rows` tile
// rows
template <int M>
static void forward(const Geometry& g, const float* x, const float* u, const float* bias, float* y, int64_t rows) {
    constexpr int P = (M + 2) * (M + 2);
    const int64_t T = g.B * g.th * g.tw, chunk = std::min(rows * g.tw, T);
    #pragma omp parallel
    {
        const int64_t sv = spaced(chunk * g.C), sm = spaced(chunk * g.K), su = spaced(g.C * g.K);
        auto v = buffer(P * sv), m = buffer(P * sm);
        std::vector<float> zeros(g.C), sink(g.K);
        #pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < T; t0 += chunk) {
            const int64_t n = std::min(chunk, T - t0);
            input_tiles<M>(g, x, v.get(), sv, zeros.data(), t0, n);
            for (int p = 0; p < P; ++p)
                gemm(v.get() + p * sv, g.C, 1, u + p * su, g.K, true, m.get() + p * sm, g.K, n, g.C, g.K, false);
            output_tiles<M>(g, m.get(), sm, bias, y, sink.data(), t0, n);
        }
    }
}

// dx (B, H, W, C; zero on entry) and dU (P, K, C; positions spaced) from dy (B, H, W, K), x and u_kc = U^T
// (P, K, C) as filters() writes it: either output may be null. Chunks of whole images share no input pixel and
// run in one pass; otherwise chunks two apart share none: the even ones run first, then the odd ones. Thread 0 sums dU in du itself (round robin gives it the
// first chunk, which writes rather than adds), the others in their own copies, added at the end.
template <int M>
static void backward(const Geometry& g, const float* x, const float* u_kc, const float* dy, float* dx, float* du,
                     int64_t rows) {
    constexpr int P = (M + 2) * (M + 2);
    const int64_t T = g.B * g.th * g.tw, chunk = std::min(rows * g.tw, T), chunks = (T + chunk - 1) / chunk;
    const int passes = rows % g.th == 0 ? 1 : 2;
    std::vector<const float*> partial(omp_get_max_threads());  // the other threads' dU, when they hold one
    #pragma omp parallel
    {
        const int64_t sv = spaced(chunk * g.C), sm = spaced(chunk * g.K), su = spaced(g.C * g.K);
        auto v = buffer(P * sv), dm = buffer(P * sm);
        std::vector<float> zeros(std::max(g.C, g.K)), sink(g.C);
        const int thread = omp_get_thread_num();
        auto own_du = buffer(du && thread > 0 ? P * su : 0);
        float* acc = thread > 0 ? own_du.get() : du;
        bool fresh = true;  // acc holds nothing yet
        for (int pass = 0; pass < passes; ++pass) {
            #pragma omp for schedule(static, 1)
            for (int64_t i = pass; i < chunks; i += passes) {
                const int64_t t0 = i * chunk, n = std::min(chunk, T - t0);
                output_grad_tiles<M>(g, dy, dm.get(), sm, zeros.data(), t0, n);
                if (du) {
                    input_tiles<M>(g, x, v.get(), sv, zeros.data(), t0, n);
                    for (int p = 0; p < P; ++p)  // dU[p] += dM[p]^T V[p]
                        gemm(dm.get() + p * sm, 1, g.K, v.get() + p * sv, g.C, false, acc + p * su, g.C, g.K,
                             n, g.C, !fresh);
                    fresh = false;
                }
                if (dx) {
                    for (int p = 0; p < P; ++p)  // dV[p] = dM[p] U[p]^T, into V's buffer
                        gemm(dm.get() + p * sm, g.K, 1, u_kc + p * su, g.C, true, v.get() + p * sv, g.C, n,
                             g.K, g.C, false);
                    input_grad_tiles<M>(g, v.get(), sv, dx, sink.data(), t0, n);
                }
            }
        }
        if (du) {
            if (thread > 0 && !fresh) partial[thread] = acc;
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < P * su; i += 8) {
                v8 s = ld(du + i);
                for (const float* q : partial) if (q) s += ld(q + i);
                st(du + i, s);
            }
        }
    }
}

// The same by two phases for layers with few tiles and many channels, where each thread's dU copy would be
// large against the transforms themselves: the chunks write dM and V for all tiles into shared arrays (and
// dx as above), then each thread computes whole positions, dU[p] = dM[p]^T V[p] over all tiles, in place.
template <int M>
static void backward_shared(const Geometry& g, const float* x, const float* u_kc, const float* dy, float* dx,
                            float* du, int64_t rows) {
    constexpr int P = (M + 2) * (M + 2);
    const int64_t T = g.B * g.th * g.tw, chunk = std::min(rows * g.tw, T), chunks = (T + chunk - 1) / chunk;
    const int passes = rows % g.th == 0 ? 1 : 2;
    const int64_t sv = spaced(T * g.C), sm = spaced(T * g.K), su = spaced(g.C * g.K);
    auto v = buffer(du ? P * sv : 0), dm = buffer(P * sm);
    #pragma omp parallel
    {
        const int64_t sdv = spaced(chunk * g.C);
        auto dv = buffer(dx ? P * sdv : 0);
        std::vector<float> zeros(std::max(g.C, g.K)), sink(g.C);
        for (int pass = 0; pass < passes; ++pass) {
            #pragma omp for schedule(static, 1)
            for (int64_t i = pass; i < chunks; i += passes) {
                const int64_t t0 = i * chunk, n = std::min(chunk, T - t0);
                output_grad_tiles<M>(g, dy, dm.get() + t0 * g.K, sm, zeros.data(), t0, n);
                if (du) input_tiles<M>(g, x, v.get() + t0 * g.C, sv, zeros.data(), t0, n);
                if (dx) {
                    for (int p = 0; p < P; ++p)  // dV[p] = dM[p] U[p]^T
                        gemm(dm.get() + t0 * g.K + p * sm, g.K, 1, u_kc + p * su, g.C, true, dv.get() + p * sdv,
                             g.C, n, g.K, g.C, false);
                    input_grad_tiles<M>(g, dv.get(), sdv, dx, sink.data(), t0, n);
                }
            }
        }
        if (du) {
            #pragma omp for schedule(static)
            for (int p = 0; p < P; ++p)  // dU[p] = dM[p]^T V[p]
                gemm(dm.get() + p * sm, 1, g.K, v.get() + p * sv, g.C, false, du + p * su, g.C, g.K, T, g.C, false);
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
                                     int64_t B, int64_t H, int64_t W, int64_t C, int64_t K, int64_t rows,
                                     int shared) {
    GEOMETRY;
    auto run = m == 2 ? (shared ? backward_shared<2> : backward<2>) : (shared ? backward_shared<4> : backward<4>);
    run(g, x, u_kc, dy, dx, du, rows);
}

extern "C" int64_t md_winograd_spaced(int64_t n) { return spaced(n); }

extern "C" void md_winograd_filter(int m, const float* w, int64_t rs, int64_t ss, int64_t is, int64_t js, float* u,
                                   int64_t R, int64_t S) {
    const Filters f{const_cast<float*>(w), rs, ss, is, js};  // only read
    if (m == 2) filters(Tile<2>::G, f, u, R, S);
    else filters(Tile<4>::G, f, u, R, S);
}

extern "C" void md_winograd_filter_grad(int m, const float* du, float* w, int64_t rs, int64_t ss, int64_t is,
                                        int64_t js, int64_t R, int64_t S) {
    const Filters f{w, rs, ss, is, js};
    if (m == 2) filter_grads(Tile<2>::GT, du, f, R, S);
    else filter_grads(Tile<4>::GT, du, f, R, S);
}

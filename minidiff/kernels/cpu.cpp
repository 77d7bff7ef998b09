// The fast CPU kernels of cpu.py (its docstring explains them), compiled at first use.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
typedef uint16_t bf16;

static inline float load(float v) { return v; }
static inline float load(bf16 v) { uint32_t b = (uint32_t)v << 16; float f; std::memcpy(&f, &b, 4); return f; }
static inline void store(float* p, float v) { *p = v; }
static inline void store(bf16* p, float v) {  // round to nearest even; NaN stays NaN
    uint32_t b; std::memcpy(&b, &v, 4);
    *p = (b & 0x7fffffffu) > 0x7f800000u ? (bf16)0x7fc0 : (bf16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// The activation pass works on vectors of 8 floats (GCC vector extensions: AVX2 registers with -march=native):
// written out, because with `omp simd` on scalar code GCC vectorised the SiLU loop poorly (2.5x slower).
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
static inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
static inline v8 load8(const bf16* p) { v8h h; std::memcpy(&h, p, sizeof h); return (v8)(__builtin_convertvector(h, v8u) << 16); }
static inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
static inline void store8(bf16* p, v8 v) {  // as store(bf16*, float), lane by lane
    const v8u b = (v8u)v, nan = (v8u)((b & 0x7fffffffu) > 0x7f800000u);
    const v8u r = (((b + 0x7fffu + ((b >> 16) & 1u)) >> 16) & ~nan) | (nan & 0x7fc0u);
    const v8h h = __builtin_convertvector(r, v8h);
    std::memcpy(p, &h, sizeof h);
}

// exp(v) = 2^n 2^f, n = round(v log2 e) (by the 1.5 * 2^23 trick), |f| <= 1/2, and a degree-5 minimax
// polynomial for 2^f (rel. error 1.4e-7), v clamped to +-126 / log2 e: libm's expf does not vectorise.
static inline v8 exp8(v8 v) {
    v8 t = v * 1.44269504088896341f;
    t = t < -126.0f ? v8{} - 126.0f : t;
    t = t > 126.0f ? v8{} + 126.0f : t;
    const v8 shifted = t + 12582912.0f;  // round to nearest: n sits in the low mantissa bits
    const v8 n = shifted - 12582912.0f, f = t - n, f2 = f * f;
    const v8 p = (1.0000001192f + 6.9314694404e-1f * f) + f2 * ((2.4022121727e-1f + 5.5507425219e-2f * f)
                 + f2 * (9.6754599363e-3f + 1.3266970636e-3f * f));
    const v8i scale = ((v8i)shifted - 0x4B400000 + 127) << 23;  // 2^n as float bits
    return p * (v8)scale;
}

static inline v8 one_plus_exp(v8 v) { return exp8(v) + 1.0f; }

template <int ACT> static inline v8 activate(v8 v) {
    if (ACT == 1) return v / one_plus_exp(-v);  // SiLU
    if (ACT == 2) return v > 0.0f ? v : v8{};   // ReLU
    return v;
}

// y[i] = act(x[i] k + off) for one row, with per-element ks[i], offs[i] (channels_last rows) or else one
// (k, off); the last n % 8 values one at a time in lane 0, with the same arithmetic.
template <typename T, int ACT>
static void apply(const T* __restrict__ x, T* __restrict__ y, int64_t n, const float* __restrict__ ks,
                  const float* __restrict__ offs, float k = 0.0f, float off = 0.0f) {
    int64_t i = 0;
    if (ks)
        for (; i + 8 <= n; i += 8) store8(y + i, activate<ACT>(load8(x + i) * load8(ks + i) + load8(offs + i)));
    else
        for (; i + 8 <= n; i += 8) store8(y + i, activate<ACT>(load8(x + i) * k + off));
    for (; i < n; ++i) {
        v8 v{};
        v[0] = load(x[i]) * (ks ? ks[i] : k) + (ks ? offs[i] : off);
        store(y + i, activate<ACT>(v)[0]);
    }
}

// Sums of d = x[i] - x0 and d^2 over a contiguous row: 16 float lanes (one accumulator would make the
// loop latency-bound), folded into double every 1024 values.
template <typename T>
static void row_sums(const T* x, int64_t n, float x0, double* s, double* s2) {
    for (int64_t start = 0; start < n; start += 1024) {
        const int64_t end = start + 1024 < n ? start + 1024 : n;
        float a[16] = {0}, b[16] = {0};
        int64_t i = start;
        for (; i + 16 <= end; i += 16) {
            #pragma omp simd
            for (int j = 0; j < 16; ++j) { const float d = load(x[i + j]) - x0; a[j] += d; b[j] += d * d; }
        }
        for (; i < end; ++i) { const float d = load(x[i]) - x0; a[0] += d; b[0] += d * d; }
        for (int j = 0; j < 16; ++j) { *s += a[j]; *s2 += b[j]; }
    }
}

// Per-channel (mean, sum of squared deviations) of the group of channels c0..c0+cpg (merged as in
// Chan et al. 1979) -> per-channel k, off with y = (x + add - mean) rstd w (1 + scale) + b (1 + scale) + shift
// = x k + off. add, scale, shift point at the sample's C values.
static void group_stats(const double* mean, const double* m2, int64_t cpg, int64_t hw, float eps, double* gmean,
                        float* rstd) {
    double gm = 0.0, gm2 = 0.0;
    for (int64_t c = 0; c < cpg; ++c) gm += mean[c] / cpg;
    for (int64_t c = 0; c < cpg; ++c) gm2 += m2[c] + hw * (mean[c] - gm) * (mean[c] - gm);
    *gmean = gm;
    *rstd = 1.0f / std::sqrt((float)std::max(gm2 / (cpg * hw), 0.0) + eps);
}

static void group_coefficients(const double* mean, const double* m2, int64_t cpg, int64_t hw, int64_t c0,
                               const float* w, const float* b, const float* add, const float* scale,
                               const float* shift, float eps, float* k, float* off) {
    double gmean;
    float rstd;
    group_stats(mean, m2, cpg, hw, eps, &gmean, &rstd);
    for (int64_t c = 0; c < cpg; ++c) {
        const int64_t ch = c0 + c;
        const float s1 = scale ? 1.0f + scale[ch] : 1.0f;
        k[c] = rstd * (w ? w[ch] : 1.0f) * s1;
        off[c] = (b ? b[ch] : 0.0f) * s1 + (shift ? shift[ch] : 0.0f)
                 + ((add ? add[ch] : 0.0f) - (float)gmean) * k[c];
    }
}

// Per-channel mean (with add) and sum of squared deviations from the sums of x - x0 (x0: the channel's first
// value; the shift keeps the float sums small, so the variance does not cancel).
static inline void finish_moments(float x0, float add, double s, double s2, int64_t hw, double* mean, double* m2) {
    *mean = x0 + add + s / hw;
    *m2 = s2 - s * s / hw;
}

// Moments of the C channels of a contiguous sample (C rows of hw values).
template <typename T>
static void moments_nchw(const T* x, int64_t C, int64_t hw, const float* add, double* mean, double* m2) {
    for (int64_t c = 0; c < C; ++c) {
        double s = 0.0, s2 = 0.0;
        const float x0 = load(x[c * hw]);
        row_sums(x + c * hw, hw, x0, &s, &s2);
        finish_moments(x0, add ? add[c] : 0.0f, s, s2, hw, &mean[c], &m2[c]);
    }
}

// Moments of the C channels of a channels_last sample (hw rows of C values), vectorised over channels.
template <typename T>
static void moments_nhwc(const T* x, int64_t C, int64_t hw, const float* add, double* mean, double* m2) {
    std::vector<float> x0(C), a(C), b(C);
    std::vector<double> s(C), s2(C);
    for (int64_t c = 0; c < C; ++c) x0[c] = load(x[c]);
    for (int64_t start = 0; start < hw; start += 1024) {
        std::fill(a.begin(), a.end(), 0.0f);
        std::fill(b.begin(), b.end(), 0.0f);
        for (int64_t p = start; p < hw && p < start + 1024; ++p) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) { const float d = load(x[p * C + c]) - x0[c]; a[c] += d; b[c] += d * d; }
        }
        for (int64_t c = 0; c < C; ++c) { s[c] += a[c]; s2[c] += b[c]; }
    }
    for (int64_t c = 0; c < C; ++c) finish_moments(x0[c], add ? add[c] : 0.0f, s[c], s2[c], hw, &mean[c], &m2[c]);
}

// Contiguous: one task per (sample, group), whose cpg*hw values stay in cache from statistics to output.
template <typename T, int ACT>
static void group_norm_nchw(const T* x, T* y, const float* w, const float* b, const float* add, const float* sc,
                            const float* sh, int64_t B, int64_t C, int64_t hw, int64_t G, float eps) {
    const int64_t cpg = C / G;
    #pragma omp parallel
    {
        std::vector<double> mean(cpg), m2(cpg);  // per thread, not per task: tasks can be small
        std::vector<float> k(cpg), off(cpg);
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < B * G; ++task) {
            const int64_t n = task / G, c0 = (task % G) * cpg, first = n * C + c0;
            moments_nchw(x + first * hw, cpg, hw, add ? add + first : nullptr, mean.data(), m2.data());
            group_coefficients(mean.data(), m2.data(), cpg, hw, c0, w, b, add ? add + n * C : nullptr,
                               sc ? sc + n * C : nullptr, sh ? sh + n * C : nullptr, eps, k.data(), off.data());
            for (int64_t c = 0; c < cpg; ++c)
                apply<T, ACT>(x + (first + c) * hw, y + (first + c) * hw, hw, nullptr, nullptr, k[c], off[c]);
        }
    }
}

// channels_last: strided per-channel statistics per sample, then rows of C channels (vectorised output).
template <typename T, int ACT>
static void group_norm_nhwc(const T* x, T* y, const float* w, const float* b, const float* add, const float* sc,
                            const float* sh, int64_t B, int64_t C, int64_t hw, int64_t G, float eps) {
    const int64_t cpg = C / G;
    std::vector<float> k(B * C), off(B * C);
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < B; ++n) {
        std::vector<double> mean(C), m2(C);
        moments_nhwc(x + n * C * hw, C, hw, add ? add + n * C : nullptr, mean.data(), m2.data());
        for (int64_t c0 = 0; c0 < C; c0 += cpg)
            group_coefficients(&mean[c0], &m2[c0], cpg, hw, c0, w, b, add ? add + n * C : nullptr,
                               sc ? sc + n * C : nullptr, sh ? sh + n * C : nullptr, eps, &k[n * C + c0],
                               &off[n * C + c0]);
    }
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < B * hw; ++row)
        apply<T, ACT>(x + row * C, y + row * C, C, &k[row / hw * C], &off[row / hw * C]);
}

template <int ACT> static inline v8 activate_grad(v8 v) {  // d act(v) / dv
    if (ACT == 1) { const v8 s = 1.0f / one_plus_exp(-v); return s * (1.0f + v * (1.0f - s)); }
    if (ACT == 2) return v > 0.0f ? v8{} + 1.0f : v8{};
    return v8{} + 1.0f;
}

// (g, z, u) of 8 values: z = x k0 + k1, u = z k2 + k3, g = dy act'(u k4 + k5)
template <int ACT>
static inline void grad8(v8 xv, v8 dv, const v8* k, v8& g, v8& z, v8& u) {
    z = xv * k[0] + k[1];
    u = z * k[2] + k[3];
    g = dv * activate_grad<ACT>(u * k[4] + k[5]);
}

// The backward of y = act(pre), pre = u (1 + scale) + shift, u = z w + b, z = (x + add - mean) rstd, for whole
// groups of one float32 sample (channels_last or not), statistics recomputed from x. With g = dy
// act'(pre) and per channel G1 = sum g, G2 = sum g u, G3 = sum g z, Z1 = sum z (pass 1):
//   dshift = G1, dscale = G2, dw = (1 + scale) G3, db = (1 + scale) G1 (per sample; summed over the batch by
//   the caller), and with dz = g (1 + scale) w and group means mdz = mean(dz), mdzz = mean(dz z):
//   dx = rstd (dz - mdz - z mdzz) = g A + z Bc + Cc (pass 2, g kept from pass 1), dadd = sum dx = A G1 + Bc Z1 + Cc hw.
struct GnGrad {
    const float *w, *b, *add, *sc, *sh;
    float *dw, *db, *dadd, *dsc, *dsh;  // (B, C) each; dadd, dsc, dsh may be null
    int64_t C, hw, G;
    float eps;
};

enum { ZR, ZO, WC, BC, S1, SH, GA, GB, GC, NCOEF };  // per-channel coefficients of the backward

// The coefficients of channel c (NCHW: broadcast to the 8 lanes; kept while c stays the same, as along an
// NCHW row) or of channels c..c+lanes-1 (NHWC; lanes past them zero, which zeroes their terms); the values
// x, dy at i (lanes of them).
template <bool nhwc>
static inline void load_run(const std::vector<float>* coef, int64_t c, int lanes, const float* x,
                            const float* dy, int64_t i, v8* k, int64_t& loaded, v8& xv, v8& dv) {
    if (nhwc || c != loaded)
        for (int j = 0; j < NCOEF; ++j) {
            if (!nhwc) k[j] = v8{} + coef[j][c];
            else if (lanes == 8) k[j] = load8(&coef[j][c]);
            else { k[j] = v8{}; for (int l = 0; l < lanes; ++l) k[j][l] = coef[j][c + l]; }
        }
    loaded = c;
    if (lanes == 8) { xv = load8(x + i); dv = load8(dy + i); return; }
    xv = v8{}; dv = v8{};
    for (int l = 0; l < lanes; ++l) { xv[l] = x[i + l]; dv[l] = dy[i + l]; }
}

// Calls body(c, i, lanes) for the sample's runs of up to 8 values along its contiguous axis: of one channel c
// (NCHW) or of channels c..c+lanes-1 of one pixel (NHWC); after_pixel(p) after each NHWC pixel.
template <bool nhwc, typename Body, typename After>
static inline void runs(int64_t C, int64_t hw, Body body, After after_pixel) {
    if (nhwc) {
        for (int64_t p = 0; p < hw; ++p) {
            for (int64_t c = 0; c < C; c += 8) body(c, p * C + c, (int)std::min<int64_t>(8, C - c));
            after_pixel(p);
        }
    } else {
        for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < hw; i += 8) body(c, c * hw + i, (int)std::min<int64_t>(8, hw - i));
    }
}

template <int ACT, bool nhwc>
static void group_norm_backward_part(const GnGrad& a, int64_t n, int64_t first, int64_t C, const float* x,
                                     const float* dy, float* dx) {
    // channels first .. first + C - 1 of sample n, whole groups: one (NCHW, x at its first value) or all (NHWC)
    const int64_t hw = a.hw, cpg = a.C / a.G, P = n * a.C + first;  // P: the part's first (sample, channel)
    std::vector<double> mean(C), m2(C), sums(4 * C, 0.0);  // sums: G1, G2, G3, Z1 per channel
    std::vector<float> coef[NCOEF];
    for (auto& v : coef) v.assign(C, 0.0f);
    if (nhwc) moments_nhwc(x, C, hw, a.add ? a.add + P : nullptr, mean.data(), m2.data());
    else moments_nchw(x, C, hw, a.add ? a.add + P : nullptr, mean.data(), m2.data());
    for (int64_t c0 = 0; c0 < C; c0 += cpg) {
        double gmean;
        float rstd;
        group_stats(&mean[c0], &m2[c0], cpg, hw, a.eps, &gmean, &rstd);
        for (int64_t c = c0; c < c0 + cpg; ++c) {
            coef[ZR][c] = rstd;
            coef[ZO][c] = ((a.add ? a.add[P + c] : 0.0f) - (float)gmean) * rstd;
            coef[WC][c] = a.w ? a.w[first + c] : 1.0f;
            coef[BC][c] = a.b ? a.b[first + c] : 0.0f;
            coef[S1][c] = a.sc ? 1.0f + a.sc[P + c] : 1.0f;
            coef[SH][c] = a.sh ? a.sh[P + c] : 0.0f;
        }
    }
    // pass 1: float lanes (NCHW: of the channel's row; NHWC: per channel, folded every 256 pixels) into double
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    std::vector<float> part(4 * C, 0.0f);
    v8 t[4] = {}, k[NCOEF];
    int64_t loaded = -1;  // the channel whose coefficients k holds
    runs<nhwc>(C, hw, [&](int64_t c, int64_t i, int lanes) {
        v8 xv, dv, g, z, u;
        load_run<nhwc>(coef, c, lanes, x, dy, i, k, loaded, xv, dv);
        grad8<ACT>(xv, dv, k, g, z, u);
        if (lanes == 8) store8(dx + i, g);  // g kept in dx for pass 2: one activation derivative per value
        else for (int l = 0; l < lanes; ++l) dx[i + l] = g[l];
        if (lanes < 8) {  // lanes past the run: out of the sums (NCHW: junk; NHWC: z = 0 already)
            const v8i keep = lane < lanes;
            g = (v8)((v8i)g & keep); z = (v8)((v8i)z & keep);
        }
        const v8 terms[4] = {g, g * u, g * z, z};
        if (!nhwc) {
            for (int j = 0; j < 4; ++j) t[j] += terms[j];
            if (i + lanes == (c + 1) * hw)  // the channel's last run
                for (int j = 0; j < 4; ++j) { for (int l = 0; l < 8; ++l) sums[j * C + c] += t[j][l]; t[j] = v8{}; }
            return;
        }
        for (int j = 0; j < 4; ++j) {
            if (lanes == 8) store8(&part[j * C + c], load8(&part[j * C + c]) + terms[j]);
            else for (int l = 0; l < lanes; ++l) part[j * C + c + l] += terms[j][l];
        }
    }, [&](int64_t p) {
        if (p % 256 == 255 || p == hw - 1) {
            for (int64_t j = 0; j < 4 * C; ++j) sums[j] += part[j];
            std::fill(part.begin(), part.end(), 0.0f);
        }
    });
    for (int64_t c0 = 0; c0 < C; c0 += cpg) {
        double mdz = 0.0, mdzz = 0.0;
        for (int64_t c = c0; c < c0 + cpg; ++c) {
            mdz += coef[S1][c] * coef[WC][c] * sums[c];
            mdzz += coef[S1][c] * coef[WC][c] * sums[2 * C + c];
        }
        mdz /= cpg * hw;
        mdzz /= cpg * hw;
        for (int64_t c = c0; c < c0 + cpg; ++c) {
            coef[GA][c] = coef[ZR][c] * coef[S1][c] * coef[WC][c];
            coef[GB][c] = (float)(-coef[ZR][c] * mdzz);
            coef[GC][c] = (float)(-coef[ZR][c] * mdz);
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        const int64_t o = P + c;
        a.dw[o] = (float)(coef[S1][c] * sums[2 * C + c]);
        a.db[o] = (float)(coef[S1][c] * sums[c]);
        if (a.dsh) a.dsh[o] = (float)sums[c];
        if (a.dsc) a.dsc[o] = (float)sums[C + c];
        if (a.dadd) a.dadd[o] = (float)(coef[GA][c] * sums[c] + coef[GB][c] * sums[3 * C + c] + coef[GC][c] * hw);
    }
    loaded = -1;  // GA, GB, GC are new
    runs<nhwc>(C, hw, [&](int64_t c, int64_t i, int lanes) {  // pass 2: dx = g A + z Bc + Cc, g from pass 1
        v8 xv, g;
        load_run<nhwc>(coef, c, lanes, x, dx, i, k, loaded, xv, g);
        const v8 d = g * k[GA] + (xv * k[ZR] + k[ZO]) * k[GB] + k[GC];
        if (lanes == 8) store8(dx + i, d);
        else for (int l = 0; l < lanes; ++l) dx[i + l] = d[l];
    }, [](int64_t) {});
}

extern "C" void md_group_norm_act_backward(int act, int nhwc, const float* x, const float* dy, float* dx,
                                           const float* w, const float* b, const float* add, const float* sc,
                                           const float* sh, float* dw, float* db, float* dadd, float* dsc,
                                           float* dsh, int64_t B, int64_t C, int64_t hw, int64_t G, float eps) {
    // NCHW: one task per (sample, group), whose values stay in cache through the three passes (like the
    // forward); channels_last: one per sample (a group's channels interleave with the others')
    const GnGrad a{w, b, add, sc, sh, dw, db, dadd, dsc, dsh, C, hw, G, eps};
    static decltype(&group_norm_backward_part<0, false>) const kernels[3][2] = {
        {group_norm_backward_part<0, false>, group_norm_backward_part<0, true>},
        {group_norm_backward_part<1, false>, group_norm_backward_part<1, true>},
        {group_norm_backward_part<2, false>, group_norm_backward_part<2, true>}};
    const int64_t parts = nhwc ? 1 : G, width = C / parts;
    #pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < B * parts; ++task) {
        const int64_t n = task / parts, c0 = task % parts * width, first = (n * C + c0) * hw;
        kernels[act][nhwc != 0](a, n, c0, width, x + first, dy + first, dx + first);
    }
}

#define GN_ARGS const float* w, const float* b, const float* add, const float* sc, const float* sh, \
    int64_t B, int64_t C, int64_t hw, int64_t G, float eps
#define GN_PASS w, b, add, sc, sh, B, C, hw, G, eps
template <typename T, int ACT>
static void group_norm_layout(const void* x, void* y, int nhwc, GN_ARGS) {
    if (nhwc) group_norm_nhwc<T, ACT>((const T*)x, (T*)y, GN_PASS);
    else group_norm_nchw<T, ACT>((const T*)x, (T*)y, GN_PASS);
}

template <typename T>
static void group_norm_act(const void* x, void* y, int act, int nhwc, GN_ARGS) {
    if (act == 1) group_norm_layout<T, 1>(x, y, nhwc, GN_PASS);
    else if (act == 2) group_norm_layout<T, 2>(x, y, nhwc, GN_PASS);
    else group_norm_layout<T, 0>(x, y, nhwc, GN_PASS);
}

extern "C" void md_group_norm_act(int bf, int act, int nhwc, const void* x, void* y, GN_ARGS) {
    if (bf) group_norm_act<bf16>(x, y, act, nhwc, GN_PASS); else group_norm_act<float>(x, y, act, nhwc, GN_PASS);
}

// ---------------------------------------------------------------------------------------------------------------
// Attention with narrow heads: o = softmax(q k^T scale) v for each (batch, head), heads of d = 8 D channels;
// q and o (B, Lq, C), k and v (B, Lk, C), head h in channels [h d, h d + d); q, k and v may have longer rows
// (ldq, ldk, ldv floats: slices of one q|k|v projection), o, dout and the gradients are contiguous. One task per
// (batch, head): the head's keys (and values, for the backward) transposed into (d, n8) copies, n8 = Lk rounded
// up to 8 with zeros, so that scores come 8 keys at a time; a block of Q queries shares each load (Q: as many
// independent FMA chains as fit in the 16 vector registers; measured, heads of 16: forward 6, heads of 8 / 16:
// backward 6 / 4, where 4 for all took 1.15-1.35x the forward time and 1.05-1.1x the backward's). The forward of
// heads of 8 puts the queries on the lanes instead (attention_forward_lanes: 0.81-0.86x this one's time).
// lse (B, heads, Lq): each score row's log-sum-exp, saved by the forward for the backward, which recomputes the
// probabilities from it
// (FlashAttention-2's backward: dS = P (dP - rowsum(dO o)), dQ = dS K scale, dK = dS^T Q scale, dV = P^T dO).
struct Heads { int64_t B, heads, Lq, Lk, C, ldq, ldk, ldv; float scale; };  // ld: q, k, v's row strides

static inline v8 vmax(v8 a, v8 b) { return a > b ? a : b; }
static inline float hmax(v8 v) { float m = v[0]; for (int i = 1; i < 8; ++i) m = std::max(m, v[i]); return m; }
static inline float hsum(v8 v) { float s = 0.0f; for (int i = 0; i < 8; ++i) s += v[i]; return s; }

template <int D>  // t (8 D, n8) = the head's n rows of x (row stride C), transposed; zeros beyond n
static void transpose_head(const float* x, int64_t C, int64_t n, int64_t n8, float* t) {
    for (int c = 0; c < 8 * D; ++c) {
        for (int64_t j = 0; j < n; ++j) t[c * n8 + j] = x[j * C + c];
        std::fill(t + c * n8 + n, t + (c + 1) * n8, 0.0f);
    }
}

template <int D, int Q>  // s[r][j] = scale (a_r . t[:, j]) for Q rows a_r (8 D floats each); -inf for j >= n
static void row_products(const float* const* a, const float* t, int64_t n, int64_t n8, float scale, float* s) {
    for (int64_t j = 0; j < n8; j += 8) {
        v8 acc[Q] = {};
        for (int c = 0; c < 8 * D; ++c) {
            const v8 tc = load8(t + c * n8 + j);
            for (int r = 0; r < Q; ++r) acc[r] += a[r][c] * tc;
        }
        for (int r = 0; r < Q; ++r) store8(s + r * n8 + j, acc[r] * scale);
    }
    for (int r = 0; r < Q; ++r) std::fill(s + r * n8 + n, s + (r + 1) * n8, -INFINITY);
}

// rows[r] = row i0 + r of x (row stride ld), the last row again past nq rows
template <int Q> static void block_rows(const float* x, int64_t ld, int64_t i0, int nq, const float** rows) {
    for (int r = 0; r < Q; ++r) rows[r] = x + (i0 + std::min(r, nq - 1)) * ld;
}

template <int D, int Q = 6>  // heads of 16 channels (D = 2)
static void attention_forward(const Heads& a, const float* q, const float* k, const float* v, float* o,
                              float* lse) {
    const int64_t n8 = (a.Lk + 7) / 8 * 8;
    #pragma omp parallel
    {
        std::vector<float> kt(8 * D * n8), s(Q * n8);
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < a.B * a.heads; ++task) {
            const int64_t b = task / a.heads, head = 8 * D * (task % a.heads);
            const float *qb = q + b * a.Lq * a.ldq + head, *vb = v + b * a.Lk * a.ldv + head;
            transpose_head<D>(k + b * a.Lk * a.ldk + head, a.ldk, a.Lk, n8, kt.data());
            for (int64_t i0 = 0; i0 < a.Lq; i0 += Q) {
                const int nq = (int)std::min<int64_t>(Q, a.Lq - i0);
                const float* qr[Q];
                block_rows<Q>(qb, a.ldq, i0, nq, qr);
                row_products<D, Q>(qr, kt.data(), a.Lk, n8, a.scale, s.data());
                float m[Q], l[Q];
                for (int r = 0; r < Q; ++r) {  // s <- exp(s - max), l = its sum
                    float* sr = s.data() + r * n8;
                    v8 mx = load8(sr);
                    for (int64_t j = 8; j < n8; j += 8) mx = vmax(mx, load8(sr + j));
                    m[r] = hmax(mx);
                    v8 sum = {};
                    for (int64_t j = 0; j < n8; j += 8) {
                        const v8 p = exp8(load8(sr + j) - m[r]);
                        store8(sr + j, p);
                        sum += p;
                    }
                    l[r] = hsum(sum);
                }
                v8 acc[Q][D] = {};
                for (int64_t j = 0; j < a.Lk; ++j) {
                    v8 vj[D];
                    for (int c = 0; c < D; ++c) vj[c] = load8(vb + j * a.ldv + 8 * c);
                    for (int r = 0; r < Q; ++r)
                        for (int c = 0; c < D; ++c) acc[r][c] += s[r * n8 + j] * vj[c];
                }
                for (int r = 0; r < nq; ++r) {
                    float* orow = o + (b * a.Lq + i0 + r) * a.C + head;
                    for (int c = 0; c < D; ++c) store8(orow + 8 * c, acc[r][c] / l[r]);
                    if (lse) lse[task * a.Lq + i0 + r] = m[r] + std::log(l[r]);
                }
            }
        }
    }
}

// Heads of 8 channels, forward: queries on the lanes instead, 8 at a time, so that the softmax over the keys runs
// along the loops, lane by lane, with no horizontal max or sum. s_j = (scale q) . k_j for every key j (k_j's
// channels broadcast; a tree of 4 products, short dependency chains) and their running max m; p_j = exp(s_j - m)
// and l = sum p_j; o = sum_j p_j v_j / l. Each loop is short, so that many iterations overlap.
static inline v8 dot_lanes(const v8 (&x)[8], const float* y) {
    return (x[0] * y[0] + x[1] * y[1]) + (x[2] * y[2] + x[3] * y[3]) + ((x[4] * y[4] + x[5] * y[5])
           + (x[6] * y[6] + x[7] * y[7]));
}

static void attention_forward_lanes(const Heads& a, const float* q, const float* k, const float* v, float* o,
                                    float* lse) {
    const int64_t l8 = (a.Lq + 7) / 8 * 8;
    #pragma omp parallel
    {
        std::vector<float> qt(8 * l8), s(8 * a.Lk), kc(8 * a.Lk), vc(8 * a.Lk);
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < a.B * a.heads; ++task) {
            const int64_t b = task / a.heads, head = 8 * (task % a.heads);
            float *sp = s.data(), *kb = kc.data(), *vb = vc.data();  // the head's keys and values, compact
            for (int64_t j = 0; j < a.Lk; ++j) {
                store8(kb + 8 * j, load8(k + (b * a.Lk + j) * a.ldk + head));
                store8(vb + 8 * j, load8(v + (b * a.Lk + j) * a.ldv + head));
            }
            transpose_head<1>(q + b * a.Lq * a.ldq + head, a.ldq, a.Lq, l8, qt.data());
            for (int64_t i0 = 0; i0 < a.Lq; i0 += 8) {
                v8 qc[8], m = v8{} - INFINITY;
                for (int c = 0; c < 8; ++c) qc[c] = load8(qt.data() + c * l8 + i0) * a.scale;
                for (int64_t j = 0; j < a.Lk; ++j) {
                    const v8 sj = dot_lanes(qc, kb + 8 * j);
                    store8(sp + 8 * j, sj);
                    m = vmax(m, sj);
                }
                v8 l = {};
                for (int64_t j = 0; j < a.Lk; ++j) {
                    const v8 p = exp8(load8(sp + 8 * j) - m);
                    store8(sp + 8 * j, p);
                    l += p;
                }
                v8 acc[8] = {};
                for (int64_t j = 0; j < a.Lk; ++j) {
                    const v8 pj = load8(sp + 8 * j);
                    const float* vj = vb + 8 * j;
                    for (int c = 0; c < 8; ++c) acc[c] += vj[c] * pj;
                }
                const int nq = (int)std::min<int64_t>(8, a.Lq - i0);
                for (int c = 0; c < 8; ++c) {
                    const v8 oc = acc[c] / l;
                    for (int r = 0; r < nq; ++r) o[(b * a.Lq + i0 + r) * a.C + head + c] = oc[r];
                }
                if (lse) for (int r = 0; r < nq; ++r) lse[task * a.Lq + i0 + r] = m[r] + std::log(l[r]);
            }
        }
    }
}

template <int D, int Q = (D == 1 ? 6 : 4)>
static void attention_backward(const Heads& a, const float* q, const float* k, const float* v, const float* o,
                               const float* dout, const float* lse, float* dq, float* dk, float* dv) {
    const int64_t n8 = (a.Lk + 7) / 8 * 8;
    #pragma omp parallel
    {
        std::vector<float> kt(8 * D * n8), vt(8 * D * n8), p(Q * n8), ds(Q * n8), dkh(a.Lk * 8 * D),
            dvh(a.Lk * 8 * D);
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < a.B * a.heads; ++task) {
            const int64_t b = task / a.heads, head = 8 * D * (task % a.heads);
            const float *qb = q + b * a.Lq * a.ldq + head, *ob = o + b * a.Lq * a.C + head;
            const float *db = dout + b * a.Lq * a.C + head, *kb = k + b * a.Lk * a.ldk + head;
            transpose_head<D>(kb, a.ldk, a.Lk, n8, kt.data());
            transpose_head<D>(v + b * a.Lk * a.ldv + head, a.ldv, a.Lk, n8, vt.data());
            std::fill(dkh.begin(), dkh.end(), 0.0f);
            std::fill(dvh.begin(), dvh.end(), 0.0f);
            for (int64_t i0 = 0; i0 < a.Lq; i0 += Q) {
                const int nq = (int)std::min<int64_t>(Q, a.Lq - i0);
                const float *qr[Q], *orow[Q], *dr[Q];
                block_rows<Q>(qb, a.ldq, i0, nq, qr);
                block_rows<Q>(ob, a.C, i0, nq, orow);
                block_rows<Q>(db, a.C, i0, nq, dr);
                row_products<D, Q>(qr, kt.data(), a.Lk, n8, a.scale, p.data());  // scores
                row_products<D, Q>(dr, vt.data(), a.Lk, n8, 1.0f, ds.data());    // dP = dO V^T
                v8 qv[Q][D], dv_[Q][D], dqa[Q][D] = {};
                for (int r = 0; r < Q; ++r) {
                    const bool real = r < nq;  // rows past nq repeat the last one: they must add nothing
                    const float lr = lse[task * a.Lq + i0 + std::min(r, nq - 1)];
                    v8 dot = {};
                    for (int c = 0; c < D; ++c) {
                        qv[r][c] = load8(qr[r] + 8 * c);
                        dv_[r][c] = real ? load8(dr[r] + 8 * c) : v8{};
                        dot += dv_[r][c] * load8(orow[r] + 8 * c);
                    }
                    const float delta = hsum(dot);
                    float *pr = p.data() + r * n8, *sr = ds.data() + r * n8;
                    for (int64_t j = 0; j < n8; j += 8) {  // P = exp(S - lse); dS = P (dP - delta) scale
                        const v8 pj = real ? exp8(load8(pr + j) - lr) : v8{};
                        store8(pr + j, pj);
                        store8(sr + j, pj * (load8(sr + j) - delta) * a.scale);
                    }
                }
                for (int64_t j = 0; j < a.Lk; ++j) {
                    float* dkj = dkh.data() + j * 8 * D;
                    float* dvj = dvh.data() + j * 8 * D;
                    for (int c = 0; c < D; ++c) {
                        const v8 kjc = load8(kb + j * a.ldk + 8 * c);
                        v8 dkc = load8(dkj + 8 * c), dvc = load8(dvj + 8 * c);
                        for (int r = 0; r < Q; ++r) {
                            const float sj = ds[r * n8 + j], pj = p[r * n8 + j];
                            dqa[r][c] += sj * kjc;
                            dkc += sj * qv[r][c];
                            dvc += pj * dv_[r][c];
                        }
                        store8(dkj + 8 * c, dkc);
                        store8(dvj + 8 * c, dvc);
                    }
                }
                for (int r = 0; r < nq; ++r)
                    for (int c = 0; c < D; ++c) store8(dq + (b * a.Lq + i0 + r) * a.C + head + 8 * c, dqa[r][c]);
            }
            for (int64_t j = 0; j < a.Lk; ++j)
                for (int c = 0; c < 8 * D; ++c) {
                    dk[(b * a.Lk + j) * a.C + head + c] = dkh[j * 8 * D + c];
                    dv[(b * a.Lk + j) * a.C + head + c] = dvh[j * 8 * D + c];
                }
        }
    }
}

#define HEAD_DIMS(CALL) if (d == 8) CALL(1); else CALL(2);  // cpu.py's ATTENTION_HEAD_DIMS

extern "C" void md_attention(int64_t d, const float* q, const float* k, const float* v, float* o, float* lse,
                             int64_t B, int64_t heads, int64_t Lq, int64_t Lk, int64_t ldq, int64_t ldk, int64_t ldv,
                             float scale) {
    const Heads a{B, heads, Lq, Lk, heads * d, ldq, ldk, ldv, scale};
    if (d == 8) attention_forward_lanes(a, q, k, v, o, lse);
    else attention_forward<2>(a, q, k, v, o, lse);
}

extern "C" void md_attention_backward(int64_t d, const float* q, const float* k, const float* v, const float* o,
                                      const float* dout, const float* lse, float* dq, float* dk, float* dv,
                                      int64_t B, int64_t heads, int64_t Lq, int64_t Lk, int64_t ldq, int64_t ldk,
                                      int64_t ldv, float scale) {
    const Heads a{B, heads, Lq, Lk, heads * d, ldq, ldk, ldv, scale};
#define BACKWARD(D) attention_backward<D>(a, q, k, v, o, dout, lse, dq, dk, dv)
    HEAD_DIMS(BACKWARD)
}

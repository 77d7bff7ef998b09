"""The fast CPU path: a small C++/OpenMP library built with the system compiler at first use.

Why (measured on the 2-core Zen dev box, fp32, (8, 128, 32, 32)): the reference GroupNorm+SiLU makes two
passes over memory and two temporaries (F.group_norm 0.8 ms + F.silu 2.0 ms on one thread, without the
allocations); torch.compile fuses them but ran only 1.15x faster (1.65 vs 1.9 ms, two threads) after a
20 s compile in a fresh process. Here each (sample, group) task computes its statistics, then writes
act(x k + off) while the group is still in L2, with an inline vectorised exp (libm's expf does not
vectorise): 1.95 ms on one thread, and 1.4-3.5x the reference in benchmarks/ops.py, which counts the
allocations as the UNet sees them. Without torch headers the library compiles in ~0.5 s; it links the
libgomp that torch has loaded (same soname), so torch.set_num_threads applies; ctypes releases the GIL.
No compiler: a one-time warning, then the reference ops.
Covered: float32 and bfloat16, contiguous or channels_last, activations silu/relu/none.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from ..files import atomic_path

_SOURCE = r"""
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

// 1 + exp(v) with exp(v) = 2^n 2^f, n = round(v log2 e) (by the 1.5 * 2^23 trick), |f| <= 1/2, and a
// degree-5 minimax polynomial for 2^f (rel. error 1.4e-7): libm's expf does not vectorise.
static inline v8 one_plus_exp(v8 v) {
    v8 t = v * 1.44269504088896341f;
    t = t < -126.0f ? v8{} - 126.0f : t;
    t = t > 126.0f ? v8{} + 126.0f : t;
    const v8 shifted = t + 12582912.0f;  // round to nearest: n sits in the low mantissa bits
    const v8 n = shifted - 12582912.0f, f = t - n, f2 = f * f;
    const v8 p = (1.0000001192f + 6.9314694404e-1f * f) + f2 * ((2.4022121727e-1f + 5.5507425219e-2f * f)
                 + f2 * (9.6754599363e-3f + 1.3266970636e-3f * f));
    const v8i scale = ((v8i)shifted - 0x4B400000 + 127) << 23;  // 2^n as float bits
    return p * (v8)scale + 1.0f;
}

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
static void group_coefficients(const double* mean, const double* m2, int64_t cpg, int64_t hw, int64_t c0,
                               const float* w, const float* b, const float* add, const float* scale,
                               const float* shift, float eps, float* k, float* off) {
    double gmean = 0.0, gm2 = 0.0;
    for (int64_t c = 0; c < cpg; ++c) gmean += mean[c] / cpg;
    for (int64_t c = 0; c < cpg; ++c) gm2 += m2[c] + hw * (mean[c] - gmean) * (mean[c] - gmean);
    const float rstd = 1.0f / std::sqrt((float)std::max(gm2 / (cpg * hw), 0.0) + eps);
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

// x0 = clamp(cx x + cm m, -clip, clip); prev = p0 x0 + px x + pm m + sigma noise (one pass, see ops/__init__).
template <typename T, bool NOISE>
static void scheduler_update(const T* x, const T* m, const T* noise, T* prev, T* x0, int64_t n, float cx,
                             float cm, float clip, float p0, float px, float pm, float sigma) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        const float xi = load(x[i]), mi = load(m[i]);
        float e = cx * xi + cm * mi;
        e = e < -clip ? -clip : (e > clip ? clip : e);
        store(x0 + i, e);
        store(prev + i, p0 * e + px * xi + pm * mi + (NOISE ? sigma * load(noise[i]) : 0.0f));
    }
}

template <typename T>
static void scheduler_update(const void* x, const void* m, const void* noise, void* prev, void* x0, int64_t n,
                             float cx, float cm, float clip, float p0, float px, float pm, float sigma) {
    if (noise) scheduler_update<T, true>((const T*)x, (const T*)m, (const T*)noise, (T*)prev, (T*)x0, n, cx, cm,
                                         clip, p0, px, pm, sigma);
    else scheduler_update<T, false>((const T*)x, (const T*)m, nullptr, (T*)prev, (T*)x0, n, cx, cm, clip, p0, px,
                                    pm, sigma);
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

extern "C" void md_scheduler_update(int bf, const void* x, const void* m, const void* noise, void* prev, void* x0,
                                    int64_t n, float cx, float cm, float clip, float p0, float px, float pm,
                                    float sigma) {
    if (bf) scheduler_update<bf16>(x, m, noise, prev, x0, n, cx, cm, clip, p0, px, pm, sigma);
    else scheduler_update<float>(x, m, noise, prev, x0, n, cx, cm, clip, p0, px, pm, sigma);
}
"""
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-fno-math-errno", "-fno-trapping-math"]
KERNEL_ACTIVATIONS = {"none": 0, "silu": 1, "relu": 2}
UPDATE_COEFFICIENTS = ("cx", "cm", "clip", "p0", "px", "pm", "sigma")
_DTYPES = (torch.float32, torch.bfloat16)
_lock = threading.Lock()
_library: ctypes.CDLL | None | bool = None  # None: not built yet; False: building failed


def _cache_dir() -> Path:
    root = os.environ.get("MINIDIFF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "minidiff"


def _cpu_signature() -> str:
    """The CPU's feature flags: -march=native builds must not be shared across different CPUs."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def build(code: str = _SOURCE, name: str = "ops_cpu") -> Path:
    """Compile C++ ``code`` (with OpenMP if the compiler has it) into the cache as a shared library named
    after ``name``, once per code and CPU; the path of the library. Also builds ops/winograd.py's kernels."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler found (set CXX)")
    key = hashlib.sha256("\n".join([code, compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}_{key}.so"
    if target.exists():
        return target
    source = target.with_suffix(".cpp")
    with atomic_path(source) as tmp:
        tmp.write_text(code)
    errors = []
    for extra in (["-fopenmp"], []):  # without OpenMP the kernels still work, on one thread
        try:
            with atomic_path(target) as tmp:  # a failed compile must not leave a library in the cache
                result = subprocess.run([compiler, *_FLAGS, *extra, str(source), "-o", str(tmp)],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise subprocess.CalledProcessError(result.returncode, compiler, stderr=result.stderr)
            return target
        except subprocess.CalledProcessError as err:
            errors.append(err.stderr.strip()[-500:])
    raise OSError(f"{compiler} failed: {errors[-1]}")


def _load() -> ctypes.CDLL | None:
    """The built library, or None (after a one-time warning) when it cannot be built."""
    global _library
    with _lock:
        if _library is None:
            try:
                _library = _declare(ctypes.CDLL(str(build())))
            except (OSError, subprocess.SubprocessError) as err:
                warnings.warn(f"minidiff.ops: the fast CPU kernels are unavailable ({err}); "
                              "using the reference ops", RuntimeWarning, stacklevel=3)
                _library = False
        return _library or None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.md_group_norm_act.argtypes = [i32, i32, i32, ptr, ptr] + [ptr] * 5 + [i64] * 4 + [f32]
    lib.md_scheduler_update.argtypes = [i32] + [ptr] * 5 + [i64] + [f32] * 7
    lib.md_group_norm_act.restype = lib.md_scheduler_update.restype = None
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supports_group_norm(x: torch.Tensor, act: str) -> bool:
    return (x.device.type == "cpu" and x.dtype in _DTYPES and act in KERNEL_ACTIVATIONS and x.numel() > 0
            and _load() is not None)


def group_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                   eps: float, scale: torch.Tensor | None, shift: torch.Tensor | None, add: torch.Tensor | None,
                   act: str) -> torch.Tensor:
    """The fused kernel on validated arguments; ``add``/``scale``/``shift`` already (B, C)."""
    nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    x = x if nhwc else x.contiguous()
    y = torch.empty_like(x)
    # float32 contiguous copies (none for float32 parameters), held here while the kernel reads them
    params = [None if t is None else t.detach().float().contiguous() for t in (weight, bias, add, scale, shift)]
    _load().md_group_norm_act(int(x.dtype == torch.bfloat16), KERNEL_ACTIVATIONS[act], int(nhwc), _ptr(x), _ptr(y),
                              *map(_ptr, params), x.shape[0], x.shape[1], math.prod(x.shape[2:]), num_groups, eps)
    return y


def supports_update(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _DTYPES and _load() is not None


def scheduler_update(x: torch.Tensor, m: torch.Tensor, noise: torch.Tensor | None, coefficients: dict[str, float]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev, x0) of the linear update given by ``coefficients`` (cx, cm, clip, p0, px, pm, sigma)."""
    x, m = x.contiguous(), m.to(x.dtype).contiguous()
    noise = None if noise is None else noise.to(x.dtype).contiguous()
    prev, x0 = torch.empty_like(x), torch.empty_like(x)
    _load().md_scheduler_update(int(x.dtype == torch.bfloat16), _ptr(x), _ptr(m), _ptr(noise), _ptr(prev),
                                _ptr(x0), x.numel(), *(coefficients[k] for k in UPDATE_COEFFICIENTS))
    return prev, x0

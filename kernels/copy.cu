// Data movement and the elementwise maps on whole matrices: gathering
// blocks out of parameters, scattering directions back, casts, fills,
// scaling, symmetrization, the damped root input and the coupled Newton
// iteration's elementwise steps.

// Offset in the parameter of element `i` (row-major within the block). `I`
// is the index type of the divisions: 32-bit whenever the block has fewer
// than 2^32 elements (every dimension and sub-dimension is then below 2^32
// too), which is much cheaper than 64-bit division on the GPU.
template <typename I>
__device__ __forceinline__ u64 block_offset(const Geometry& g, I i) {
    u64 off = g.base;
    u64 sub_end = 0;
    for (u64 k = 0; k < g.order; ++k) {
        sub_end += g.nsub[k];
    }
    for (int k = (int)g.order - 1; k >= 0; --k) {
        I d = (I)g.dims[k];
        I local = i % d;
        i /= d;
        if (g.nsub[k] == 0) {
            off += (u64)local * g.strides[k];
        } else {
            I m = (I)g.start[k] + local;
            for (u64 s = sub_end; s > sub_end - g.nsub[k]; --s) {
                I size = (I)g.sub_sizes[s - 1];
                off += (u64)(m % size) * g.sub_strides[s - 1];
                m /= size;
            }
            sub_end -= g.nsub[k];
        }
    }
    return off;
}

// Whether a block's indices fit the 32-bit path.
__device__ __forceinline__ bool fits32(u64 numel) { return numel <= 0xffffffffull; }

// One block's copy between its parameter and its packed place (the
// backend's `move_words`): gather reads the parameter (plus coef * add),
// scatter writes it (or adds to it when accumulate is set).
struct Move {
    u64 packed;
    u64 param;
    u64 add;
    double coef;
    u64 numel;
    u64 accumulate;
    Geometry g;
};

// Every move of a call in one launch: the whole grid strides over each
// block in turn (the record is the same for every thread, so its reads are
// broadcast).
template <typename T>
__device__ void gather(const Move* moves, u64 count) {
    for (u64 r = 0; r < count; ++r) {
        const Move& m = moves[r];
        T* out = (T*)m.packed;
        const T* src = (const T*)m.param;
        const T* add = (const T*)m.add;
        T c = (T)m.coef;
        bool narrow = fits32(m.numel);
        GRID_LOOP(i, m.numel) {
            u64 o = narrow ? block_offset<unsigned>(m.g, (unsigned)i) : block_offset<u64>(m.g, i);
            T x = src[o];
            if (add != 0) {
                x = x + c * add[o];
            }
            out[i] = x;
        }
    }
}

template <typename T>
__device__ void scatter(const Move* moves, u64 count) {
    for (u64 r = 0; r < count; ++r) {
        const Move& m = moves[r];
        T* dst = (T*)m.param;
        const T* src = (const T*)m.packed;
        bool narrow = fits32(m.numel);
        GRID_LOOP(i, m.numel) {
            u64 o = narrow ? block_offset<unsigned>(m.g, (unsigned)i) : block_offset<u64>(m.g, i);
            if (m.accumulate) {
                dst[o] += src[i];
            } else {
                dst[o] = src[i];
            }
        }
    }
}

// Batched swap of the first two axes: in is count tensors (a, d, b), out
// the same tensors as (d, a, b) (a mode moved to the front for one GEMM).
// Index arithmetic in 32 bits when the batch has fewer than 2^32 elements.
template <typename T, typename I>
__device__ __forceinline__ void swap_axes_in(const T* in, T* out, I a, I d, I b, I numel,
                                             u64 total) {
    GRID_LOOP(i, total) {
        I x = (I)i;
        I t = x / numel, e = x - t * numel;
        I rest = e / b, q = e - rest * b;
        I k = rest / a, j = rest - k * a;
        // out[t][k][j][q] = in[t][j][k][q]
        out[i] = in[(u64)t * numel + ((u64)j * d + k) * b + q];
    }
}

template <typename T>
__device__ void swap_axes(const T* in, T* out, u64 a, u64 d, u64 b, u64 count) {
    u64 numel = a * d * b, total = numel * count;
    if (total <= 0xffffffffull) {
        swap_axes_in<T, unsigned>(in, out, (unsigned)a, (unsigned)d, (unsigned)b,
                                  (unsigned)numel, total);
    } else {
        swap_axes_in<T, u64>(in, out, a, d, b, numel, total);
    }
}

template <typename S, typename D>
__device__ void cast(D* dst, const S* src, u64 n) {
    GRID_LOOP(i, n) { dst[i] = (D)src[i]; }
}

template <typename T>
__device__ void fill(T* dst, double value, u64 n) {
    T v = (T)value;
    GRID_LOOP(i, n) { dst[i] = v; }
}

// x *= s
template <typename T>
__device__ void scale(T* x, double s, u64 n) {
    T c = (T)s;
    GRID_LOOP(i, n) { x[i] = x[i] * c; }
}

// Copies the lower triangle onto the upper one (reads only the lower
// triangle, writes only the upper one).
template <typename T>
__device__ void symmetrize(T* x, u64 n, u64 count) {
    u64 nn = n * n;
    GRID_LOOP(i, nn * count) {
        u64 b = i / nn, e = i % nn, r = e / n, c = e % n;
        if (c > r) {
            x[b * nn + e] = x[b * nn + c * n + r];
        }
    }
}

// out = sym(lower(F)) / divisor + eps I, rounded as the CPU backend does:
// the division first, then eps added on the diagonal.
template <typename T>
__device__ void root_input(const T* f, T* out, u64 n, u64 count, double divisor, double eps) {
    T dv = (T)divisor, ep = (T)eps;
    u64 nn = n * n;
    GRID_LOOP(i, nn * count) {
        u64 b = i / nn, e = i % nn, r = e / n, c = e % n;
        u64 lo = r >= c ? e : c * n + r;
        T v = f[b * nn + lo] / dv;
        if (r == c) {
            v += ep;
        }
        out[i] = v;
    }
}

// x[b][r, :] *= d[b][r]
template <typename T>
__device__ void scale_rows(T* x, const T* d, u64 n, u64 count) {
    u64 nn = n * n;
    GRID_LOOP(i, nn * count) {
        u64 b = i / nn, r = (i % nn) / n;
        x[i] = x[i] * d[b * n + r];
    }
}

// z = numerator / (scale s) (Newton: (p + 1) / (2 norm); higher order:
// 1 / trace); X = z^(1/p) I; M = z A
template <typename T>
__device__ void newton_init(const T* a, const T* norms, T* x, T* m, double numerator,
                            double scale, double inv_p, u64 n, u64 count) {
    u64 nn = n * n;
    GRID_LOOP(i, nn * count) {
        u64 b = i / nn, e = i % nn;
        T z = (T)numerator / ((T)scale * norms[b]);
        T zp = sh_pow(z, (T)inv_p);
        x[i] = (e / n == e % n) ? zp : (T)0.0;
        m[i] = z * a[i];
    }
}

// out = M * coef; out += diag I (two roundings on the diagonal)
template <typename T>
__device__ void newton_coefficient(const T* m, T* out, double coef, double diag, u64 n, u64 count) {
    T a = (T)coef, d = (T)diag;
    u64 nn = n * n;
    GRID_LOOP(i, nn * count) {
        u64 e = i % nn;
        T o = m[i] * a;
        if (e / n == e % n) {
            o += d;
        }
        out[i] = o;
    }
}

// Trace scaling: x *= max(t_b, eps)^(-exponent), t_b the matrix's trace
template <typename T>
__device__ void trace_scale(T* x, const T* traces, double eps, double exponent, u64 n,
                            u64 count) {
    T ep = (T)eps, e = (T)(-exponent);
    u64 nn = n * n;
    GRID_LOOP(i, nn * count) {
        T t = traces[i / nn];
        t = t > ep ? t : ep;
        x[i] *= sh_pow(t, e);
    }
}

// The higher-order ridge: x_kk += max(v_b * rel, abs)
template <typename T>
__device__ void add_ridge(T* x, const T* values, double rel, double abs, u64 n, u64 count) {
    T r = (T)rel, a = (T)abs;
    GRID_LOOP(i, n * count) {
        u64 b = i / n, k = i % n;
        T v = values[b] * r;
        T ridge = v > a ? v : a;
        x[b * n * n + k * n + k] += ridge;
    }
}

#define INSTANTIATE(T, S)                                                                        \
    extern "C" __global__ void gather_##S(const Move* moves, u64 count) {                        \
        gather<T>(moves, count);                                                                 \
    }                                                                                            \
    extern "C" __global__ void scatter_##S(const Move* moves, u64 count) {                       \
        scatter<T>(moves, count);                                                                \
    }                                                                                            \
    extern "C" __global__ void swap_axes_##S(const T* in, T* out, u64 a, u64 d, u64 b,          \
                                             u64 count) {                                        \
        swap_axes<T>(in, out, a, d, b, count);                                                   \
    }                                                                                            \
    extern "C" __global__ void copy_##S(T* dst, const T* src, u64 n) { cast<T, T>(dst, src, n); } \
    extern "C" __global__ void copy_jobs_##S(const u64* t, u64 jobs) {                           \
        for (u64 j = 0; j < jobs; ++j) {                                                         \
            const u64* r = t + 3 * j;                                                            \
            cast<T, T>((T*)r[0], (const T*)r[1], r[2]);                                          \
        }                                                                                        \
    }                                                                                            \
    extern "C" __global__ void fill_##S(T* dst, double value, u64 n) { fill<T>(dst, value, n); } \
    extern "C" __global__ void scale_##S(T* x, double s, u64 n) { scale<T>(x, s, n); }          \
    extern "C" __global__ void symmetrize_##S(T* x, u64 n, u64 count) {                          \
        symmetrize<T>(x, n, count);                                                              \
    }                                                                                            \
    extern "C" __global__ void root_input_##S(const T* f, T* out, u64 n, u64 count,              \
                                              double divisor, double eps) {                      \
        root_input<T>(f, out, n, count, divisor, eps);                                           \
    }                                                                                            \
    extern "C" __global__ void scale_rows_##S(T* x, const T* d, u64 n, u64 count) {              \
        scale_rows<T>(x, d, n, count);                                                           \
    }                                                                                            \
    extern "C" __global__ void newton_init_##S(const T* a, const T* norms, T* x, T* m,           \
                                               double numerator, double scale, double inv_p,     \
                                               u64 n, u64 count) {                                \
        newton_init<T>(a, norms, x, m, numerator, scale, inv_p, n, count);                       \
    }                                                                                            \
    extern "C" __global__ void newton_coefficient_##S(const T* m, T* out, double coef,           \
                                                      double diag, u64 n, u64 count) {           \
        newton_coefficient<T>(m, out, coef, diag, n, count);                                     \
    }                                                                                            \
    extern "C" __global__ void newton_coefficient_jobs_##S(const u64* t, u64 jobs, double coef,  \
                                                           double diag) {                        \
        for (u64 j = 0; j < jobs; ++j) {                                                         \
            const u64* r = t + 4 * j;                                                            \
            newton_coefficient<T>((const T*)r[0], (T*)r[1], coef, diag, r[2], r[3]);             \
        }                                                                                        \
    }                                                                                            \
    extern "C" __global__ void trace_scale_##S(T* x, const T* traces, double eps,                \
                                               double exponent, u64 n, u64 count) {              \
        trace_scale<T>(x, traces, eps, exponent, n, count);                                      \
    }                                                                                            \
    extern "C" __global__ void add_ridge_##S(T* x, const T* values, double rel, double abs,      \
                                             u64 n, u64 count) {                                 \
        add_ridge<T>(x, values, rel, abs, n, count);                                             \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)

extern "C" __global__ void cast_f32_f64(double* dst, const float* src, u64 n) {
    cast<float, double>(dst, src, n);
}
extern "C" __global__ void cast_f64_f32(float* dst, const double* src, u64 n) {
    cast<double, float>(dst, src, n);
}

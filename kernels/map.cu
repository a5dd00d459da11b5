// The fused elementwise kernels of the optimizer step: grafting
// accumulators, the filtered gradient, the final direction (grafting,
// weight decay, momentum, learning rate) and the eigenvalue-corrected
// statistics. Each follows the CPU backend's order of operations.

// Grafting methods, as numbered by the backend.
#define GRAFT_NONE 0
#define GRAFT_SGD 1
#define GRAFT_ADAGRAD 2
#define GRAFT_EMA 3

// graft(g): g / (sqrt(v) + eps) (Adagrad), g / (sqrt(v / bc) + eps) (EMA), g.
template <typename T>
__device__ __forceinline__ T graft(u64 kind, T g, T v, T bc, T eps) {
    if (kind == GRAFT_ADAGRAD) {
        return g / (sh_sqrt(v) + eps);
    }
    if (kind == GRAFT_EMA) {
        return g / (sh_sqrt(v / bc) + eps);
    }
    return g;
}

// v update (Adagrad: v += g g; EMA: v = v b2; v += (c2 g) g), then
// m1 = m1 b1; m1 += c1 g; gf = m1 / bc1 (when m1 is given).
template <typename T>
__device__ void gradient_statistics(const T* g, T* v, u64 kind, double beta2, double c2, T* m1,
                                    T* gf, double beta1, double c1, double beta3, double c3,
                                    u64 lion, double bc1, u64 n) {
    T b2 = (T)beta2, k2 = (T)c2, b1 = (T)beta1, k1 = (T)c1, d1 = (T)bc1;
    T b3 = (T)beta3, k3 = (T)c3;
    GRID_LOOP(i, n) {
        T x = g[i];
        if (v != 0) {
            if (kind == GRAFT_ADAGRAD) {
                v[i] += x * x;
            } else if (kind == GRAFT_EMA) {
                T t = v[i] * b2;
                t += k2 * x * x;
                v[i] = t;
            }
        }
        if (m1 != 0 && lion) {
            // gf = (beta3 m1 + (1 - beta3) g) / bc1 with the old m1.
            T f = m1[i] * b3;
            f += k3 * x;
            gf[i] = f / d1;
            T t = m1[i] * b1;
            t += k1 * x;
            m1[i] = t;
        } else if (m1 != 0) {
            T t = m1[i] * b1;
            t += k1 * x;
            m1[i] = t;
            gf[i] = t / d1;
        }
    }
}

// Direction sources, as numbered by the backend.
#define SOURCE_GRAFT 0
#define SOURCE_GRAFTED_SHAMPOO 1
#define SOURCE_SHAMPOO 2

// out = -lr * momentum(P + wd W) for `count` blocks of `numel` elements,
// blocks `first..first + count` of a batch of `total` (per-block norms are
// indexed in the batch: graft norms at [b], Shampoo norms at [total + b]).
template <typename T>
__device__ void direction(u64 source, const T* gf, const T* v, u64 kind, double bc, double eps,
                          const T* p_sh, const T* sq_norms, u64 first, u64 total, const T* w,
                          double wd, T* mom, double mu, double keep, u64 nesterov, double neg_lr,
                          T* out, u64 numel, u64 count) {
    T bcT = (T)bc, epsT = (T)eps, wdT = (T)wd, muT = (T)mu, keepT = (T)keep, lrT = (T)neg_lr;
    GRID_LOOP(i, numel * count) {
        T p;
        if (source == SOURCE_GRAFT) {
            p = graft<T>(kind, gf[i], v != 0 ? v[i] : (T)0.0, bcT, epsT);
        } else if (source == SOURCE_GRAFTED_SHAMPOO) {
            u64 b = first + quotient(i, numel);
            T g2 = sq_norms[b], s2 = sq_norms[total + b];
            T ratio = sh_sqrt(g2) / (sh_sqrt(s2) + (T)1e-16);
            p = p_sh[i] * ratio;
        } else {
            p = p_sh[i];
        }
        if (w != 0) {
            p += wdT * w[i];
        }
        if (mom != 0) {
            T nb = mom[i] * muT;
            nb += keepT * p;
            mom[i] = nb;
            p = nesterov ? keepT * p + muT * nb : nb;
        }
        out[i] = p * lrT;
    }
}

// d = b2 d; d += (c2 r) r   (d += r r when b2 == 1)
template <typename T>
__device__ void eigenvalue_update(const T* r, T* d, double beta2, double c2, u64 n) {
    T b = (T)beta2, c = (T)c2;
    GRID_LOOP(i, n) {
        T x = r[i];
        if (beta2 == 1.0) {
            d[i] += x * x;
        } else {
            T t = d[i] * b;
            t += c * x * x;
            d[i] = t;
        }
    }
}

// r /= (d / bc2)^exponent + eps (sqrt for 1/2)
template <typename T>
__device__ void eigenvalue_scale(T* r, const T* d, double bc2, double eps, double exponent,
                                 u64 n) {
    T b = (T)bc2, e = (T)eps, x = (T)exponent;
    if (exponent == 0.5) {
        GRID_LOOP(i, n) { r[i] /= sh_sqrt(d[i] / b) + e; }
    } else {
        GRID_LOOP(i, n) { r[i] /= sh_pow(d[i] / b, x) + e; }
    }
}

// dst = sign(src), sign(0) = 0 (x * 0 keeps the sign of zero and NaN)
template <typename T>
__device__ void sign_map(const T* src, T* dst, u64 n) {
    GRID_LOOP(i, n) {
        T x = src[i];
        dst[i] = x > (T)0.0 ? (T)1.0 : (x < (T)0.0 ? (T)-1.0 : x * (T)0.0);
    }
}

// x = a x + b y (two products, one sum)
template <typename T>
__device__ void axpby(T* x, const T* y, double a, double b, u64 n) {
    T ta = (T)a, tb = (T)b;
    GRID_LOOP(i, n) { x[i] = ta * x[i] + tb * y[i]; }
}

// Per-block scalars s[b]: dst = src / max(s, floor) (divide), else
// dst = src * s.
template <typename T>
__device__ void scale_blocks(const T* src, T* dst, const T* s, double floor, u64 divide,
                             u64 numel, u64 count) {
    T f = (T)floor;
    GRID_LOOP(i, numel * count) {
        T v = s[i / numel];
        if (divide) {
            T d = v > f ? v : f;
            dst[i] = src[i] / d;
        } else {
            dst[i] = src[i] * v;
        }
    }
}

// Iterate averaging: z <- z * shrink (when has_shrink), d = z - w,
// z <- z + u, u <- u c1 + c2 d.
template <typename T>
__device__ void iterate_average(T* u, T* z, const T* w, double c1, double c2, double shrink,
                                u64 has_shrink, u64 n) {
    T k1 = (T)c1, k2 = (T)c2, s = (T)shrink;
    GRID_LOOP(i, n) {
        T zs = has_shrink ? z[i] * s : z[i];
        T d = zs - w[i];
        z[i] = zs + u[i];
        u[i] = u[i] * k1 + k2 * d;
    }
}

// out = (z - w) * coef
template <typename T>
__device__ void interpolate(const T* z, const T* w, T* out, double coef, u64 n) {
    T c = (T)coef;
    GRID_LOOP(i, n) { out[i] = (z[i] - w[i]) * c; }
}

// Several jobs in one launch: row j of `t` holds job j's addresses and
// sizes (the backend's `Batch`, in the order of the single kernel's
// arguments); the scalars are the same for every job.
template <typename T>
__device__ void gradient_statistics_jobs(const u64* t, u64 jobs, u64 kind, double beta2,
                                         double c2, double beta1, double c1, double beta3,
                                         double c3, u64 lion, double bc1) {
    for (u64 j = 0; j < jobs; ++j) {
        const u64* r = t + 5 * j;
        gradient_statistics<T>((const T*)r[0], (T*)r[1], kind, beta2, c2, (T*)r[2], (T*)r[3],
                               beta1, c1, beta3, c3, lion, bc1, r[4]);
    }
}

template <typename T>
__device__ void direction_jobs(const u64* t, u64 jobs, u64 source, u64 kind, double bc,
                               double eps, double wd, double mu, double keep, u64 nesterov,
                               double neg_lr) {
    for (u64 j = 0; j < jobs; ++j) {
        const u64* r = t + 11 * j;
        direction<T>(source, (const T*)r[0], (const T*)r[1], kind, bc, eps, (const T*)r[2],
                     (const T*)r[3], r[4], r[5], (const T*)r[6], wd, (T*)r[7], mu, keep, nesterov,
                     neg_lr, (T*)r[8], r[9], r[10]);
    }
}

#define INSTANTIATE(T, S)                                                                         \
    extern "C" __global__ void gradient_statistics_jobs_##S(                                      \
        const u64* t, u64 jobs, u64 kind, double beta2, double c2, double beta1, double c1,       \
        double beta3, double c3, u64 lion, double bc1) {                                          \
        gradient_statistics_jobs<T>(t, jobs, kind, beta2, c2, beta1, c1, beta3, c3, lion, bc1);   \
    }                                                                                             \
    extern "C" __global__ void direction_jobs_##S(const u64* t, u64 jobs, u64 source, u64 kind,   \
                                                  double bc, double eps, double wd, double mu,    \
                                                  double keep, u64 nesterov, double neg_lr) {     \
        direction_jobs<T>(t, jobs, source, kind, bc, eps, wd, mu, keep, nesterov, neg_lr);        \
    }                                                                                             \
    extern "C" __global__ void gradient_statistics_##S(                                           \
        const T* g, T* v, u64 kind, double beta2, double c2, T* m1, T* gf, double beta1,          \
        double c1, double beta3, double c3, u64 lion, double bc1, u64 n) {                        \
        gradient_statistics<T>(g, v, kind, beta2, c2, m1, gf, beta1, c1, beta3, c3, lion, bc1,    \
                               n);                                                                \
    }                                                                                             \
    extern "C" __global__ void direction_##S(                                                     \
        u64 source, const T* gf, const T* v, u64 kind, double bc, double eps, const T* p_sh,      \
        const T* sq_norms, u64 first, u64 total, const T* w, double wd, T* mom, double mu,        \
        double keep, u64 nesterov, double neg_lr, T* out, u64 numel, u64 count) {                 \
        direction<T>(source, gf, v, kind, bc, eps, p_sh, sq_norms, first, total, w, wd, mom, mu,  \
                     keep, nesterov, neg_lr, out, numel, count);                                  \
    }                                                                                             \
    extern "C" __global__ void eigenvalue_update_##S(const T* r, T* d, double beta2, double c2,   \
                                                     u64 n) {                                     \
        eigenvalue_update<T>(r, d, beta2, c2, n);                                                 \
    }                                                                                             \
    extern "C" __global__ void eigenvalue_scale_##S(T* r, const T* d, double bc2, double eps,     \
                                                    double exponent, u64 n) {                     \
        eigenvalue_scale<T>(r, d, bc2, eps, exponent, n);                                         \
    }                                                                                             \
    extern "C" __global__ void eigenvalue_update_jobs_##S(const u64* t, u64 jobs, double beta2,   \
                                                          double c2) {                            \
        for (u64 j = 0; j < jobs; ++j) {                                                          \
            const u64* r = t + 3 * j;                                                             \
            eigenvalue_update<T>((const T*)r[0], (T*)r[1], beta2, c2, r[2]);                      \
        }                                                                                         \
    }                                                                                             \
    extern "C" __global__ void eigenvalue_scale_jobs_##S(const u64* t, u64 jobs, double bc2,      \
                                                         double eps, double exponent) {           \
        for (u64 j = 0; j < jobs; ++j) {                                                          \
            const u64* r = t + 3 * j;                                                             \
            eigenvalue_scale<T>((T*)r[0], (const T*)r[1], bc2, eps, exponent, r[2]);              \
        }                                                                                         \
    }                                                                                             \
    extern "C" __global__ void sign_map_##S(const T* src, T* dst, u64 n) {                        \
        sign_map<T>(src, dst, n);                                                                 \
    }                                                                                             \
    extern "C" __global__ void axpby_##S(T* x, const T* y, double a, double b, u64 n) {           \
        axpby<T>(x, y, a, b, n);                                                                  \
    }                                                                                             \
    extern "C" __global__ void scale_blocks_##S(const T* src, T* dst, const T* s, double floor,   \
                                                u64 divide, u64 numel, u64 count) {               \
        scale_blocks<T>(src, dst, s, floor, divide, numel, count);                                \
    }                                                                                             \
    extern "C" __global__ void iterate_average_##S(T* u, T* z, const T* w, double c1, double c2,  \
                                                   double shrink, u64 has_shrink, u64 n) {        \
        iterate_average<T>(u, z, w, c1, c2, shrink, has_shrink, n);                               \
    }                                                                                             \
    extern "C" __global__ void interpolate_##S(const T* z, const T* w, T* out, double coef,       \
                                               u64 n) {                                           \
        interpolate<T>(z, w, out, coef, n);                                                       \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)

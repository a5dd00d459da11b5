// Per-matrix reductions and the per-vector eigenvalue map. One thread block
// of REDUCE_THREADS threads per matrix.
//
// Sums of squares add in exactly the CPU backend's order
// (shampoo-core/src/backend/cpu/kernels.rs, chunked_sum_squares): chunks of
// 256 elements; within a chunk, sixteen lanes in T (lane = index % 16,
// ascending); the lanes folded pairwise in double; the chunk sums added in
// double, in chunk order. The split is fixed, so the result does not depend
// on timing. LANE_THREADS consecutive threads share a chunk, each owning
// LANES_PER_THREAD lanes (one with 256 threads), so a warp reads
// consecutive elements and every lane accumulator is a register (the lane
// loop is unrolled: no per-thread array indexed at run time).

#define SUM_CHUNK 256
#define SUM_LANES 16
#define LANE_THREADS (REDUCE_THREADS < SUM_LANES ? REDUCE_THREADS : SUM_LANES)
#define LANES_PER_THREAD (SUM_LANES / LANE_THREADS)
#define CHUNKS_PER_ROUND (REDUCE_THREADS / LANE_THREADS)

#define GRAFT_ADAGRAD 2
#define GRAFT_EMA 3

template <typename T>
__device__ __forceinline__ T grafted(u64 kind, T g, const T* v, u64 i, T bc, T eps) {
    if (kind == GRAFT_ADAGRAD) {
        return g / (sh_sqrt(v[i]) + eps);
    }
    if (kind == GRAFT_EMA) {
        return g / (sh_sqrt(v[i] / bc) + eps);
    }
    return g;
}

// *out = sum_i graft(x[i])^2 over one matrix of `numel` (its square root
// when `root`), rounded to T; every thread of the block takes part.
template <typename T>
__device__ void sum_squares_one(const T* xb, const T* vb, u64 kind, T bcT, T epsT, T* out,
                                u64 numel, u64 root) {
    __shared__ double lane_sums[CHUNKS_PER_ROUND * SUM_LANES];
    __shared__ double chunk_sums[CHUNKS_PER_ROUND];
    u64 chunks = (numel + SUM_CHUNK - 1) / SUM_CHUNK;
    unsigned slot = threadIdx.x / LANE_THREADS, lane0 = threadIdx.x % LANE_THREADS;
    double total = 0.0;
    for (u64 round = 0; round < chunks; round += CHUNKS_PER_ROUND) {
        u64 c = round + slot;
        T acc[LANES_PER_THREAD];
#pragma unroll
        for (int j = 0; j < LANES_PER_THREAD; ++j) {
            acc[j] = (T)0.0;
        }
        if (c < chunks) {
            u64 start = c * SUM_CHUNK;
            u64 end = start + SUM_CHUNK < numel ? start + SUM_CHUNK : numel;
            for (u64 i = start; i < end; i += SUM_LANES) {
#pragma unroll
                for (int j = 0; j < LANES_PER_THREAD; ++j) {
                    u64 e = i + lane0 + j * LANE_THREADS;
                    if (e < end) {
                        T q = grafted<T>(vb != 0 ? kind : 0, xb[e], vb, e, bcT, epsT);
                        acc[j] += q * q;
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < LANES_PER_THREAD; ++j) {
            lane_sums[slot * SUM_LANES + lane0 + j * LANE_THREADS] = (double)acc[j];
        }
        __syncthreads();
        if (lane0 == 0 && c < chunks) {
            double* w = lane_sums + slot * SUM_LANES;
            for (int width = SUM_LANES / 2; width >= 1; width /= 2) {
                for (int l = 0; l < width; ++l) {
                    w[l] += w[l + width];
                }
            }
            chunk_sums[slot] = w[0];
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u64 valid = chunks - round < CHUNKS_PER_ROUND ? chunks - round : CHUNKS_PER_ROUND;
            for (u64 k = 0; k < valid; ++k) {
                total += chunk_sums[k];
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        *out = (T)(root ? sqrt(total) : total);
    }
}

// out[b] = sum_i graft(x[b][i])^2 (its square root when `root`), rounded to T.
template <typename T>
__device__ void sum_squares(const T* x, const T* v, u64 kind, double bc, double eps, T* out,
                            u64 numel, u64 count, u64 root) {
    MATRIX_LOOP(b, count) {
        sum_squares_one<T>(x + b * numel, v != 0 ? v + b * numel : 0, kind, (T)bc, (T)eps,
                           out + b, numel, root);
    }
}

// out[b] = max |M - I| (NaN if any element is NaN) of an n x n matrix.
template <typename T>
__device__ void max_abs_dev_identity(const T* x, T* out, u64 n, u64 count) {
    __shared__ T maxima[REDUCE_THREADS];
    __shared__ int nans[REDUCE_THREADS];
    u64 nn = n * n;
    MATRIX_LOOP(b, count) {
        T m = (T)0.0;
        int nan = 0;
        for (u64 k = threadIdx.x; k < nn; k += REDUCE_THREADS) {
            T y = x[b * nn + k];
            T e = sh_abs(k / n == k % n ? y - (T)1.0 : y);
            nan |= sh_isnan(e) ? 1 : 0;
            if (e > m) {
                m = e;
            }
        }
        maxima[threadIdx.x] = m;
        nans[threadIdx.x] = nan;
        __syncthreads();
        for (int width = REDUCE_THREADS / 2; width >= 1; width /= 2) {
            if (threadIdx.x < width) {
                T o = maxima[threadIdx.x + width];
                if (o > maxima[threadIdx.x]) {
                    maxima[threadIdx.x] = o;
                }
                nans[threadIdx.x] |= nans[threadIdx.x + width];
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            out[b] = nans[0] ? sh_nan((T)0.0) : maxima[0];
        }
        __syncthreads();
    }
}

// out[b] = 1 if every element (of the lower triangle when `lower`, n x n)
// is finite, else 0.
template <typename T>
__device__ void all_finite(const T* x, T* out, u64 numel, u64 n, u64 lower, u64 count) {
    MATRIX_LOOP(b, count) {
        int ok = 1;
        for (u64 k = threadIdx.x; k < numel; k += REDUCE_THREADS) {
            if (lower && k % n > k / n) {
                continue;
            }
            if (!sh_finite(x[b * numel + k])) {
                ok = 0;
            }
        }
        ok = __syncthreads_and(ok);
        if (threadIdx.x == 0) {
            out[b] = ok ? (T)1.0 : (T)0.0;
        }
    }
}

// Per vector, with m = min(values): if m < eps then v = (v + (-m)) + eps;
// then v = v^(-exponent).
//
// `rule` (the backend's EigenRule): RULE_SHIFT_BELOW (0) shifts by eps - min when min < eps
// (damping before the decomposition); RULE_SHIFT_NONNEGATIVE (1) always adds
// -min(min, 0), then eps (damping after); RULE_PSEUDO_INVERSE (2) is the pseudo-inverse: values at or below
// max(rtol * max(max, 0), atol) become 0 (rtol < 0: n times the machine
// epsilon).
#define RULE_SHIFT_BELOW 0
#define RULE_SHIFT_NONNEGATIVE 1
#define RULE_PSEUDO_INVERSE 2

template <typename T>
__device__ void eigen_power(T* values, u64 n, u64 count, u64 rule, double eps, double atol,
                            double rtol, double exponent) {
    __shared__ T minima[REDUCE_THREADS];
    __shared__ T maxima[REDUCE_THREADS];
    T epsT = (T)eps, e = -(T)exponent;
    MATRIX_LOOP(b, count) {
        T* vb = values + b * n;
        T m = sh_inf((T)0.0), mx = (T)0.0;
        for (u64 k = threadIdx.x; k < n; k += REDUCE_THREADS) {
            T y = vb[k];
            if (y < m) {
                m = y;
            }
            if (y > mx) {
                mx = y;
            }
        }
        minima[threadIdx.x] = m;
        maxima[threadIdx.x] = mx;
        __syncthreads();
        for (int width = REDUCE_THREADS / 2; width >= 1; width /= 2) {
            if (threadIdx.x < width) {
                T o = minima[threadIdx.x + width];
                if (o < minima[threadIdx.x]) {
                    minima[threadIdx.x] = o;
                }
                T p = maxima[threadIdx.x + width];
                if (p > maxima[threadIdx.x]) {
                    maxima[threadIdx.x] = p;
                }
            }
            __syncthreads();
        }
        T mn = minima[0];
        T r = rtol < 0.0 ? (T)n * sh_epsilon((T)0.0) : (T)rtol;
        T c = r * maxima[0], a = (T)atol;
        T cutoff = c > a ? c : a;
        for (u64 k = threadIdx.x; k < n; k += REDUCE_THREADS) {
            T y = vb[k];
            if (rule == RULE_PSEUDO_INVERSE) {
                vb[k] = y <= cutoff ? (T)0.0 : sh_pow(y, e);
                continue;
            }
            if (rule == RULE_SHIFT_BELOW && mn < epsT) {
                y = (y + (-mn)) + epsT;
            } else if (rule == RULE_SHIFT_NONNEGATIVE) {
                if (mn < (T)0.0) {
                    y += -mn;
                }
                y += epsT;
            }
            vb[k] = sh_pow(y, e);
        }
        __syncthreads();
    }
}

// Per matrix, one thread each (sums in the CPU backend's order): kind 0 the
// trace (STAT_TRACE), 1 the largest row sum of absolute values
// (STAT_MAX_ROW_ABS_SUM; NaN if any row's is).
#define STAT_TRACE 0
#define STAT_MAX_ROW_ABS_SUM 1

template <typename T>
__device__ void matrix_stat(const T* x, T* out, u64 kind, u64 n, u64 count) {
    GRID_LOOP(b, count) {
        const T* m = x + b * n * n;
        if (kind == STAT_TRACE) {
            T s = (T)0.0;
            for (u64 k = 0; k < n; k++) {
                s += m[k * n + k];
            }
            out[b] = s;
        } else {
            T best = (T)0.0;
            bool nan = false;
            for (u64 r = 0; r < n; r++) {
                T s = (T)0.0;
                for (u64 c = 0; c < n; c++) {
                    s += sh_abs(m[r * n + c]);
                }
                nan = nan || sh_isnan(s);
                if (s > best) {
                    best = s;
                }
            }
            out[b] = nan ? sh_nan((T)0.0) : best;
        }
    }
}

// sum_squares for several jobs in one launch: row j of `t` holds job j's
// x, v, out, numel and count (the backend's `Batch`); the other arguments
// are the same for every job. The grid strides over the matrices of all
// jobs together (job by job, in order), so small groups do not wait for
// each other.
template <typename T>
__device__ void sum_squares_jobs(const u64* t, u64 jobs, u64 kind, double bc, double eps,
                                 u64 root) {
    u64 total = 0;
    for (u64 j = 0; j < jobs; ++j) {
        total += t[5 * j + 4];
    }
    MATRIX_LOOP(m, total) {
        u64 j = 0, b = m;
        while (b >= t[5 * j + 4]) {
            b -= t[5 * j + 4];
            ++j;
        }
        const u64* r = t + 5 * j;
        u64 numel = r[3];
        const T* x = (const T*)r[0];
        const T* v = (const T*)r[1];
        sum_squares_one<T>(x + b * numel, v != 0 ? v + b * numel : 0, kind, (T)bc, (T)eps,
                           (T*)r[2] + b, numel, root);
    }
}

#define INSTANTIATE(T, S)                                                                         \
    extern "C" __global__ void sum_squares_##S(const T* x, const T* v, u64 kind, double bc,       \
                                               double eps, T* out, u64 numel, u64 count,          \
                                               u64 root) {                                        \
        sum_squares<T>(x, v, kind, bc, eps, out, numel, count, root);                             \
    }                                                                                             \
    extern "C" __global__ void sum_squares_jobs_##S(const u64* t, u64 jobs, u64 kind, double bc,  \
                                                    double eps, u64 root) {                       \
        sum_squares_jobs<T>(t, jobs, kind, bc, eps, root);                                        \
    }                                                                                             \
    extern "C" __global__ void max_abs_dev_identity_##S(const T* x, T* out, u64 n, u64 count) {   \
        max_abs_dev_identity<T>(x, out, n, count);                                                \
    }                                                                                             \
    extern "C" __global__ void all_finite_##S(const T* x, T* out, u64 numel, u64 n, u64 lower,    \
                                              u64 count) {                                        \
        all_finite<T>(x, out, numel, n, lower, count);                                            \
    }                                                                                             \
    extern "C" __global__ void eigen_power_##S(T* values, u64 n, u64 count, u64 rule,            \
                                               double eps, double atol, double rtol,              \
                                               double exponent) {                                 \
        eigen_power<T>(values, n, count, rule, eps, atol, rtol, exponent);                        \
    }                                                                                             \
    extern "C" __global__ void matrix_stat_##S(const T* x, T* out, u64 kind, u64 n, u64 count) {  \
        matrix_stat<T>(x, out, kind, n, count);                                                   \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)

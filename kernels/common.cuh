// Shared definitions of the CUDA backend's kernels. The backend prepends
// this header to every kernels/*.cu source before compiling it with NVRTC
// (there is no include path at run time).
//
// Arithmetic rules, so that each kernel rounds where the CPU backend
// (shampoo-core/src/backend/cpu/map.rs and kernels.rs) rounds:
//   * compiled with --fmad=false: a * b + c is two roundings, never an FMA;
//   * scalars arrive as double and are rounded once to T, as the CPU
//     backend's T::from_f64 does;
//   * sqrt and division are IEEE (NVRTC's default --prec-sqrt/--prec-div).
// Pointer arguments are device addresses; counts are 64-bit.

typedef unsigned long long u64;

#define SHAMPOO_MAX_ORDER 8

// Where a block lives in its parameter: row-major strides of the merged
// parameter tensor and the block's extent along each merged dimension.
// Where a block's elements are in its parameter. Merged dimension k of the
// block (size dims[k]) advances memory by strides[k], or, where its
// original dimensions are not nested in memory (nsub[k] > 0: a merged
// out x in of a channels-last weight), its index start[k] + local is split
// into those nsub[k] dimensions (sizes and strides in sub_sizes and
// sub_strides, merged dimension after merged dimension).
struct Geometry {
    u64 order;
    u64 base;
    u64 dims[SHAMPOO_MAX_ORDER];
    u64 strides[SHAMPOO_MAX_ORDER];
    u64 start[SHAMPOO_MAX_ORDER];
    u64 nsub[SHAMPOO_MAX_ORDER];
    u64 sub_sizes[SHAMPOO_MAX_ORDER];
    u64 sub_strides[SHAMPOO_MAX_ORDER];
};

__device__ __forceinline__ float sh_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double sh_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float sh_pow(float x, float e) { return powf(x, e); }
__device__ __forceinline__ double sh_pow(double x, double e) { return pow(x, e); }
__device__ __forceinline__ bool sh_finite(float x) { return isfinite(x); }
__device__ __forceinline__ bool sh_finite(double x) { return isfinite(x); }
__device__ __forceinline__ bool sh_isnan(float x) { return isnan(x); }
__device__ __forceinline__ bool sh_isnan(double x) { return isnan(x); }
__device__ __forceinline__ float sh_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double sh_abs(double x) { return fabs(x); }
__device__ __forceinline__ float sh_inf(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double sh_inf(double) { return __longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ float sh_epsilon(float) { return __int_as_float(0x34000000); }
__device__ __forceinline__ double sh_epsilon(double) { return __longlong_as_double(0x3cb0000000000000LL); }
__device__ __forceinline__ float sh_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double sh_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }

// i / d, in 32 bits when both fit (much cheaper than a 64-bit division on
// the GPU; the same quotient).
__device__ __forceinline__ u64 quotient(u64 i, u64 d) {
    return ((i | d) >> 32) == 0 ? (u64)((unsigned)i / (unsigned)d) : i / d;
}

// Grid-stride loop over [0, n).
#define GRID_LOOP(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (u64)blockDim.x * gridDim.x)

// Block-stride loop over matrices: one thread block per matrix.
#define MATRIX_LOOP(b, count) for (u64 b = blockIdx.x; b < (count); b += gridDim.x)

// Threads per block of the per-matrix kernels (the reductions rely on it).
#define REDUCE_THREADS 256

// Every file ends with an INSTANTIATE(T, S) macro that defines its extern
// "C" entry points NAME_S for one element type, expanded for (float, f32)
// and (double, f64): the backend looks kernels up by these names.

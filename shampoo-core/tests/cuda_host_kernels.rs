//! The CUDA kernels of `kernels/`, compiled for the host with a C++
//! compiler (a shim maps the CUDA built-ins to one thread of one block) and
//! run against the CPU backend: index arithmetic, operation order and
//! rounding, bit for bit, without a GPU. Skipped (with a message) when no
//! C++ compiler (`$CXX`, else `c++`) is found.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::process::Command;

use shampoo_core::backend::cuda::{CudaBlockTable, MOVE_WORDS, move_words};
use shampoo_core::backend::{
    Backend, DirectionSource, EigenRule, GatherJob, GraftKernel, Map, MomentumKernel, ReduceJob,
    Reduction, ScatterJob, TableEntry, WireFormat, WireJob, wire16_len,
};
use shampoo_core::blocking::block_parameter_min_order;
use shampoo_core::strided::Strided;
use shampoo_core::{CpuBackend, HostView, HostViewMut};

const SHIM: &str = r#"#include <cmath>
#include <cstring>
#include <math.h>
struct ShimDim { unsigned long long x; };
static const ShimDim blockIdx{0}, blockDim{1}, gridDim{1}, threadIdx{0};
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() {}
inline int __syncthreads_and(int p) { return p; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
using std::isfinite;
using std::isnan;
"#;

/// The reductions with a block of REDUCE_THREADS host threads: threadIdx is
/// per thread, __syncthreads a barrier, __shared__ memory shared.
const THREADED: &str = r#"#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>
struct ShimDim { unsigned long long x; };
static const ShimDim blockIdx{0}, gridDim{1};
static thread_local ShimDim threadIdx{0};
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
void __syncthreads();
int __syncthreads_and(int p);
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
using std::isfinite;
using std::isnan;
// An unnamed namespace keeps the templates' static locals (the __shared__
// arrays) out of the dynamic symbol table: otherwise they would be unified
// with those of the one-thread library, which are one element long.
namespace {
#include "KERNELS/common.cuh"
}
static const ShimDim blockDim{REDUCE_THREADS};
static std::barrier<> g_bar(REDUCE_THREADS);
static std::atomic<int> g_and;
void __syncthreads() { g_bar.arrive_and_wait(); }
int __syncthreads_and(int p) {
    g_bar.arrive_and_wait();
    if (threadIdx.x == 0) g_and = 1;
    g_bar.arrive_and_wait();
    if (!p) g_and = 0;
    g_bar.arrive_and_wait();
    int r = g_and;
    g_bar.arrive_and_wait();
    return r;
}
namespace {
#include "KERNELS/reduce.cu"
}
template <class F> static void run_block(F f) {
    std::vector<std::thread> ts;
    for (int i = 0; i < REDUCE_THREADS; ++i) ts.emplace_back([&f, i] { threadIdx.x = i; f(); });
    for (auto& t : ts) t.join();
}
extern "C" void threaded_sum_squares_f64(const double* x, const double* v, u64 kind, double bc,
                                         double eps, double* out, u64 numel, u64 count, u64 root) {
    run_block([=] { sum_squares_f64(x, v, kind, bc, eps, out, numel, count, root); });
}
extern "C" void threaded_max_abs_dev_identity_f64(const double* x, double* out, u64 n, u64 count) {
    run_block([=] { max_abs_dev_identity_f64(x, out, n, count); });
}
extern "C" void threaded_all_finite_f64(const double* x, double* out, u64 numel, u64 n, u64 lower,
                                        u64 count) {
    run_block([=] { all_finite_f64(x, out, numel, n, lower, count); });
}
extern "C" void threaded_eigen_power_f64(double* v, u64 n, u64 count, u64 rule, double eps,
                                         double atol, double rtol, double e) {
    run_block([=] { eigen_power_f64(v, n, count, rule, eps, atol, rtol, e); });
}
"#;

/// The kernels as a host library, or `None` (printed) without a compiler.
/// Built once per test process.
type HostKernels = (tempfile::TempDir, libloading::Library, libloading::Library);

fn host_kernels() -> Option<&'static HostKernels> {
    static KERNELS: std::sync::OnceLock<Option<HostKernels>> = std::sync::OnceLock::new();
    KERNELS.get_or_init(build_host_kernels).as_ref()
}

fn build_host_kernels() -> Option<HostKernels> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let dir = tempfile::tempdir().unwrap();
    let kernels = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kernels");
    std::fs::write(dir.path().join("shim.h"), SHIM).unwrap();
    let mut sources = Vec::new();
    for f in ["copy", "map", "reduce", "wire"] {
        // One thread per block: the reductions' thread count is 1.
        let text = format!(
            "#include \"shim.h\"\n#include \"{k}/common.cuh\"\n#undef REDUCE_THREADS\n\
             #define REDUCE_THREADS 1\n#include \"{k}/{f}.cu\"\n",
            k = kernels.display()
        );
        let path = dir.path().join(format!("{f}.cpp"));
        std::fs::write(&path, text).unwrap();
        sources.push(path);
    }
    let threaded = dir.path().join("threaded.cpp");
    std::fs::write(
        &threaded,
        THREADED.replace("KERNELS", &kernels.display().to_string()),
    )
    .unwrap();
    let build = |srcs: &[PathBuf], name: &str| -> Option<libloading::Library> {
        let lib = dir.path().join(name);
        let out = Command::new(&cxx)
            .args([
                "-shared",
                "-fPIC",
                "-O1",
                "-ffp-contract=off",
                "-std=c++20",
                "-pthread",
                "-o",
            ])
            .arg(&lib)
            .args(srcs)
            .output();
        match out {
            Err(e) => {
                println!("skipping: no C++ compiler ({cxx}: {e})");
                None
            }
            Ok(o) if !o.status.success() => panic!(
                "the kernels do not compile for the host:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            // SAFETY: the library was just built from the project's kernels
            // and the shim; its initialisers are the C++ runtime's.
            Ok(_) => Some(unsafe { libloading::Library::new(&lib) }.unwrap()),
        }
    };
    let one = build(&sources, "libkernels.so")?;
    let threads = build(&[threaded], "libthreaded.so")?;
    Some((dir, one, threads))
}

fn values(seed: u64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| ((i as f64 + 1.0) * (seed as f64 * 0.61 + 0.7)).sin())
        .collect()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

type P = *mut f64;
type C = *const f64;

macro_rules! kernel {
    ($lib:expr, $name:literal, fn($($t:ty),*)) => {{
        // SAFETY: the symbol is one of the kernels' extern "C" entry points,
        // declared here with the kernel's parameter types.
        let f: libloading::Symbol<unsafe extern "C" fn($($t),*)> =
            unsafe { $lib.get($name.as_bytes()) }.unwrap();
        f
    }};
}

#[test]
fn matrix_maps_give_the_cpu_backends_bits() {
    let Some((_, lib, _)) = host_kernels() else {
        return;
    };
    let cpu = CpuBackend::new(1).unwrap();
    let (n, count) = (7usize, 3usize);
    let nn = n * n;
    let f = values(1, count * nn);
    // RootInput.
    let mut want = vec![0.0; count * nn];
    cpu.map(&mut [Map::RootInput {
        factors: HostView::F64(&f),
        out: HostViewMut::F64(&mut want),
        n,
        count,
        divisor: 0.3,
        eps: 1e-3,
        select: None,
    }])
    .unwrap();
    let mut got = vec![0.0; count * nn];
    let k = kernel!(lib, "root_input_f64", fn(C, P, u64, u64, f64, f64));
    // SAFETY: buffers of count x n x n elements.
    unsafe {
        k(
            f.as_ptr(),
            got.as_mut_ptr(),
            n as u64,
            count as u64,
            0.3,
            1e-3,
        )
    };
    assert_eq!(bits(&want), bits(&got), "root_input");
    // ScaleRows, then Symmetrize.
    let d = values(2, count * n);
    let mut want = f.clone();
    cpu.map(&mut [Map::ScaleRows {
        x: HostViewMut::F64(&mut want),
        d: HostView::F64(&d),
        n,
        count,
        select: None,
    }])
    .unwrap();
    cpu.map(&mut [Map::Symmetrize {
        x: HostViewMut::F64(&mut want),
        n,
        count,
        select: None,
    }])
    .unwrap();
    let mut got = f.clone();
    let k = kernel!(lib, "scale_rows_f64", fn(P, C, u64, u64));
    // SAFETY: as above.
    unsafe { k(got.as_mut_ptr(), d.as_ptr(), n as u64, count as u64) };
    let k = kernel!(lib, "symmetrize_f64", fn(P, u64, u64));
    // SAFETY: as above.
    unsafe { k(got.as_mut_ptr(), n as u64, count as u64) };
    assert_eq!(bits(&want), bits(&got), "scale_rows + symmetrize");
    // NewtonInit and NewtonCoefficient.
    let norms: Vec<f64> = (0..count).map(|i| 2.0 + i as f64).collect();
    let (mut wx, mut wm, mut wc) = (
        vec![0.0; count * nn],
        vec![0.0; count * nn],
        vec![0.0; count * nn],
    );
    cpu.map(&mut [Map::NewtonInit {
        a: HostView::F64(&f),
        norms: HostView::F64(&norms),
        numerator: 5.0,
        scale: 2.0,
        x: HostViewMut::F64(&mut wx),
        m: HostViewMut::F64(&mut wm),
        p: 4,
        n,
        count,
        select: None,
    }])
    .unwrap();
    cpu.map(&mut [Map::NewtonCoefficient {
        m: HostView::F64(&wm),
        out: HostViewMut::F64(&mut wc),
        coef: -0.25,
        diag: 1.25,
        n,
        count,
        select: None,
    }])
    .unwrap();
    let (mut gx, mut gm, mut gc) = (
        vec![0.0; count * nn],
        vec![0.0; count * nn],
        vec![0.0; count * nn],
    );
    let k = kernel!(
        lib,
        "newton_init_f64",
        fn(C, C, P, P, f64, f64, f64, u64, u64)
    );
    // SAFETY: as above; norms has count elements.
    unsafe {
        k(
            f.as_ptr(),
            norms.as_ptr(),
            gx.as_mut_ptr(),
            gm.as_mut_ptr(),
            5.0,
            2.0,
            0.25,
            n as u64,
            count as u64,
        )
    };
    let k = kernel!(lib, "newton_coefficient_f64", fn(C, P, f64, f64, u64, u64));
    // SAFETY: as above.
    unsafe {
        k(
            gm.as_ptr(),
            gc.as_mut_ptr(),
            -0.25,
            1.25,
            n as u64,
            count as u64,
        )
    };
    assert_eq!(bits(&wx), bits(&gx), "newton_init x");
    assert_eq!(bits(&wm), bits(&gm), "newton_init m");
    assert_eq!(bits(&wc), bits(&gc), "newton_coefficient");
    // EigenPower (halved exponent, shifted because min < eps).
    let v = values(3, count * n);
    let mut want = v.clone();
    cpu.map(&mut [Map::EigenPower {
        values: HostViewMut::F64(&mut want),
        n,
        count,
        rule: EigenRule::ShiftBelow { eps: 1e-2 },
        exponent: 0.5,
        half: true,
        select: None,
    }])
    .unwrap();
    let mut got = v.clone();
    let k = kernel!(
        lib,
        "eigen_power_f64",
        fn(P, u64, u64, u64, f64, f64, f64, f64)
    );
    // SAFETY: count x n values.
    unsafe {
        k(
            got.as_mut_ptr(),
            n as u64,
            count as u64,
            0,
            1e-2,
            0.0,
            0.0,
            0.25,
        )
    };
    assert_eq!(bits(&want), bits(&got), "eigen_power");
    // The other eigenvalue rules: damping after, pseudo-inverse (explicit
    // and machine-epsilon relative tolerances).
    for (rule, code, eps, atol, rtol) in [
        (EigenRule::ShiftNonnegative { eps: 1e-2 }, 1, 1e-2, 0.0, 0.0),
        (
            EigenRule::PseudoInverse {
                atol: 0.05,
                rtol: Some(0.3),
            },
            2,
            0.0,
            0.05,
            0.3,
        ),
        (
            EigenRule::PseudoInverse {
                atol: 0.2,
                rtol: None,
            },
            2,
            0.0,
            0.2,
            -1.0,
        ),
    ] {
        let mut want = v.clone();
        cpu.map(&mut [Map::EigenPower {
            values: HostViewMut::F64(&mut want),
            n,
            count,
            rule,
            exponent: 0.25,
            half: false,
            select: None,
        }])
        .unwrap();
        let mut got = v.clone();
        // SAFETY: count x n values.
        unsafe {
            k(
                got.as_mut_ptr(),
                n as u64,
                count as u64,
                code,
                eps,
                atol,
                rtol,
                0.25,
            )
        };
        assert_eq!(bits(&want), bits(&got), "eigen_power {rule:?}");
    }
}

#[test]
fn step_maps_and_reductions_give_the_cpu_backends_bits() {
    let Some((_, lib, _)) = host_kernels() else {
        return;
    };
    let cpu = CpuBackend::new(1).unwrap();
    let (numel, count) = (300usize, 3usize);
    let len = numel * count;
    let g = values(10, len);
    let v0: Vec<f64> = values(11, len).iter().map(|x| x * x).collect();
    let m0 = values(12, len);
    let graft = GraftKernel::Ema {
        beta2: 0.99,
        weight: 1.0 - 0.99,
        eps: 1e-8,
        bc: 0.3,
    };
    // GradientStatistics with its grafting norms.
    let (mut wv, mut wm, mut wgf, mut wn) =
        (v0.clone(), m0.clone(), vec![0.0; len], vec![0.0; count]);
    cpu.map(&mut [Map::GradientStatistics {
        g: HostView::F64(&g),
        v: Some(HostViewMut::F64(&mut wv)),
        graft,
        filtered: Some((HostViewMut::F64(&mut wm), HostViewMut::F64(&mut wgf))),
        beta1: 0.9,
        beta3: 0.9,
        bc1: 0.5,
        graft_sq_norms: Some(HostViewMut::F64(&mut wn)),
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let (mut gv, mut gm, mut ggf, mut gn) =
        (v0.clone(), m0.clone(), vec![0.0; len], vec![0.0; count]);
    let k = kernel!(
        lib,
        "gradient_statistics_f64",
        fn(C, P, u64, f64, f64, P, P, f64, f64, f64, f64, u64, f64, u64)
    );
    // SAFETY: every buffer has count x numel elements.
    unsafe {
        k(
            g.as_ptr(),
            gv.as_mut_ptr(),
            3,
            0.99,
            1.0 - 0.99,
            gm.as_mut_ptr(),
            ggf.as_mut_ptr(),
            0.9,
            1.0 - 0.9,
            0.9,
            1.0 - 0.9,
            0,
            0.5,
            len as u64,
        )
    };
    let ss = kernel!(
        lib,
        "sum_squares_f64",
        fn(C, C, u64, f64, f64, P, u64, u64, u64)
    );
    // SAFETY: as above; count norms.
    unsafe {
        ss(
            ggf.as_ptr(),
            gv.as_ptr(),
            3,
            0.3,
            1e-8,
            gn.as_mut_ptr(),
            numel as u64,
            count as u64,
            0,
        )
    };
    for (name, w, h) in [
        ("v", &wv, &gv),
        ("m1", &wm, &gm),
        ("gf", &wgf, &ggf),
        ("norms", &wn, &gn),
    ] {
        assert_eq!(bits(w), bits(h), "gradient_statistics {name}");
    }
    // Lion's beta3 != beta1, and a dropped weighting factor (weight 1).
    let drop = GraftKernel::Ema {
        beta2: 0.99,
        weight: 1.0,
        eps: 1e-8,
        bc: 1.0,
    };
    let (mut lv, mut lm, mut lgf) = (v0.clone(), m0.clone(), vec![0.0; len]);
    cpu.map(&mut [Map::GradientStatistics {
        g: HostView::F64(&g),
        v: Some(HostViewMut::F64(&mut lv)),
        graft: drop,
        filtered: Some((HostViewMut::F64(&mut lm), HostViewMut::F64(&mut lgf))),
        beta1: 0.99,
        beta3: 0.9,
        bc1: 0.7,
        graft_sq_norms: None,
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let (mut hv, mut hm, mut hgf) = (v0.clone(), m0.clone(), vec![0.0; len]);
    // SAFETY: as above.
    unsafe {
        k(
            g.as_ptr(),
            hv.as_mut_ptr(),
            3,
            0.99,
            1.0,
            hm.as_mut_ptr(),
            hgf.as_mut_ptr(),
            0.99,
            1.0 - 0.99,
            0.9,
            1.0 - 0.9,
            1,
            0.7,
            len as u64,
        )
    };
    for (name, w, h) in [("v", &lv, &hv), ("m1", &lm, &hm), ("gf", &lgf, &hgf)] {
        assert_eq!(bits(w), bits(h), "gradient_statistics (lion) {name}");
    }
    // Direction: grafted Shampoo, weight decay, Nesterov momentum, on the
    // run of blocks 1..3 (the kernel's `first`), as the backend launches it.
    let p_sh = values(13, len);
    let mut sq = wn.clone();
    sq.extend(values(14, count).iter().map(|x| x * x + 0.5));
    let w = values(15, len);
    let b0 = values(16, len);
    let (mut wb, mut wout) = (b0.clone(), values(17, len));
    let mom = MomentumKernel {
        mu: 0.9,
        dampening: 0.1,
        nesterov: true,
    };
    cpu.map(&mut [Map::Direction {
        source: DirectionSource::GraftedShampoo,
        gf: HostView::F64(&wgf),
        v: Some(HostView::F64(&wv)),
        graft,
        p_sh: Some(HostView::F64(&p_sh)),
        sq_norms: Some(HostView::F64(&sq)),
        weight_decay: Some((HostView::F64(&w), 0.01)),
        momentum: Some((HostViewMut::F64(&mut wb), mom)),
        lr: 0.05,
        out: HostViewMut::F64(&mut wout),
        numel,
        count,
        select: Some(&[1, 2]),
    }])
    .unwrap();
    let (mut gb, mut gout) = (b0.clone(), values(17, len));
    let k = kernel!(
        lib,
        "direction_f64",
        fn(u64, C, C, u64, f64, f64, C, C, u64, u64, C, f64, P, f64, f64, u64, f64, P, u64, u64)
    );
    let o = numel;
    // SAFETY: pointers offset to block 1, two blocks of numel; the norms
    // are the whole batch's 2 x count.
    unsafe {
        k(
            1,
            ggf[o..].as_ptr(),
            gv[o..].as_ptr(),
            3,
            0.3,
            1e-8,
            p_sh[o..].as_ptr(),
            sq.as_ptr(),
            1,
            count as u64,
            w[o..].as_ptr(),
            0.01,
            gb[o..].as_mut_ptr(),
            0.9,
            0.9,
            1,
            -0.05,
            gout[o..].as_mut_ptr(),
            numel as u64,
            2,
        )
    };
    let fill = kernel!(lib, "fill_f64", fn(P, f64, u64));
    // SAFETY: block 0 of out.
    unsafe { fill(gout.as_mut_ptr(), -0.0, numel as u64) };
    assert_eq!(bits(&wb), bits(&gb), "direction momentum");
    assert_eq!(bits(&wout), bits(&gout), "direction out");
    // EigenvalueUpdate and EigenvalueScale.
    let (mut wd, mut wr) = (v0.clone(), g.clone());
    cpu.map(&mut [Map::EigenvalueUpdate {
        r: HostView::F64(&p_sh),
        d: HostViewMut::F64(&mut wd),
        beta2: 0.95,
        weight: 1.0 - 0.95,
        numel,
        count,
        select: None,
    }])
    .unwrap();
    cpu.map(&mut [Map::EigenvalueScale {
        r: HostViewMut::F64(&mut wr),
        d: HostView::F64(&wd),
        bc2: 0.4,
        eps: 1e-6,
        exponent: 0.5,
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let (mut gd, mut gr) = (v0.clone(), g.clone());
    let k = kernel!(lib, "eigenvalue_update_f64", fn(C, P, f64, f64, u64));
    // SAFETY: len elements each.
    unsafe { k(p_sh.as_ptr(), gd.as_mut_ptr(), 0.95, 1.0 - 0.95, len as u64) };
    let ks = kernel!(lib, "eigenvalue_scale_f64", fn(P, C, f64, f64, f64, u64));
    // SAFETY: as above.
    unsafe { ks(gr.as_mut_ptr(), gd.as_ptr(), 0.4, 1e-6, 0.5, len as u64) };
    assert_eq!(bits(&wd), bits(&gd), "eigenvalue_update");
    assert_eq!(bits(&wr), bits(&gr), "eigenvalue_scale");
    // A dropped weighting factor and an exponent override.
    let (mut wd, mut wr) = (v0.clone(), g.clone());
    cpu.map(&mut [Map::EigenvalueUpdate {
        r: HostView::F64(&p_sh),
        d: HostViewMut::F64(&mut wd),
        beta2: 0.95,
        weight: 1.0,
        numel,
        count,
        select: None,
    }])
    .unwrap();
    cpu.map(&mut [Map::EigenvalueScale {
        r: HostViewMut::F64(&mut wr),
        d: HostView::F64(&wd),
        bc2: 1.0,
        eps: 1e-6,
        exponent: 0.25,
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let (mut gd, mut gr) = (v0.clone(), g.clone());
    // SAFETY: as above.
    unsafe { k(p_sh.as_ptr(), gd.as_mut_ptr(), 0.95, 1.0, len as u64) };
    // SAFETY: as above.
    unsafe { ks(gr.as_mut_ptr(), gd.as_ptr(), 1.0, 1e-6, 0.25, len as u64) };
    assert_eq!(bits(&wd), bits(&gd), "eigenvalue_update (weight 1)");
    assert_eq!(bits(&wr), bits(&gr), "eigenvalue_scale (exponent 1/4)");
    // Reductions over 3 matrices of 20 x 20 (one with a NaN).
    let mut x = values(18, 3 * 400);
    x[2 * 400 + 7] = f64::NAN;
    for (kind, root) in [(Reduction::SumSquares, 0u64), (Reduction::FrobeniusNorm, 1)] {
        let mut want = vec![0.0; 3];
        cpu.reduce(&mut [ReduceJob {
            input: HostView::F64(&x),
            numel: 400,
            count: 3,
            kind,
            out: HostViewMut::F64(&mut want),
            select: None,
        }])
        .unwrap();
        let mut got = vec![0.0; 3];
        // SAFETY: 3 x 400 inputs, 3 outputs.
        unsafe {
            ss(
                x.as_ptr(),
                std::ptr::null(),
                0,
                1.0,
                0.0,
                got.as_mut_ptr(),
                400,
                3,
                root,
            )
        };
        assert_eq!(bits(&want[..2]), bits(&got[..2]), "{kind:?}");
        assert!(got[2].is_nan());
    }
    let mut want = vec![0.0; 3];
    cpu.reduce(&mut [ReduceJob {
        input: HostView::F64(&x),
        numel: 400,
        count: 3,
        kind: Reduction::MaxAbsDevIdentity,
        out: HostViewMut::F64(&mut want),
        select: None,
    }])
    .unwrap();
    let mut got = vec![0.0; 3];
    let k = kernel!(lib, "max_abs_dev_identity_f64", fn(C, P, u64, u64));
    // SAFETY: as above.
    unsafe { k(x.as_ptr(), got.as_mut_ptr(), 20, 3) };
    assert_eq!(bits(&want[..2]), bits(&got[..2]), "max_abs_dev_identity");
    assert!(want[2].is_nan() && got[2].is_nan());
    let k = kernel!(lib, "all_finite_f64", fn(C, P, u64, u64, u64, u64));
    // SAFETY: as above.
    unsafe { k(x.as_ptr(), got.as_mut_ptr(), 400, 20, 0, 3) };
    assert_eq!(got, vec![1.0, 1.0, 0.0]);
    // The lower-triangle check ignores a NaN above the diagonal.
    unsafe { k(x.as_ptr(), got.as_mut_ptr(), 400, 20, 1, 3) };
    assert_eq!(got, vec![1.0, 1.0, 1.0]);
}

/// Channels-last strides of `(o, i, h, w)`.
fn channels_last([_, i, h, w]: [usize; 4]) -> Vec<usize> {
    vec![i * h * w, 1, w * i, i]
}

#[test]
fn gathers_and_scatters_give_the_cpu_backends_bits() {
    let Some((_, lib, _)) = host_kernels() else {
        return;
    };
    let cases: [(Vec<usize>, Option<Vec<usize>>, usize); 5] = [
        (vec![5, 6, 7], None, 4),
        // Channels-last, merged (6, 4, 4): out x in is not nested in memory.
        (vec![2, 3, 4, 4], Some(channels_last([2, 3, 4, 4])), 8),
        // Channels-last, merged (6, 4, 9): the 3x3 window is nested.
        (vec![6, 4, 3, 3], Some(channels_last([6, 4, 3, 3])), 12),
        // Column-major, split into blocks.
        (vec![6, 10], Some(vec![1, 6]), 4),
        // Column-major, merged into one dimension.
        (vec![6, 10], Some(vec![1, 6]), 64),
    ];
    for (shape, strides, max) in cases {
        gather_and_scatter_match(lib, &shape, strides, max);
    }
}

fn gather_and_scatter_match(
    lib: &libloading::Library,
    shape: &[usize],
    strides: Option<Vec<usize>>,
    max: usize,
) {
    let what = format!("{shape:?} strides {strides:?} max {max}");
    let cpu = CpuBackend::new(1).unwrap();
    let memory = strides.map(|s| Strided::new("p", shape, &s).unwrap().unwrap());
    let n: usize = shape.iter().product();
    let mut off = 0;
    let entries: Vec<TableEntry> = block_parameter_min_order(0, shape, max, 1, memory)
        .into_iter()
        .map(|block| {
            let e = TableEntry {
                packed_offset: off,
                block,
            };
            off += e.block.numel();
            e
        })
        .collect();
    let table = CudaBlockTable::new(entries.clone()).unwrap();
    let cpu_table = cpu.block_table(entries).unwrap();
    let (p, w) = (values(20, n), values(21, n));
    let mut want = vec![0.0; off];
    cpu.gather(&mut [GatherJob {
        table: &cpu_table,
        sources: &[Some(HostView::F64(&p))],
        add: Some((&[Some(HostView::F64(&w))], 0.3)),
        out: HostViewMut::F64(&mut want),
        select: None,
    }])
    .unwrap();
    let mut got = vec![f64::NAN; off];
    let gather = kernel!(lib, "gather_f64", fn(*const u64, u64));
    let scatter = kernel!(lib, "scatter_f64", fn(*const u64, u64));
    // Every block's record in one table and one call, as the backend does.
    let records = |packed: u64, param: u64, add: Option<(u64, f64)>, accumulate: bool| {
        let mut words = Vec::new();
        for i in 0..table.len() {
            let (geo, numel, off) = table.kernel_geometry(i);
            words.extend(move_words(
                packed + 8 * off as u64,
                param,
                add,
                numel,
                accumulate,
                &geo,
            ));
        }
        assert_eq!(words.len(), table.len() * MOVE_WORDS);
        words
    };
    let moves = records(
        got.as_mut_ptr() as u64,
        p.as_ptr() as u64,
        Some((w.as_ptr() as u64, 0.3)),
        false,
    );
    // SAFETY: every record's packed range is inside `got`, its elements
    // inside the parameter (checked by the table).
    unsafe { gather(moves.as_ptr(), table.len() as u64) };
    assert_eq!(bits(&want), bits(&got), "gather {what}");
    let mut wdst = values(22, n);
    cpu.scatter(&mut [ScatterJob {
        table: &cpu_table,
        source: HostView::F64(&want),
        dst: HostViewMut::F64(&mut wdst),
        add: true,
    }])
    .unwrap();
    let mut gdst = values(22, n);
    let moves = records(got.as_ptr() as u64, gdst.as_mut_ptr() as u64, None, true);
    // SAFETY: as above.
    unsafe { scatter(moves.as_ptr(), table.len() as u64) };
    assert_eq!(bits(&wdst), bits(&gdst), "scatter {what}");
}

#[test]
fn swap_axes_moves_a_middle_mode_to_the_front() {
    let Some((_, lib, _)) = host_kernels() else {
        return;
    };
    let swap = kernel!(lib, "swap_axes_f64", fn(C, P, u64, u64, u64, u64));
    let (a, d, b, count) = (3usize, 4usize, 5usize, 2usize);
    let numel = a * d * b;
    let x = values(30, count * numel);
    let mut got = vec![f64::NAN; count * numel];
    // SAFETY: both buffers hold `count` tensors of `numel` elements.
    unsafe {
        swap(
            x.as_ptr(),
            got.as_mut_ptr(),
            a as u64,
            d as u64,
            b as u64,
            count as u64,
        )
    };
    for t in 0..count {
        for j in 0..a {
            for k in 0..d {
                for q in 0..b {
                    assert_eq!(
                        got[t * numel + (k * a + j) * b + q].to_bits(),
                        x[t * numel + (j * d + k) * b + q].to_bits(),
                        "tensor {t} ({j}, {k}, {q})"
                    );
                }
            }
        }
    }
}

#[test]
fn reductions_with_a_block_of_threads_give_the_cpu_backends_bits() {
    let Some((_, _, lib)) = host_kernels() else {
        return;
    };
    let cpu = CpuBackend::new(1).unwrap();
    // Three 300 x 300 matrices: 352 chunks of 256 (the last one partial),
    // 22 rounds of the block's 16 chunks (16 threads each).
    let (n, count) = (300usize, 3usize);
    let nn = n * n;
    let mut x = values(30, count * nn);
    x[2 * nn + 5] = f64::NAN;
    let ss = kernel!(
        lib,
        "threaded_sum_squares_f64",
        fn(C, C, u64, f64, f64, P, u64, u64, u64)
    );
    for (kind, root) in [(Reduction::SumSquares, 0u64), (Reduction::FrobeniusNorm, 1)] {
        let mut want = vec![0.0; count];
        cpu.reduce(&mut [ReduceJob {
            input: HostView::F64(&x),
            numel: nn,
            count,
            kind,
            out: HostViewMut::F64(&mut want),
            select: None,
        }])
        .unwrap();
        let mut got = vec![0.0; count];
        // SAFETY: count x nn inputs, count outputs.
        unsafe {
            ss(
                x.as_ptr(),
                std::ptr::null(),
                0,
                1.0,
                0.0,
                got.as_mut_ptr(),
                nn as u64,
                count as u64,
                root,
            )
        };
        assert_eq!(bits(&want[..2]), bits(&got[..2]), "{kind:?}");
        assert!(got[2].is_nan());
    }
    let mut want = vec![0.0; count];
    cpu.reduce(&mut [ReduceJob {
        input: HostView::F64(&x),
        numel: nn,
        count,
        kind: Reduction::MaxAbsDevIdentity,
        out: HostViewMut::F64(&mut want),
        select: None,
    }])
    .unwrap();
    let mut got = vec![0.0; count];
    let k = kernel!(lib, "threaded_max_abs_dev_identity_f64", fn(C, P, u64, u64));
    // SAFETY: as above.
    unsafe { k(x.as_ptr(), got.as_mut_ptr(), n as u64, count as u64) };
    assert_eq!(bits(&want[..2]), bits(&got[..2]), "max_abs_dev_identity");
    assert!(got[2].is_nan());
    let k = kernel!(lib, "threaded_all_finite_f64", fn(C, P, u64, u64, u64, u64));
    // SAFETY: as above.
    unsafe {
        k(
            x.as_ptr(),
            got.as_mut_ptr(),
            nn as u64,
            n as u64,
            0,
            count as u64,
        )
    };
    assert_eq!(got, vec![1.0, 1.0, 0.0]);
    // SAFETY: as above.
    unsafe {
        k(
            x.as_ptr(),
            got.as_mut_ptr(),
            nn as u64,
            n as u64,
            1,
            count as u64,
        )
    };
    assert_eq!(got, vec![1.0, 1.0, 1.0], "the NaN is above the diagonal");
    let v = values(31, count * 700);
    let mut want = v.clone();
    cpu.map(&mut [Map::EigenPower {
        values: HostViewMut::F64(&mut want),
        n: 700,
        count,
        rule: EigenRule::ShiftBelow { eps: 1e-2 },
        exponent: 0.25,
        half: false,
        select: None,
    }])
    .unwrap();
    let mut got = v.clone();
    let k = kernel!(
        lib,
        "threaded_eigen_power_f64",
        fn(P, u64, u64, u64, f64, f64, f64, f64)
    );
    // SAFETY: count x 700 values.
    unsafe { k(got.as_mut_ptr(), 700, count as u64, 0, 1e-2, 0.0, 0.0, 0.25) };
    assert_eq!(bits(&want), bits(&got), "eigen_power");
    // The pseudo-inverse's maximum is a block reduction too.
    let mut want = v.clone();
    cpu.map(&mut [Map::EigenPower {
        values: HostViewMut::F64(&mut want),
        n: 700,
        count,
        rule: EigenRule::PseudoInverse {
            atol: 0.0,
            rtol: Some(0.5),
        },
        exponent: 0.25,
        half: false,
        select: None,
    }])
    .unwrap();
    let mut got = v.clone();
    // SAFETY: count x 700 values.
    unsafe { k(got.as_mut_ptr(), 700, count as u64, 2, 0.0, 0.0, 0.5, 0.25) };
    assert_eq!(bits(&want), bits(&got), "eigen_power (pseudo-inverse)");
}

#[test]
fn the_new_modes_kernels_give_the_cpu_backends_bits() {
    let Some((_, lib, _)) = host_kernels() else {
        return;
    };
    let cpu = CpuBackend::new(1).unwrap();
    let (numel, count) = (40usize, 3usize);
    let len = numel * count;
    let a = values(60, len);
    let b = values(61, len);
    let mut with_zero = a.clone();
    with_zero[5] = 0.0;
    with_zero[6] = -0.0;
    // Sign.
    let mut want = vec![0.0; len];
    cpu.map(&mut [Map::Sign {
        src: HostView::F64(&with_zero),
        dst: HostViewMut::F64(&mut want),
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let mut got = vec![0.0; len];
    let k = kernel!(lib, "sign_map_f64", fn(C, P, u64));
    // SAFETY: len elements each.
    unsafe { k(with_zero.as_ptr(), got.as_mut_ptr(), len as u64) };
    assert_eq!(bits(&want), bits(&got), "sign");
    // Axpby.
    let mut want = a.clone();
    cpu.map(&mut [Map::Axpby {
        x: HostViewMut::F64(&mut want),
        y: HostView::F64(&b),
        a: 3.4445,
        b: -4.775,
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let mut got = a.clone();
    let k = kernel!(lib, "axpby_f64", fn(P, C, f64, f64, u64));
    // SAFETY: as above.
    unsafe { k(got.as_mut_ptr(), b.as_ptr(), 3.4445, -4.775, len as u64) };
    assert_eq!(bits(&want), bits(&got), "axpby");
    // ScaleByNorm (one norm under the floor) and ScaleBlocks.
    let norms = vec![2.5, 1e-9, 0.7];
    let mut want = vec![0.0; len];
    cpu.map(&mut [Map::ScaleByNorm {
        src: HostView::F64(&a),
        dst: HostViewMut::F64(&mut want),
        norms: HostView::F64(&norms),
        floor: 1e-8,
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let mut got = vec![0.0; len];
    let k = kernel!(lib, "scale_blocks_f64", fn(C, P, C, f64, u64, u64, u64));
    // SAFETY: as above; count norms.
    unsafe {
        k(
            a.as_ptr(),
            got.as_mut_ptr(),
            norms.as_ptr(),
            1e-8,
            1,
            numel as u64,
            count as u64,
        )
    };
    assert_eq!(bits(&want), bits(&got), "scale_by_norm");
    let mut want = a.clone();
    cpu.map(&mut [Map::ScaleBlocks {
        x: HostViewMut::F64(&mut want),
        scales: HostView::F64(&norms),
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let mut got = a.clone();
    let p = got.as_mut_ptr();
    // SAFETY: in place, as the backend launches it.
    unsafe { k(p, p, norms.as_ptr(), 0.0, 0, numel as u64, count as u64) };
    assert_eq!(bits(&want), bits(&got), "scale_blocks");
    // IterateAverage, with and without the shrink, and Interpolate.
    let w = values(62, len);
    for shrink in [None, Some(0.999)] {
        let (mut wu, mut wz) = (a.clone(), b.clone());
        cpu.map(&mut [Map::IterateAverage {
            u: HostViewMut::F64(&mut wu),
            z: HostViewMut::F64(&mut wz),
            w: HostView::F64(&w),
            c1: 0.28,
            c2: 0.1,
            shrink,
            numel,
            count,
            select: None,
        }])
        .unwrap();
        let (mut gu, mut gz) = (a.clone(), b.clone());
        let k = kernel!(
            lib,
            "iterate_average_f64",
            fn(P, P, C, f64, f64, f64, u64, u64)
        );
        // SAFETY: as above.
        unsafe {
            k(
                gu.as_mut_ptr(),
                gz.as_mut_ptr(),
                w.as_ptr(),
                0.28,
                0.1,
                shrink.unwrap_or(1.0),
                u64::from(shrink.is_some()),
                len as u64,
            )
        };
        assert_eq!(bits(&wu), bits(&gu), "iterate_average u {shrink:?}");
        assert_eq!(bits(&wz), bits(&gz), "iterate_average z {shrink:?}");
    }
    let mut want = vec![0.0; len];
    cpu.map(&mut [Map::Interpolate {
        z: HostView::F64(&b),
        w: HostView::F64(&w),
        out: HostViewMut::F64(&mut want),
        coef: -0.25,
        numel,
        count,
        select: None,
    }])
    .unwrap();
    let mut got = vec![0.0; len];
    let k = kernel!(lib, "interpolate_f64", fn(C, C, P, f64, u64));
    // SAFETY: as above.
    unsafe { k(b.as_ptr(), w.as_ptr(), got.as_mut_ptr(), -0.25, len as u64) };
    assert_eq!(bits(&want), bits(&got), "interpolate");
    // Matrices: Trace, MaxRowAbsSum (one NaN), TraceScale, AddRidge.
    let n = 6usize;
    let nn = n * n;
    let mut m = values(63, count * nn);
    m[2 * nn + 9] = f64::NAN;
    for (kind, code) in [(Reduction::Trace, 0u64), (Reduction::MaxRowAbsSum, 1)] {
        let mut want = vec![0.0; count];
        cpu.reduce(&mut [ReduceJob {
            input: HostView::F64(&m),
            numel: nn,
            count,
            kind,
            out: HostViewMut::F64(&mut want),
            select: None,
        }])
        .unwrap();
        let mut got = vec![0.0; count];
        let k = kernel!(lib, "matrix_stat_f64", fn(C, P, u64, u64, u64));
        // SAFETY: count matrices of n x n, count results.
        unsafe { k(m.as_ptr(), got.as_mut_ptr(), code, n as u64, count as u64) };
        assert_eq!(bits(&want[..2]), bits(&got[..2]), "{kind:?}");
        assert_eq!(want[2].is_nan(), got[2].is_nan(), "{kind:?} NaN");
    }
    let m = values(64, count * nn);
    let traces = vec![3.0, -1.0, 1e-12];
    let mut want = m.clone();
    cpu.map(&mut [Map::TraceScale {
        x: HostViewMut::F64(&mut want),
        traces: HostView::F64(&traces),
        eps: 1e-10,
        exponent: 0.5,
        n,
        count,
        select: None,
    }])
    .unwrap();
    let mut got = m.clone();
    let k = kernel!(lib, "trace_scale_f64", fn(P, C, f64, f64, u64, u64));
    // SAFETY: as above.
    unsafe {
        k(
            got.as_mut_ptr(),
            traces.as_ptr(),
            1e-10,
            0.5,
            n as u64,
            count as u64,
        )
    };
    assert_eq!(bits(&want), bits(&got), "trace_scale");
    let mut want = m.clone();
    cpu.map(&mut [Map::AddRidge {
        x: HostViewMut::F64(&mut want),
        values: HostView::F64(&traces),
        rel: 1e-3,
        abs: 1e-9,
        n,
        count,
        select: None,
    }])
    .unwrap();
    let mut got = m.clone();
    let k = kernel!(lib, "add_ridge_f64", fn(P, C, f64, f64, u64, u64));
    // SAFETY: as above.
    unsafe {
        k(
            got.as_mut_ptr(),
            traces.as_ptr(),
            1e-3,
            1e-9,
            n as u64,
            count as u64,
        )
    };
    assert_eq!(bits(&want), bits(&got), "add_ridge");
}

/// Values across both 16-bit formats' ranges: normals, subnormals, ties,
/// overflow, zeros, infinities and NaNs.
fn wire_values() -> Vec<f64> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.0 + 2f64.powi(-8),
        1.0 + 2f64.powi(-8) + 2f64.powi(-40),
        1.0 + 3.0 * 2f64.powi(-11),
        65504.0,
        65520.0,
        -7e4,
        3.4e38,
        1e300,
        5.96e-8,
        2f64.powi(-25),
        9.2e-41,
        1e-300,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        f64::from_bits(0xfff0_0000_0000_0001),
    ];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..5000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let e = (x % 200) as i32 - 140;
        let m = 1.0 + (x >> 12) as f64 / (1u64 << 52) as f64;
        v.push(if x & 1 == 1 { -m } else { m } * 2f64.powi(e));
    }
    v
}

#[test]
fn wire_packing_gives_the_cpu_jobs_bits() {
    let Some((_, lib, _)) = host_kernels() else {
        return;
    };
    let cpu = CpuBackend::new(1).unwrap();
    type W = *mut u16;
    type CW = *const u16;
    let pack64 = kernel!(lib, "pack16_f64", fn(*const u64, W, u64, u64, u64));
    let unpack64 = kernel!(lib, "unpack16_f64", fn(CW, *mut u64, u64, u64));
    let pack32 = kernel!(lib, "pack16_f32", fn(*const u32, W, u64, u64, u64));
    let unpack32 = kernel!(lib, "unpack16_f32", fn(CW, *mut u32, u64, u64));
    let v64 = wire_values();
    let v32: Vec<f32> = v64.iter().map(|&x| x as f32).collect();
    let n = v64.len();
    for (format, code) in [(WireFormat::Bf16, 0u64), (WireFormat::F16, 1)] {
        // f64: a wire view of one spare element, so the kernel pads too.
        let len = wire16_len(shampoo_core::DType::F64, n) + 1;
        let mut want = vec![f64::from_bits(u64::MAX); len];
        cpu.wire(&mut [WireJob::Pack {
            src: HostView::F64(&v64),
            wire: HostViewMut::F64(&mut want),
            format,
        }])
        .unwrap();
        let mut got = vec![u16::MAX; len * 4];
        let src: Vec<u64> = v64.iter().map(|x| x.to_bits()).collect();
        // SAFETY: `src` has n values, `got` len * 4 slots.
        unsafe {
            pack64(
                src.as_ptr(),
                got.as_mut_ptr(),
                n as u64,
                (len * 4) as u64,
                code,
            )
        };
        let want16: &[u16] = bytemuck::cast_slice(&want);
        assert_eq!(want16, &got[..], "pack16_f64 {format:?}");
        let mut back = vec![0.0f64; n];
        cpu.wire(&mut [WireJob::Unpack {
            wire: HostView::F64(&want),
            dst: HostViewMut::F64(&mut back),
            format,
        }])
        .unwrap();
        let mut gback = vec![0u64; n];
        // SAFETY: `got` holds n values, `gback` n elements.
        unsafe { unpack64(got.as_ptr(), gback.as_mut_ptr(), n as u64, code) };
        assert_eq!(bits(&back), gback, "unpack16_f64 {format:?}");

        let len = wire16_len(shampoo_core::DType::F32, n) + 1;
        let mut want = vec![f32::from_bits(u32::MAX); len];
        cpu.wire(&mut [WireJob::Pack {
            src: HostView::F32(&v32),
            wire: HostViewMut::F32(&mut want),
            format,
        }])
        .unwrap();
        let mut got = vec![u16::MAX; len * 2];
        let src: Vec<u32> = v32.iter().map(|x| x.to_bits()).collect();
        // SAFETY: as above, len * 2 slots.
        unsafe {
            pack32(
                src.as_ptr(),
                got.as_mut_ptr(),
                n as u64,
                (len * 2) as u64,
                code,
            )
        };
        let want16: &[u16] = bytemuck::cast_slice(&want);
        assert_eq!(want16, &got[..], "pack16_f32 {format:?}");
        let mut back = vec![0.0f32; n];
        cpu.wire(&mut [WireJob::Unpack {
            wire: HostView::F32(&want),
            dst: HostViewMut::F32(&mut back),
            format,
        }])
        .unwrap();
        let mut gback = vec![0u32; n];
        // SAFETY: as above.
        unsafe { unpack32(got.as_ptr(), gback.as_mut_ptr(), n as u64, code) };
        let want_bits: Vec<u32> = back.iter().map(|x| x.to_bits()).collect();
        assert_eq!(want_bits, gback, "unpack16_f32 {format:?}");
    }
}

/// The `_jobs` variants (one launch for the jobs of several groups, each
/// job's addresses and sizes a row of a table) give exactly the bits of
/// their single-job kernels run once per job.
#[test]
fn batched_job_kernels_equal_their_single_job_kernels() {
    let Some((_, lib, _)) = host_kernels() else {
        return;
    };
    // Two jobs of different shapes: 3 blocks of 70 and 2 blocks of 300.
    let jobs = [(70usize, 3usize), (300, 2)];
    let inputs = |seed: u64| -> Vec<Vec<f64>> {
        jobs.iter()
            .enumerate()
            .map(|(j, &(n, c))| values(seed + j as u64, n * c))
            .collect()
    };
    let g = inputs(40);
    let gs = kernel!(
        lib,
        "gradient_statistics_f64",
        fn(C, P, u64, f64, f64, P, P, f64, f64, f64, f64, u64, f64, u64)
    );
    let gs_jobs = kernel!(
        lib,
        "gradient_statistics_jobs_f64",
        fn(*const u64, u64, u64, f64, f64, f64, f64, f64, f64, u64, f64)
    );
    let (mut v1, mut m1, mut f1) = (inputs(50), inputs(60), inputs(70));
    let (mut v2, mut m2, mut f2) = (v1.clone(), m1.clone(), f1.clone());
    for j in 0..jobs.len() {
        // SAFETY: every buffer of job j holds its n x c elements.
        unsafe {
            gs(
                g[j].as_ptr(),
                v1[j].as_mut_ptr(),
                3,
                0.99,
                0.01,
                m1[j].as_mut_ptr(),
                f1[j].as_mut_ptr(),
                0.9,
                0.1,
                0.8,
                0.2,
                1,
                0.5,
                g[j].len() as u64,
            )
        };
    }
    let rows: Vec<u64> = (0..jobs.len())
        .flat_map(|j| {
            [
                g[j].as_ptr() as u64,
                v2[j].as_mut_ptr() as u64,
                m2[j].as_mut_ptr() as u64,
                f2[j].as_mut_ptr() as u64,
                g[j].len() as u64,
            ]
        })
        .collect();
    // SAFETY: the rows point at the buffers above.
    unsafe { gs_jobs(rows.as_ptr(), 2, 3, 0.99, 0.01, 0.9, 0.1, 0.8, 0.2, 1, 0.5) };
    for j in 0..jobs.len() {
        assert_eq!(bits(&v1[j]), bits(&v2[j]), "v of job {j}");
        assert_eq!(bits(&m1[j]), bits(&m2[j]), "m1 of job {j}");
        assert_eq!(bits(&f1[j]), bits(&f2[j]), "gf of job {j}");
    }

    let ss = kernel!(
        lib,
        "sum_squares_f64",
        fn(C, C, u64, f64, f64, P, u64, u64, u64)
    );
    let ss_jobs = kernel!(
        lib,
        "sum_squares_jobs_f64",
        fn(*const u64, u64, u64, f64, f64, u64)
    );
    let mut n1: Vec<Vec<f64>> = jobs.iter().map(|&(_, c)| vec![0.0; c]).collect();
    let mut n2 = n1.clone();
    for (j, &(n, c)) in jobs.iter().enumerate() {
        // SAFETY: as above; c norms.
        unsafe {
            ss(
                f1[j].as_ptr(),
                v1[j].as_ptr(),
                3,
                0.3,
                1e-8,
                n1[j].as_mut_ptr(),
                n as u64,
                c as u64,
                1,
            )
        };
    }
    let rows: Vec<u64> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, &(n, c))| {
            [
                f1[j].as_ptr() as u64,
                v1[j].as_ptr() as u64,
                n2[j].as_mut_ptr() as u64,
                n as u64,
                c as u64,
            ]
        })
        .collect();
    // SAFETY: as above.
    unsafe { ss_jobs(rows.as_ptr(), 2, 3, 0.3, 1e-8, 1) };
    for j in 0..jobs.len() {
        assert_eq!(bits(&n1[j]), bits(&n2[j]), "norms of job {j}");
    }

    let dir = kernel!(
        lib,
        "direction_f64",
        fn(u64, C, C, u64, f64, f64, C, C, u64, u64, C, f64, P, f64, f64, u64, f64, P, u64, u64)
    );
    let dir_jobs = kernel!(
        lib,
        "direction_jobs_f64",
        fn(*const u64, u64, u64, u64, f64, f64, f64, f64, f64, u64, f64)
    );
    let p_sh = inputs(80);
    let sq: Vec<Vec<f64>> = jobs
        .iter()
        .enumerate()
        .map(|(j, &(_, c))| {
            values(90 + j as u64, 2 * c)
                .iter()
                .map(|x| x.abs() + 0.1)
                .collect()
        })
        .collect();
    let w = inputs(100);
    let (mut b1, mut o1) = (inputs(110), inputs(120));
    let (mut b2, mut o2) = (b1.clone(), o1.clone());
    for (j, &(n, c)) in jobs.iter().enumerate() {
        // SAFETY: as above; 2 x c norms.
        unsafe {
            dir(
                1,
                f1[j].as_ptr(),
                v1[j].as_ptr(),
                3,
                0.3,
                1e-8,
                p_sh[j].as_ptr(),
                sq[j].as_ptr(),
                0,
                c as u64,
                w[j].as_ptr(),
                0.01,
                b1[j].as_mut_ptr(),
                0.9,
                0.9,
                1,
                -0.05,
                o1[j].as_mut_ptr(),
                n as u64,
                c as u64,
            )
        };
    }
    let rows: Vec<u64> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, &(n, c))| {
            [
                f1[j].as_ptr() as u64,
                v1[j].as_ptr() as u64,
                p_sh[j].as_ptr() as u64,
                sq[j].as_ptr() as u64,
                0,
                c as u64,
                w[j].as_ptr() as u64,
                b2[j].as_mut_ptr() as u64,
                o2[j].as_mut_ptr() as u64,
                n as u64,
                c as u64,
            ]
        })
        .collect();
    // SAFETY: as above.
    unsafe { dir_jobs(rows.as_ptr(), 2, 1, 3, 0.3, 1e-8, 0.01, 0.9, 0.9, 1, -0.05) };
    for j in 0..jobs.len() {
        assert_eq!(bits(&b1[j]), bits(&b2[j]), "momentum of job {j}");
        assert_eq!(bits(&o1[j]), bits(&o2[j]), "direction of job {j}");
    }
}

/// The `_jobs` variants of the root iteration's and eigenvalue-corrected
/// Shampoo's maps against their single-job kernels, bit for bit.
#[test]
fn batched_map_kernels_equal_their_single_job_kernels() {
    let Some((_, lib, _)) = host_kernels() else {
        return;
    };
    let sizes = [45usize, 128];
    let make = |seed: u64| -> Vec<Vec<f64>> {
        sizes
            .iter()
            .enumerate()
            .map(|(j, &n)| {
                values(seed + j as u64, n)
                    .iter()
                    .map(|x| x.abs() + 0.5)
                    .collect()
            })
            .collect()
    };
    // copy
    let copy = kernel!(lib, "copy_f64", fn(P, C, u64));
    let copy_jobs = kernel!(lib, "copy_jobs_f64", fn(*const u64, u64));
    let src = make(200);
    let mut d1: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut d2 = d1.clone();
    for j in 0..2 {
        // SAFETY: both hold sizes[j] elements.
        unsafe { copy(d1[j].as_mut_ptr(), src[j].as_ptr(), sizes[j] as u64) };
    }
    let rows: Vec<u64> = (0..2)
        .flat_map(|j| {
            [
                d2[j].as_mut_ptr() as u64,
                src[j].as_ptr() as u64,
                sizes[j] as u64,
            ]
        })
        .collect();
    // SAFETY: as above.
    unsafe { copy_jobs(rows.as_ptr(), 2) };
    assert_eq!(d1, d2);
    // newton_coefficient on 3 x 3 and 8 x 8 matrices (9 and 64 elements of
    // each job's first matrices).
    let nc = kernel!(lib, "newton_coefficient_f64", fn(C, P, f64, f64, u64, u64));
    let nc_jobs = kernel!(
        lib,
        "newton_coefficient_jobs_f64",
        fn(*const u64, u64, f64, f64)
    );
    let dims = [(3usize, 5usize), (8, 2)];
    let mut o1: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut o2 = o1.clone();
    for (j, &(n, c)) in dims.iter().enumerate() {
        // SAFETY: n * n * c <= sizes[j] elements.
        unsafe {
            nc(
                src[j].as_ptr(),
                o1[j].as_mut_ptr(),
                -0.25,
                1.25,
                n as u64,
                c as u64,
            )
        };
    }
    let rows: Vec<u64> = dims
        .iter()
        .enumerate()
        .flat_map(|(j, &(n, c))| {
            [
                src[j].as_ptr() as u64,
                o2[j].as_mut_ptr() as u64,
                n as u64,
                c as u64,
            ]
        })
        .collect();
    // SAFETY: as above.
    unsafe { nc_jobs(rows.as_ptr(), 2, -0.25, 1.25) };
    assert_eq!(bits(&o1.concat()), bits(&o2.concat()));
    // eigenvalue update and scale
    let eu = kernel!(lib, "eigenvalue_update_f64", fn(C, P, f64, f64, u64));
    let eu_jobs = kernel!(
        lib,
        "eigenvalue_update_jobs_f64",
        fn(*const u64, u64, f64, f64)
    );
    let es = kernel!(lib, "eigenvalue_scale_f64", fn(P, C, f64, f64, f64, u64));
    let es_jobs = kernel!(
        lib,
        "eigenvalue_scale_jobs_f64",
        fn(*const u64, u64, f64, f64, f64)
    );
    let r = make(300);
    let (mut e1, mut e2) = (make(400), make(400));
    let (mut r1, mut r2) = (r.clone(), r.clone());
    for j in 0..2 {
        let n = sizes[j] as u64;
        // SAFETY: every buffer holds sizes[j] elements.
        unsafe {
            eu(r[j].as_ptr(), e1[j].as_mut_ptr(), 0.99, 0.01, n);
            es(r1[j].as_mut_ptr(), e1[j].as_ptr(), 0.5, 1e-8, 0.5, n);
        }
    }
    let rows: Vec<u64> = (0..2)
        .flat_map(|j| {
            [
                r[j].as_ptr() as u64,
                e2[j].as_mut_ptr() as u64,
                sizes[j] as u64,
            ]
        })
        .collect();
    let rows_scale: Vec<u64> = (0..2)
        .flat_map(|j| {
            [
                r2[j].as_mut_ptr() as u64,
                e2[j].as_ptr() as u64,
                sizes[j] as u64,
            ]
        })
        .collect();
    // SAFETY: as above.
    unsafe {
        eu_jobs(rows.as_ptr(), 2, 0.99, 0.01);
        es_jobs(rows_scale.as_ptr(), 2, 0.5, 1e-8, 0.5);
    }
    assert_eq!(bits(&e1.concat()), bits(&e2.concat()));
    assert_eq!(bits(&r1.concat()), bits(&r2.concat()));
}

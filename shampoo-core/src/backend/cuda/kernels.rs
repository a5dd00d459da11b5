//! The project's CUDA C kernels (`kernels/*.cu`), embedded in the binary,
//! compiled with NVRTC for the device's compute capability on first use and
//! cached for the life of the process.

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as drv, sys as dsys};
use cudarc::nvrtc::{CompileError, CompileOptions};

use crate::{DType, Error, Result};

/// Header prepended to every source (NVRTC has no include path here).
pub const COMMON: &str = include_str!("../../../../kernels/common.cuh");

/// One kernel source file and the entry points it must define (each for
/// `f32` and `f64` unless its name already says the types).
pub struct KernelSource {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// The CUDA C source.
    pub source: &'static str,
    /// Entry-point names without their `_f32`/`_f64` suffix.
    pub typed: &'static [&'static str],
    /// Entry-point names used as they are.
    pub untyped: &'static [&'static str],
}

// `Kernel` (the typed ids of every entry point), `SOURCES` (every file of
// `kernels/` with its entry points) and `kernel_defines` (the sources'
// integer `#define`s), generated from `kernels/` by `build.rs`.
include!(concat!(env!("OUT_DIR"), "/kernel_ids.rs"));

impl Kernel {
    /// The entry point's name for `dtype` (`name_f32`/`name_f64` for a typed
    /// kernel; the name itself otherwise).
    pub fn entry_point(self, dtype: DType) -> String {
        if self.is_typed() {
            format!("{}_{}", self.base_name(), dtype_suffix(dtype))
        } else {
            self.base_name().to_string()
        }
    }
}

fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
    }
}

impl KernelSource {
    /// Every entry point of the file, with type suffixes.
    pub fn entry_points(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .typed
            .iter()
            .flat_map(|n| [format!("{n}_f32"), format!("{n}_f64")])
            .collect();
        v.extend(self.untyped.iter().map(|s| s.to_string()));
        v
    }
}

/// NVRTC options: `arch` is e.g. `sm_90`. No FMA contraction, so that every
/// kernel rounds where the CPU backend rounds.
pub fn compile_options(arch: &str) -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        ..Default::default()
    }
}

/// Compiles one source for `arch` to PTX. Needs only NVRTC (no driver, no
/// GPU); the caller probes it first ([`super::probe::probe_nvrtc`]).
pub fn compile_source(src: &KernelSource, arch: &str) -> Result<String> {
    let code = format!("{COMMON}\n#line 1 \"{}\"\n{}", src.file, src.source);
    let mut opts = compile_options(arch);
    opts.name = Some(src.file.to_string());
    match cudarc::nvrtc::compile_ptx_with_opts(code, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, options, .. }) => Err(Error::backend(
            "nvrtc",
            format!(
                "kernels/{} does not compile for {arch} (options {options:?}):\n{}",
                src.file,
                log.to_string_lossy()
            ),
        )),
        Err(e) => Err(Error::backend(
            "nvrtc",
            format!("kernels/{} for {arch}: {e}", src.file),
        )),
    }
}

/// `(file, PTX)` of every source, in [`SOURCES`] order.
pub type CompiledKernels = Arc<Vec<(&'static str, String)>>;

/// Compiles every source for `arch` (cached per process and architecture).
pub fn compile_all(arch: &str) -> Result<CompiledKernels> {
    static CACHE: OnceLock<Mutex<HashMap<String, CompiledKernels>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(arch) {
        return Ok(hit.clone());
    }
    super::probe::probe_nvrtc()?;
    let mut out = Vec::with_capacity(SOURCES.len());
    for src in &SOURCES {
        out.push((src.file, compile_source(src, arch)?));
    }
    let out = Arc::new(out);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(arch.to_string(), out.clone());
    Ok(out)
}

/// The kernels loaded into one context: two slots per [`Kernel`] (its
/// `f32` and `f64` entry points; an untyped kernel uses the first).
pub(super) struct Loaded {
    functions: Vec<dsys::CUfunction>,
    modules: Vec<dsys::CUmodule>,
}

// SAFETY: CUfunction and CUmodule are opaque driver handles, valid in every
// thread that has their context current (the backend binds it before every
// use); the driver API is thread-safe.
unsafe impl Send for Loaded {}
// SAFETY: as above; the table is never mutated after construction.
unsafe impl Sync for Loaded {}

fn slot(k: Kernel, dtype: DType) -> usize {
    2 * k as usize + usize::from(k.is_typed() && dtype == DType::F64)
}

impl Loaded {
    /// Loads the PTX of every source into the current context.
    pub(super) fn load(arch: &str) -> Result<Self> {
        let ptx = compile_all(arch)?;
        let mut functions = vec![std::ptr::null_mut(); 2 * Kernel::ALL.len()];
        let mut modules = Vec::new();
        for (src, (_, code)) in SOURCES.iter().zip(ptx.iter()) {
            let image = CString::new(code.as_str())
                .map_err(|_| Error::backend("load kernels", "PTX contains a NUL byte"))?;
            // SAFETY: `image` is a NUL-terminated PTX string; the context is
            // current (the caller bound it).
            let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(|e| Error::backend("load kernels", format!("{}: {e}", src.file)))?;
            modules.push(module);
        }
        for k in Kernel::ALL {
            let dtypes: &[DType] = if k.is_typed() {
                &[DType::F32, DType::F64]
            } else {
                &[DType::F32]
            };
            for &dt in dtypes {
                let name = k.entry_point(dt);
                let cname = CString::new(name.clone()).expect("kernel names have no NUL");
                // SAFETY: the module was loaded above and is alive.
                let f = unsafe { drv::module::get_function(modules[k.source()], cname) }.map_err(
                    |e| {
                        Error::backend(
                            "load kernels",
                            format!("{}: {name}: {e}", SOURCES[k.source()].file),
                        )
                    },
                )?;
                functions[slot(k, dt)] = f;
            }
        }
        Ok(Loaded { functions, modules })
    }

    /// The function of `k` for `dtype`.
    pub(super) fn get(&self, k: Kernel, dtype: DType) -> dsys::CUfunction {
        self.functions[slot(k, dtype)]
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        for &m in &self.modules {
            // SAFETY: each module was loaded once and is unloaded once; no
            // launch is in flight after the backend synchronised.
            let _ = unsafe { drv::module::unload(m) };
        }
    }
}

/// Kernel arguments, one 8-byte word each, so that a launch needs no heap
/// allocation. Each word is marked as the job's own (an address, a size:
/// [`Args::u`]) or as a scalar that several jobs may share ([`Args::c`],
/// [`Args::f`]), which is what lets a batch of launches of one kernel
/// become one launch of its `_jobs` variant (`ops.rs`).
#[derive(Clone, Copy)]
pub(super) struct Args {
    words: [u64; 32],
    shared: [bool; 32],
    count: usize,
}

impl Args {
    pub(super) fn new() -> Self {
        Args {
            words: [0; 32],
            shared: [false; 32],
            count: 0,
        }
    }

    fn push(&mut self, word: u64, shared: bool) -> &mut Self {
        assert!(self.count < 32, "too many kernel arguments");
        self.words[self.count] = word;
        self.shared[self.count] = shared;
        self.count += 1;
        self
    }

    /// The job's own 64-bit integer: a device address or a size.
    pub(super) fn u(&mut self, v: u64) -> &mut Self {
        self.push(v, false)
    }

    /// A 64-bit integer that is a setting (a kind, a flag), not the job's.
    pub(super) fn c(&mut self, v: u64) -> &mut Self {
        self.push(v, true)
    }

    /// A double (a setting).
    pub(super) fn f(&mut self, v: f64) -> &mut Self {
        self.push(v.to_bits(), true)
    }

    /// The job's own words, in order.
    pub(super) fn own(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count)
            .filter(|&i| !self.shared[i])
            .map(|i| self.words[i])
    }

    /// The shared words, in order.
    pub(super) fn settings(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count)
            .filter(|&i| self.shared[i])
            .map(|i| self.words[i])
    }

    /// Pointers to the arguments, for `cuLaunchKernel`.
    fn params(&mut self) -> [*mut c_void; 32] {
        let mut p = [std::ptr::null_mut(); 32];
        let base = self.words.as_mut_ptr();
        for (i, p) in p.iter_mut().enumerate().take(self.count) {
            // SAFETY: i < count <= 32, inside `words`.
            *p = unsafe { base.add(i) } as *mut c_void;
        }
        p
    }
}

/// Threads per block of elementwise kernels (and of the per-matrix ones:
/// the kernels' REDUCE_THREADS).
pub(super) const THREADS: u32 = 256;

/// Launches `f` on `stream` with `grid` blocks of [`THREADS`].
pub(super) fn launch_raw(
    f: dsys::CUfunction,
    grid: u32,
    stream: dsys::CUstream,
    args: &mut Args,
    what: Kernel,
) -> Result<()> {
    let mut params = args.params();
    // SAFETY: `f` is a loaded kernel whose parameter list matches what the
    // caller pushed (each launch site mirrors its kernel's signature), the
    // argument storage outlives the call (the driver copies the values at
    // launch), and every device address points at memory the backend owns
    // or the caller vouched for.
    unsafe {
        drv::launch_kernel(
            f,
            (grid, 1, 1),
            (THREADS, 1, 1),
            0,
            stream,
            &mut params[..args.count],
        )
    }
    .map_err(|e| Error::backend("launch", format!("{}: {e}", what.base_name())))
}

/// Blocks for an elementwise kernel over `n` elements (grid-stride loops
/// cover the rest).
pub(super) fn grid_for(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).min(65_535) as u32
}

/// Blocks for a per-matrix kernel over `count` matrices.
pub(super) fn grid_matrices(count: usize) -> u32 {
    count.min(65_535) as u32
}

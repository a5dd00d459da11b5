//! Finding the CUDA libraries before anything touches them.
//!
//! cudarc loads its libraries lazily and panics when one is missing, so the
//! backend probes them first with `libloading`: every directory of
//! `SHAMPOO_CUDA_LIB_DIRS` (`:`-separated), then the dynamic loader's own
//! search (`LD_LIBRARY_PATH`, the cache, the system directories). A library
//! found is kept loaded for the life of the process, so that cudarc's later
//! `dlopen` by the same name resolves to the very same file.
//!
//! cudarc, though, asks for each library by its unversioned name first
//! (`libcublas.so`, then other spellings, then `libcublas.so.13`): where
//! another toolkit's development link is on the loader's path (a system
//! CUDA 12 in `/usr/local/cuda/lib64`, say), cudarc would load that one
//! instead of the CUDA 13 library probed here. [`check_not_shadowed`]
//! refuses that case up front, naming the file, instead of letting an
//! older library with another API be called.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::{Error, Result};

/// The CUDA driver, which needs an installed NVIDIA driver (and a GPU).
pub const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// The toolkit libraries the backend loads, in the order they are probed.
pub const TOOLKIT_LIBRARIES: [&str; 4] = [
    "libnvrtc.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcusolver.so.12",
];

/// Environment variable with extra directories searched first.
pub const LIB_DIRS_VAR: &str = "SHAMPOO_CUDA_LIB_DIRS";

/// Where a library was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// In this directory (from `SHAMPOO_CUDA_LIB_DIRS`).
    Dir(PathBuf),
    /// Through the dynamic loader's search path.
    LoaderPath,
}

/// The directories of `SHAMPOO_CUDA_LIB_DIRS`, in order (empty entries
/// skipped).
pub fn lib_dirs_from_env() -> Vec<PathBuf> {
    std::env::var_os(LIB_DIRS_VAR)
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Libraries opened so far, kept loaded until the process exits.
fn loaded() -> &'static Mutex<Vec<(String, Found, libloading::Library)>> {
    static LOADED: OnceLock<Mutex<Vec<(String, Found, libloading::Library)>>> = OnceLock::new();
    LOADED.get_or_init(|| Mutex::new(Vec::new()))
}

fn open(path: &Path) -> std::result::Result<libloading::Library, String> {
    // SAFETY: loading a shared library runs its initialisers; the CUDA
    // libraries probed here are the ones cudarc loads anyway, and their
    // initialisers have no preconditions on the caller.
    unsafe { libloading::Library::new(path) }.map_err(|e| {
        // libloading's own message is generic ("dlopen failed"); the
        // loader's reason is its source.
        match std::error::Error::source(&e) {
            Some(reason) => reason.to_string(),
            None => e.to_string(),
        }
    })
}

/// What to do about a missing toolkit library.
const TOOLKIT_HINT: &str = "Set SHAMPOO_CUDA_LIB_DIRS or LD_LIBRARY_PATH to the directory that \
     holds it (for PyTorch's wheels: site-packages/nvidia/cu13/lib)";

/// What a missing driver library means.
const DRIVER_HINT: &str = "It comes with the NVIDIA driver, which this machine lacks (no GPU, or \
     no driver installed)";

/// Loads `name` from the first of `dirs` that has it, else (when
/// `loader_path`) through the dynamic loader. On failure the error names
/// the library, every place looked in and why each failed.
pub fn probe_library(name: &str, dirs: &[PathBuf], loader_path: bool) -> Result<Found> {
    probe_with_hint(name, dirs, loader_path, TOOLKIT_HINT)
}

fn probe_with_hint(name: &str, dirs: &[PathBuf], loader_path: bool, hint: &str) -> Result<Found> {
    let mut cache = loaded().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, found, _)) = cache.iter().find(|(n, _, _)| n == name) {
        return Ok(found.clone());
    }
    let mut tried = Vec::new();
    for dir in dirs {
        let path = dir.join(name);
        if !path.exists() {
            tried.push(format!("{} (no such file)", path.display()));
            continue;
        }
        match open(&path) {
            Ok(lib) => {
                cache.push((name.to_string(), Found::Dir(dir.clone()), lib));
                return Ok(Found::Dir(dir.clone()));
            }
            Err(e) => tried.push(format!("{} ({e})", path.display())),
        }
    }
    if loader_path {
        match open(Path::new(name)) {
            Ok(lib) => {
                cache.push((name.to_string(), Found::LoaderPath, lib));
                return Ok(Found::LoaderPath);
            }
            Err(e) => tried.push(format!("the dynamic loader's search path ({e})")),
        }
    }
    Err(Error::BackendUnavailable(format!(
        "CUDA library {name} not found; looked in: {}. {hint}",
        if tried.is_empty() {
            "nowhere".to_string()
        } else {
            tried.join("; ")
        }
    )))
}

/// Probes NVRTC alone (all that compiling kernels needs; no driver, no GPU).
pub fn probe_nvrtc() -> Result<()> {
    probe_library(TOOLKIT_LIBRARIES[0], &lib_dirs_from_env(), true).map(|_| ())
}

/// Probes the driver and every toolkit library the backend uses, and
/// checks that cudarc will load the very libraries probed.
pub fn probe_all() -> Result<()> {
    let dirs = lib_dirs_from_env();
    probe_with_hint(DRIVER_LIBRARY, &dirs, true, DRIVER_HINT)?;
    let search = loader_search_dirs();
    for name in TOOLKIT_LIBRARIES {
        let found = probe_library(name, &dirs, true)?;
        check_not_shadowed(name, &found, &search)?;
    }
    Ok(())
}

/// The names cudarc tries for the library whose versioned name is
/// `versioned` (`libcublas.so.13`) before that name, in cudarc's order.
pub fn names_tried_before(versioned: &str) -> Vec<String> {
    let base = versioned
        .strip_prefix("lib")
        .and_then(|n| n.split(".so").next())
        .unwrap_or(versioned);
    cudarc::get_lib_name_candidates(base)
        .into_iter()
        .take_while(|n| n != versioned)
        .collect()
}

/// Directories the dynamic loader searches for a bare library name, in
/// its order (as far as it can be read without loading anything):
/// `LD_LIBRARY_PATH`, the directories configured in `/etc/ld.so.conf` and
/// `/etc/ld.so.conf.d/*.conf` (what the loader's cache holds), then the
/// system directories.
pub fn loader_search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    let mut conf = vec![PathBuf::from("/etc/ld.so.conf")];
    if let Ok(entries) = std::fs::read_dir("/etc/ld.so.conf.d") {
        let mut more: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        more.sort();
        conf.extend(more);
    }
    for file in conf {
        if let Ok(text) = std::fs::read_to_string(&file) {
            dirs.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with('/'))
                    .map(PathBuf::from),
            );
        }
    }
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// Errors when one of the names cudarc tries before `versioned` is a file
/// in `search` (the loader's directories) other than the library `found`
/// by the probe: cudarc would load that file instead. A link to the probed
/// file itself is fine.
pub fn check_not_shadowed(versioned: &str, found: &Found, search: &[PathBuf]) -> Result<()> {
    // The probed file, where the probe knows it (a library found through
    // the loader's own search is located the same way the loader does).
    let probed = match found {
        Found::Dir(d) => Some(d.join(versioned)),
        Found::LoaderPath => search
            .iter()
            .map(|d| d.join(versioned))
            .find(|p| p.exists()),
    }
    .and_then(|p| std::fs::canonicalize(p).ok());
    for name in names_tried_before(versioned) {
        let Some(path) = search.iter().map(|d| d.join(&name)).find(|p| p.exists()) else {
            continue;
        };
        let real = std::fs::canonicalize(&path).ok();
        if real.is_some() && real == probed {
            continue;
        }
        return Err(Error::BackendUnavailable(format!(
            "cudarc would load {} (it asks for {name} before {versioned}) instead of the CUDA 13 library {}; that file is probably another CUDA toolkit's. Take {} off LD_LIBRARY_PATH (or out of the loader's configuration) for this program",
            path.display(),
            match (found, &probed) {
                (Found::Dir(d), _) => d.join(versioned).display().to_string(),
                (Found::LoaderPath, Some(p)) => p.display().to_string(),
                (Found::LoaderPath, None) => format!("{versioned} (from the loader's path)"),
            },
            path.parent()
                .map_or_else(String::new, |p| p.display().to_string()),
        )));
    }
    Ok(())
}

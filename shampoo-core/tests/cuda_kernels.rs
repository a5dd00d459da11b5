//! The CUDA backend without a GPU: every kernel of `kernels/` compiles with
//! NVRTC for sm_90, and missing libraries or devices give errors that name
//! what was looked for.
//!
//! NVRTC (libnvrtc.so.13 and its builtins library) must be loadable:
//! `source scripts/env.sh` puts PyTorch's nvidia/cu13/lib on the library
//! path. Set `SHAMPOO_SKIP_NVRTC=1` to skip the compilation tests on a
//! machine without it (they then print why).
#![cfg(feature = "cuda")]

use std::collections::BTreeSet;
use std::path::PathBuf;

use shampoo_core::backend::cuda::probe::{self, DRIVER_LIBRARY, Found};
use shampoo_core::backend::cuda::{COMMON, KernelSource, SOURCES, compile_all, compile_source};
use shampoo_core::{CudaBackend, Error};

fn kernels_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kernels")
}

/// Whether NVRTC tests run (panics with the probe's message when NVRTC is
/// missing and skipping was not asked for).
fn nvrtc_available() -> bool {
    match probe::probe_nvrtc() {
        Ok(()) => true,
        Err(e) if std::env::var_os("SHAMPOO_SKIP_NVRTC").is_some() => {
            println!("skipping NVRTC compilation (SHAMPOO_SKIP_NVRTC is set): {e}");
            false
        }
        Err(e) => panic!("{e} (source scripts/env.sh, or set SHAMPOO_SKIP_NVRTC=1 to skip)"),
    }
}

#[test]
fn every_kernel_file_is_embedded_as_it_is_on_disk() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(kernels_dir())
        .expect("kernels/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    let embedded: BTreeSet<String> = SOURCES.iter().map(|s| s.file.to_string()).collect();
    assert_eq!(on_disk, embedded);
    for s in &SOURCES {
        let text = std::fs::read_to_string(kernels_dir().join(s.file)).unwrap();
        assert_eq!(text, s.source, "{} differs from its embedded copy", s.file);
    }
    let common = std::fs::read_to_string(kernels_dir().join("common.cuh")).unwrap();
    assert_eq!(common, COMMON);
}

#[test]
fn every_kernel_compiles_for_sm_90_with_every_entry_point() {
    if !nvrtc_available() {
        return;
    }
    let ptx = compile_all("sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ptx.len(), SOURCES.len());
    for (src, (file, code)) in SOURCES.iter().zip(ptx.iter()) {
        assert_eq!(src.file, *file);
        assert!(code.contains(".target sm_90"), "{file}: PTX not for sm_90");
        let entries: BTreeSet<String> = code
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap().trim().to_string())
            .collect();
        let expected: BTreeSet<String> = src.entry_points().into_iter().collect();
        assert_eq!(entries, expected, "{file}: entry points");
    }
    // Cached per process: the second call returns the same compilation.
    let again = compile_all("sm_90").unwrap();
    assert!(std::sync::Arc::ptr_eq(&ptx, &again));
}

#[test]
fn a_compile_error_names_the_file_the_architecture_and_the_compiler_log() {
    if !nvrtc_available() {
        return;
    }
    let broken = KernelSource {
        file: "broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }\n",
        typed: &[],
        untyped: &["k"],
    };
    let err = compile_source(&broken, "sm_90").unwrap_err().to_string();
    assert!(
        err.starts_with("backend error in nvrtc: kernels/broken.cu does not compile for sm_90"),
        "{err}"
    );
    assert!(err.contains("broken.cu(1): error"), "{err}");
    assert!(err.contains("undefined_name"), "{err}");
}

#[test]
fn a_missing_library_is_named_with_every_place_looked_in() {
    let dir = tempfile::tempdir().unwrap();
    let name = "libshampoo_no_such_library.so.7";
    let err = probe::probe_library(name, &[dir.path().to_path_buf()], true).unwrap_err();
    let Error::BackendUnavailable(msg) = &err else {
        panic!("unexpected error {err:?}");
    };
    let expected_start = format!(
        "CUDA library {name} not found; looked in: {} (no such file); the dynamic loader's \
         search path ({name}: cannot open shared object file: No such file or directory)",
        dir.path().join(name).display()
    );
    assert!(msg.starts_with(&expected_start), "{msg}");
    assert!(
        msg.ends_with("Set SHAMPOO_CUDA_LIB_DIRS or LD_LIBRARY_PATH to the directory that holds it (for PyTorch's wheels: site-packages/nvidia/cu13/lib)"),
        "{msg}"
    );
    // Without the loader path, only the directories are named.
    let err = probe::probe_library(name, &[], false).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "backend unavailable: CUDA library {name} not found; looked in: nowhere."
        )),
        "{err}"
    );
}

#[test]
fn an_unversioned_library_cudarc_would_load_first_is_refused_by_path() {
    // cudarc asks for libcublas.so (and other spellings) before
    // libcublas.so.13; libcusolver.so.13 before CUDA 13's libcusolver.so.12.
    let before = probe::names_tried_before("libcublas.so.13");
    assert_eq!(before[0], "libcublas.so");
    assert!(!before.contains(&"libcublas.so.13".to_string()));
    assert!(
        probe::names_tried_before("libcusolver.so.12").contains(&"libcusolver.so.13".to_string())
    );

    let ours = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let name = "libcublas.so.13";
    std::fs::write(ours.path().join(name), b"").unwrap();
    let found = Found::Dir(ours.path().to_path_buf());
    let search = vec![other.path().to_path_buf(), ours.path().to_path_buf()];
    // Nothing else on the loader's path: fine.
    probe::check_not_shadowed(name, &found, &search).unwrap();
    // Another toolkit's development link, earlier on the path: refused.
    let stray = other.path().join("libcublas.so");
    std::fs::write(&stray, b"").unwrap();
    let err = probe::check_not_shadowed(name, &found, &search)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "backend unavailable: cudarc would load {} (it asks for libcublas.so before libcublas.so.13) instead of the CUDA 13 library {}; that file is probably another CUDA toolkit's. Take {} off LD_LIBRARY_PATH (or out of the loader's configuration) for this program",
            stray.display(),
            ours.path().join(name).display(),
            other.path().display()
        )
    );
    // A link to the probed library itself is the same file: fine.
    std::fs::remove_file(&stray).unwrap();
    std::os::unix::fs::symlink(ours.path().join(name), &stray).unwrap();
    probe::check_not_shadowed(name, &found, &search).unwrap();
}

#[test]
fn a_library_in_a_listed_directory_is_found_there() {
    if !nvrtc_available() {
        return;
    }
    // NVRTC was found; look for it again in the directories of the
    // environment, which scripts/env.sh sets to PyTorch's CUDA libraries.
    let dirs = probe::lib_dirs_from_env();
    let Some(dir) = dirs.iter().find(|d| d.join("libnvrtc.so.13").exists()) else {
        println!("skipping: no directory of SHAMPOO_CUDA_LIB_DIRS holds libnvrtc.so.13");
        return;
    };
    // A fresh name (a symlink) so that the process-wide cache is bypassed.
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("libnvrtc_shampoo_probe.so");
    std::os::unix::fs::symlink(dir.join("libnvrtc.so.13"), &link).unwrap();
    let found = probe::probe_library(
        "libnvrtc_shampoo_probe.so",
        &[tmp.path().to_path_buf()],
        false,
    )
    .unwrap();
    assert_eq!(found, Found::Dir(tmp.path().to_path_buf()));
}

#[test]
fn without_a_driver_or_gpu_the_backend_says_what_is_missing() {
    match CudaBackend::new(0) {
        Ok(be) => {
            println!("skipping: a CUDA device is present ({})", be.device_name());
        }
        Err(err) => {
            let msg = err.to_string();
            assert!(matches!(err, Error::BackendUnavailable(_)), "{err:?}");
            let driver_missing = format!(
                "backend unavailable: CUDA library {DRIVER_LIBRARY} not found; looked in: "
            );
            if probe::probe_library(DRIVER_LIBRARY, &probe::lib_dirs_from_env(), true).is_err() {
                assert!(msg.starts_with(&driver_missing), "{msg}");
                assert!(
                    msg.contains("the dynamic loader's search path (libcuda.so.1: cannot open"),
                    "{msg}"
                );
                assert!(
                    msg.ends_with(
                        ". It comes with the NVIDIA driver, which this machine lacks (no GPU, \
                         or no driver installed)"
                    ),
                    "{msg}"
                );
            } else {
                // A driver without a usable device (or a missing toolkit
                // library): the message names the device or the library.
                assert!(
                    msg.contains("device") || msg.contains("CUDA library"),
                    "{msg}"
                );
            }
        }
    }
}

#[test]
fn every_toolkit_library_is_found_where_nvrtc_is() {
    if !nvrtc_available() {
        return;
    }
    // PyTorch's CUDA 13 wheels bring all of them (scripts/env.sh); loading
    // them needs no GPU.
    for name in probe::TOOLKIT_LIBRARIES {
        if let Err(e) = probe::probe_library(name, &probe::lib_dirs_from_env(), true) {
            panic!("{e}");
        }
    }
}

/// Each entry point's PTX: `(name, body)`.
fn entries(ptx: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in ptx.lines() {
        if let Some(rest) = line.trim().strip_prefix(".visible .entry ") {
            out.push((
                rest.split('(').next().unwrap().trim().to_string(),
                String::new(),
            ));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[test]
fn no_kernel_keeps_arrays_in_local_memory_and_gathers_divide_in_32_bits() {
    if !nvrtc_available() {
        return;
    }
    let ptx = compile_all("sm_90").unwrap();
    let mut seen = 0;
    for (file, code) in ptx.iter() {
        for (name, body) in entries(code) {
            // Local memory: a per-thread array indexed at run time (or a
            // spill), slow on every GPU.
            assert!(!body.contains(".local"), "{file}: {name} uses local memory");
            if name.starts_with("gather_")
                || name.starts_with("scatter_")
                || name.starts_with("direction")
                || name.starts_with("swap_axes")
            {
                // The block geometry (and the direction's block index) is
                // computed with 32-bit divisions (the 64-bit path is only
                // for 2^32 elements or more).
                assert!(
                    body.contains("div.u32") || body.contains("rem.u32"),
                    "{file}: {name} has no 32-bit division path"
                );
                seen += 1;
            }
        }
    }
    assert_eq!(
        seen, 10,
        "gather, scatter, direction, direction_jobs and swap_axes for f32 and f64"
    );
}

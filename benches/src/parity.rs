//! `shampoo-bench parity`: replays reference cases and reports the largest
//! error of each.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;
use shampoo_core::backend::Backend;
use shampoo_core::reference::ReferenceCase;

/// Result of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Steps replayed.
    pub steps: usize,
    /// Largest `max|ours - ref| / max|ref|` over steps and tensors.
    pub max_error: f64,
    /// Step (1-based) and tensor where it occurred (`eval/<p>`: the
    /// evaluation view of iterate averaging).
    pub worst_at: (usize, String),
    /// Whether it is within the tolerance.
    pub pass: bool,
    /// Why the case could not be replayed (then `pass` is false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CaseResult {
    /// A case that could not be loaded or replayed.
    pub fn failed(path: &std::path::Path, reason: String) -> Self {
        CaseResult {
            name: path
                .file_stem()
                .map_or_else(|| "case".into(), |s| s.to_string_lossy().into_owned()),
            path: path.to_path_buf(),
            steps: 0,
            max_error: f64::NAN,
            worst_at: (0, String::new()),
            pass: false,
            error: Some(reason),
        }
    }
}

/// Replays one case file on a backend made by `backend`.
pub fn run_case<B: Backend>(
    path: &std::path::Path,
    tolerance: f64,
    backend: B,
) -> Result<CaseResult> {
    let case = ReferenceCase::load(path)?;
    let errors = case.replay(backend)?;
    let names = case.tensor_names();
    let mut worst = (0.0f64, 0usize, 0usize);
    for (k, step) in errors.iter().enumerate() {
        for (p, &e) in step.iter().enumerate() {
            if e > worst.0 || e.is_nan() {
                worst = (e, k, p);
            }
        }
    }
    Ok(CaseResult {
        name: case.name.clone(),
        path: path.to_path_buf(),
        steps: case.steps,
        max_error: worst.0,
        worst_at: (worst.1 + 1, names[worst.2].clone()),
        pass: worst.0 <= tolerance,
        error: None,
    })
}

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
    /// Step (1-based) and parameter where it occurred.
    pub worst_at: (usize, String),
    /// Whether it is within the tolerance.
    pub pass: bool,
}

/// Replays one case file on a backend made by `backend`.
pub fn run_case<B: Backend>(
    path: &std::path::Path,
    tolerance: f64,
    backend: B,
) -> Result<CaseResult> {
    let case = ReferenceCase::load(path)?;
    let errors = case.replay(backend)?;
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
        worst_at: (worst.1 + 1, case.params[worst.2].clone()),
        pass: worst.0 <= tolerance,
    })
}

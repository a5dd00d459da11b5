//! Shape sets: parameter shapes of real models, for timing the optimizer
//! alone on realistic work. The default file is embedded in the binary.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The shape sets shipped with the project (`benches/data/shape_sets.json`).
pub const DEFAULT_SHAPE_SETS: &str = include_str!("../data/shape_sets.json");

#[derive(Debug, Clone, Deserialize)]
struct Entry {
    name: String,
    shape: Vec<usize>,
}

/// One named tensor of a shape set.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Parameter name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// Reads shape set `set` from `file` (or the embedded default file).
pub fn load(set: &str, file: Option<&Path>) -> Result<Vec<Tensor>> {
    let text = match file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => DEFAULT_SHAPE_SETS.to_string(),
    };
    let sets: BTreeMap<String, Vec<Entry>> = serde_json::from_str(&text)
        .context("shape sets file: expected {\"set\": [{\"name\", \"shape\"}, ...]}")?;
    let Some(entries) = sets.get(set) else {
        bail!(
            "no shape set {set:?}; available: {}",
            sets.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    Ok(entries
        .iter()
        .map(|e| Tensor {
            name: e.name.clone(),
            shape: e.shape.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_sets_load() {
        for (set, n) in [
            ("cpu_small", 10),
            ("resnet18", 62),
            ("resnet50", 161),
            ("gpt2_small", 148),
        ] {
            assert_eq!(super::load(set, None).unwrap().len(), n, "{set}");
        }
        let e = super::load("vgg", None).unwrap_err().to_string();
        assert!(
            e.contains("available: cpu_small, gpt2_small, resnet18, resnet50"),
            "{e}"
        );
    }
}

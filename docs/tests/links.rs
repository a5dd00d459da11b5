//! The documents stand alone and say what the code does: every relative
//! link resolves inside the repository, nothing points at files outside it,
//! and the README's parity tolerances are the ones the code uses.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md, every page of docs/, and the reference data's README.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut docs = vec![
        root.join("README.md"),
        root.join("testdata/reference/README.md"),
    ];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path);
        }
    }
    docs.sort();
    docs
}

/// The targets of the Markdown links `[text](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_resolves_inside_the_repository() {
    let root = root().canonicalize().unwrap();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let file = target.split('#').next().unwrap();
            let path = doc.parent().unwrap().join(file);
            let resolved = path
                .canonicalize()
                .unwrap_or_else(|_| panic!("{}: link to {target} does not resolve", doc.display()));
            assert!(
                resolved.starts_with(&root),
                "{}: link to {target} leaves the repository",
                doc.display()
            );
        }
        for outside in ["../spec", "/work/shared", "../shared/"] {
            assert!(
                !text.contains(outside),
                "{} points outside the repository ({outside})",
                doc.display()
            );
        }
    }
}

/// The number in `source` right after `marker`, as written.
fn number_after(source: &str, marker: &str) -> String {
    let i = source
        .find(marker)
        .unwrap_or_else(|| panic!("`{marker}` not found"));
    source[i + marker.len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect()
}

#[test]
fn the_readme_states_both_parity_tolerances_as_the_code_has_them() {
    let root = root();
    let test =
        std::fs::read_to_string(root.join("shampoo-core/tests/reference_parity.rs")).unwrap();
    let asserted = number_after(&test, "assert!(*max < ");
    let bench = std::fs::read_to_string(root.join("benches/src/main.rs")).unwrap();
    let default = number_after(&bench, "#[arg(long, default_value_t = ");
    assert_eq!((asserted.as_str(), default.as_str()), ("1e-10", "1e-5"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = &readme[readme
        .find("## Parity with the published implementation")
        .unwrap()..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    assert!(
        section.contains(&format!("by default {default}")),
        "README does not state shampoo-bench's default tolerance {default}"
    );
    assert!(
        section.contains(&format!("asserts {asserted}")),
        "README does not state the test's tolerance {asserted}"
    );
}

//! `shampoo-bench parity` replays every case it is given, reports a case it
//! cannot run with the reason and goes on, and exits non-zero if any fails.

use std::path::PathBuf;
use std::process::Command;

fn case(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../testdata/reference/{name}.safetensors"))
}

fn parity(files: &[PathBuf]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shampoo-bench"))
        .arg("parity")
        .args(files)
        .args(["--threads", "1"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_bad_case_fails_with_its_reason_and_the_others_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("truncated.safetensors");
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let missing = dir.path().join("missing.safetensors");
    let (code, out) = parity(&[
        bad,
        case("schedule_free"),
        missing,
        case("sign_descent_lion"),
    ]);
    assert_eq!(code, 1, "{out}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name} in {out}"))
            .to_string()
    };
    assert!(line("truncated").contains("FAIL"), "{out}");
    assert!(
        line("missing").contains("FAIL") && line("missing").contains("No such file"),
        "{out}"
    );
    // The averaging case compares its eval/ tensors too (10 steps, lr_schedule).
    let sf = line("schedule_free");
    assert!(sf.contains(" ok ") && sf.contains(" 10 "), "{sf}");
    assert!(line("sign_descent_lion").contains(" ok "), "{out}");
    assert!(out.contains("2 of 4 cases within 1e-5"), "{out}");
}

#[test]
fn all_cases_within_tolerance_exit_zero() {
    let (code, out) = parity(&[case("gpa"), case("soap_qr")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 of 2 cases within 1e-5"), "{out}");
}

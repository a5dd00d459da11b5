//! Console prefixes, --log-dir files, --quiet, and whole-line output.

mod common;

use std::ffi::OsStr;

use common::{launcher, run};

const CHATTY: &str = r#"echo "out $RANK"; echo "err $RANK" >&2; printf "partial $RANK""#;

fn args<'a>(list: &'a [&'a OsStr]) -> impl Iterator<Item = &'a OsStr> {
    list.iter().copied()
}

#[test]
fn console_lines_carry_the_rank_prefix_on_the_right_stream() {
    let out = run(launcher(["--nproc-per-node", "2", "sh", "-c", CHATTY]));
    assert_eq!(out.code(), 0, "{out:#?}");
    for rank in 0..2 {
        assert!(out.stdout.contains(&format!("[rank{rank}]: out {rank}\n")));
        // The unterminated last line is flushed, with a newline added.
        assert!(
            out.stdout
                .contains(&format!("[rank{rank}]: partial {rank}\n"))
        );
        assert!(out.stderr.contains(&format!("[rank{rank}]: err {rank}\n")));
        assert!(!out.stdout.contains(&format!("err {rank}")));
        assert!(!out.stderr.contains(&format!("out {rank}")));
    }
}

#[test]
fn log_dir_gets_exact_per_rank_files() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs/nested");
    let out = run(launcher(args(&[
        "--nproc-per-node".as_ref(),
        "2".as_ref(),
        "--log-dir".as_ref(),
        logs.as_os_str(),
        "--tee".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        CHATTY.as_ref(),
    ])));
    assert_eq!(out.code(), 0, "{out:#?}");
    for rank in 0..2 {
        let rank_dir = logs.join(format!("attempt_0/rank_{rank}"));
        assert_eq!(
            std::fs::read_to_string(rank_dir.join("stdout.log")).unwrap(),
            format!("out {rank}\npartial {rank}"),
            "raw bytes, no prefix"
        );
        assert_eq!(
            std::fs::read_to_string(rank_dir.join("stderr.log")).unwrap(),
            format!("err {rank}\n")
        );
        // The console still shows everything, prefixed.
        assert!(out.stdout.contains(&format!("[rank{rank}]: out {rank}\n")));
    }
}

#[test]
fn quiet_keeps_rank_output_off_the_console_but_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(launcher(args(&[
        "--quiet".as_ref(),
        "--log-dir".as_ref(),
        dir.path().as_os_str(),
        "sh".as_ref(),
        "-c".as_ref(),
        "echo visible only in the log; echo last words >&2; exit 2".as_ref(),
    ])));
    assert_eq!(out.code(), 2, "{out:#?}");
    assert!(!out.stdout.contains("visible only"), "{}", out.stdout);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("attempt_0/rank_0/stdout.log")).unwrap(),
        "visible only in the log\n"
    );
    // The failure report still shows the tail, and where the logs are.
    assert!(
        out.stderr.contains("[rank0]: last words\n"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("full output of rank 0: "),
        "{}",
        out.stderr
    );
}

#[test]
fn tail_lines_limits_the_report() {
    let out = run(launcher([
        "--tail-lines",
        "3",
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6; do echo line $i; done; exit 1",
    ]));
    assert_eq!(out.code(), 1);
    let report = out.stderr.split("shampoo-run: error: ").nth(1).unwrap();
    assert!(
        report.contains("last 3 line(s) of rank 0 output:"),
        "{report}"
    );
    assert!(
        report.contains("[rank0]: line 4\n[rank0]: line 5\n[rank0]: line 6\n"),
        "{report}"
    );
    assert!(!report.contains("line 3"), "{report}");
}

#[test]
fn lines_from_concurrent_ranks_never_interleave() {
    // Two ranks write many long lines as fast as they can; every console
    // line must be one whole line of one rank.
    let script = r#"
line=$(printf "%0200d" 0 | tr 0 "$RANK")
i=0
while [ $i -lt 2000 ]; do echo "$line"; i=$((i+1)); done
"#;
    let out = run(launcher(["--nproc-per-node", "2", "sh", "-c", script]));
    assert_eq!(out.code(), 0, "{out:#?}");
    let mut counts = [0usize; 2];
    for line in out.stdout.lines() {
        let (prefix, body) = line.split_at(9);
        let rank: usize = match prefix {
            "[rank0]: " => 0,
            "[rank1]: " => 1,
            _ => panic!("bad prefix in {line:?}"),
        };
        let digit = char::from(b'0' + rank as u8);
        assert!(
            body.len() == 200 && body.chars().all(|c| c == digit),
            "mixed line: {line:?}"
        );
        counts[rank] += 1;
    }
    assert_eq!(counts, [2000, 2000]);
}

#[test]
fn unwritable_log_dir_is_a_launcher_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let out = run(launcher(args(&[
        "--log-dir".as_ref(),
        file.as_os_str(),
        "true".as_ref(),
    ])));
    assert_eq!(out.code(), 125, "{out:#?}");
    assert!(
        out.stderr
            .contains("shampoo-run: error: cannot create log file or directory"),
        "{}",
        out.stderr
    );
}

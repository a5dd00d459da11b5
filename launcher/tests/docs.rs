//! `docs/launcher.md` stays in sync with the code: it quotes the current
//! `--help`, and mentions every flag, every environment variable and every
//! exit code. Run with `UPDATE_LAUNCHER_DOCS=1` to refresh the quoted help.

use std::path::PathBuf;

use clap::CommandFactory;
use shampoo_launcher::RawArgs;
use shampoo_launcher::env::VARIABLES;
use shampoo_launcher::error::{EXIT_LAUNCHER, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_USAGE};

const BEGIN: &str = "<!-- BEGIN GENERATED: shampoo-run --help (cargo test -p shampoo-launcher --test docs) -->\n```text\n";
const END: &str = "```\n<!-- END GENERATED -->";

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/launcher.md")
}

fn help_text() -> String {
    let help = RawArgs::command()
        .term_width(100)
        .render_long_help()
        .to_string();
    let mut out: String = help
        .lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect();
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

/// The document without the generated block, for "is it explained" checks.
fn prose(doc: &str) -> String {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) => format!("{}{}", &doc[..b], &doc[e..]),
        _ => doc.to_owned(),
    }
}

#[test]
fn docs_quote_the_current_help() {
    let path = doc_path();
    let doc = std::fs::read_to_string(&path).expect("docs/launcher.md exists");
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!("docs/launcher.md lacks the generated --help block markers");
    };
    let quoted = &doc[b + BEGIN.len()..e];
    let help = help_text();
    if quoted != help {
        if std::env::var_os("UPDATE_LAUNCHER_DOCS").is_some() {
            let updated = format!("{}{BEGIN}{help}{}", &doc[..b], &doc[e..]);
            std::fs::write(&path, updated).unwrap();
        } else {
            panic!(
                "docs/launcher.md quotes an outdated --help; rerun with UPDATE_LAUNCHER_DOCS=1.\n\
                 current --help:\n{help}"
            );
        }
    }
}

#[test]
fn docs_explain_every_flag() {
    let doc = prose(&std::fs::read_to_string(doc_path()).unwrap());
    for arg in RawArgs::command().get_arguments() {
        if let Some(long) = arg.get_long() {
            assert!(
                doc.contains(&format!("`--{long}")),
                "docs/launcher.md does not explain --{long}"
            );
        }
    }
}

#[test]
fn docs_list_every_environment_variable_and_exit_code() {
    let doc = prose(&std::fs::read_to_string(doc_path()).unwrap());
    for (name, _, _) in VARIABLES {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/launcher.md does not list {name}"
        );
    }
    for code in [
        EXIT_USAGE,
        EXIT_LAUNCHER,
        EXIT_NOT_EXECUTABLE,
        EXIT_NOT_FOUND,
        130,
        143,
    ] {
        assert!(
            doc.contains(&format!("| {code} ")),
            "docs/launcher.md exit-code table lacks {code}"
        );
    }
}

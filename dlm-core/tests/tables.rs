//! The decision tables that depend only on modes, checked against text
//! fixtures in `testdata/` (raft-rs's data-driven style: a command, `----`,
//! the expected output up to a blank line).

use std::fmt::Write as _;

use dlm_core::{ALL_MODES, LvbAction, Mode};

/// Renders a 6×6 table with a header row and one row per `rows` entry.
fn table(rows: &[(String, Option<Mode>)], cell: impl Fn(Option<Mode>, Mode) -> String) -> String {
    let mut out = String::from("  ");
    for to in ALL_MODES {
        write!(out, " {to}").expect("write to string");
    }
    out.push('\n');
    for (label, from) in rows {
        out.push_str(label);
        for to in ALL_MODES {
            write!(out, " {:>2}", cell(*from, to)).expect("write to string");
        }
        out.push('\n');
    }
    out
}

fn mode_rows() -> Vec<(String, Option<Mode>)> {
    ALL_MODES.iter().map(|m| (m.to_string(), Some(*m))).collect()
}

fn bit(value: bool) -> String {
    if value { "1" } else { "0" }.to_string()
}

fn render(command: &str) -> String {
    match command {
        "compat" => table(&mode_rows(), |from, to| bit(from.expect("mode row").compatible(to))),
        "quecvt" => table(&mode_rows(), |from, to| bit(from.expect("mode row").quecvt_allowed(to))),
        "lvb" => {
            let mut rows = vec![("--".to_string(), None)];
            rows.extend(mode_rows());
            table(&rows, |from, to| {
                match Mode::lvb_action(from, to) {
                    LvbAction::Read => "R",
                    LvbAction::Write => "W",
                    LvbAction::None => ".",
                }
                .to_string()
            })
        }
        "unlock-writes" => ALL_MODES.iter().map(|m| format!("{m} {}\n", bit(m.unlock_writes_lvb()))).collect(),
        other => panic!("unknown table command {other:?}"),
    }
}

/// Runs every `command / ---- / expected` block of a fixture file.
fn run_fixture(file: &str) {
    let path = format!("{}/testdata/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut lines = text.lines().peekable();
    let mut blocks = 0;
    while let Some(line) = lines.next() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let command = line.trim();
        assert_eq!(lines.next(), Some("----"), "{path}: `{command}` must be followed by ----");
        let mut expected = String::new();
        while let Some(line) = lines.next_if(|l| !l.trim().is_empty()) {
            expected.push_str(line);
            expected.push('\n');
        }
        assert_eq!(render(command), expected, "{path}: table `{command}` differs from the engine");
        blocks += 1;
    }
    assert!(blocks > 0, "{path}: no table found");
}

#[test]
fn compatibility_matrix_matches_fixture() {
    run_fixture("compat.txt");
}

#[test]
fn lvb_direction_table_matches_fixture() {
    run_fixture("lvb.txt");
}

#[test]
fn quecvt_pairs_match_fixture() {
    run_fixture("quecvt.txt");
}

//! Checks the crate's layering from its sources: each top-level module
//! imports (names `crate::…`) only modules listed before it in [`LAYERS`],
//! which the crate docs' table follows; and no source file is over
//! [`FILE_LINES_MAX`] lines unless its first comment says why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The top-level modules from the bottom up: a module may import only the
/// modules before it.
const LAYERS: &[&str] = &[
    "clock",
    "lease",
    "bounds",
    "access",
    "pki",
    "generation",
    "resident",
    "spin",
    "psi",
    "telemetry",
    "config",
    "metrics",
    "ebpf",
    "peer_view",
    "command",
    "driver",
    "transport",
    "membership",
    "server",
];

/// The wire, re-exported from `dlm-proto` at the crate root: below every
/// module (it imports nothing of the agent), with no source file here.
const WIRE: &[&str] = &["proto", "codes", "convert", "framing"];

/// Longer files do more than one job: split them.
const FILE_LINES_MAX: usize = 600;

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None`: the crate
/// root, or the binary's `main.rs` and `cli/`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "cli" | "layering")).then(|| name.to_string())
}

/// The top-level modules a file names as `crate::<module>`, comments left
/// out; `use crate::{a, b::{c, d}}` names `a` and `b`, over several lines too.
fn imports(text: &str) -> Vec<String> {
    named_after(text, "crate::")
}

/// The first segments of the paths a file names after `prefix` (as
/// [`imports`] reads them).
fn named_after(text: &str, prefix: &str) -> Vec<String> {
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
    let mut found = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find(prefix) {
        rest = &rest[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The items at brace depth 0, up to the matching brace.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.extend(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            found.extend(first_segment(&item));
        } else {
            found.extend(first_segment(rest));
        }
    }
    found
}

/// The first path segment of `path` (`codes` of `codes::RejectCode`), if any.
fn first_segment(path: &str) -> Option<String> {
    let name: String = path.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    (!name.is_empty() && name != "self").then_some(name)
}

/// Every module's imports of other top-level modules, from the sources.
fn graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else { continue };
        let text = std::fs::read_to_string(&file).expect("readable source");
        let edges = graph.entry(module.clone()).or_default();
        for import in imports(&text) {
            if import != module {
                edges.entry(import).or_insert_with(|| file.clone());
            }
        }
    }
    graph
}

#[test]
fn modules_import_only_modules_below_them() {
    let graph = graph();
    let rank = |module: &str| LAYERS.iter().position(|m| *m == module);
    for (module, imports) in &graph {
        let Some(own) = rank(module) else {
            panic!("module {module} is not in LAYERS: place it in the layering (and the crate docs' table)")
        };
        for (import, file) in imports.iter().filter(|(import, _)| !WIRE.contains(&import.as_str())) {
            let theirs =
                rank(import).unwrap_or_else(|| panic!("{} names crate::{import}, not in LAYERS", file.display()));
            assert!(
                theirs < own,
                "{} ({module}) imports crate::{import}, which is not below it in the layering",
                file.display()
            );
        }
    }
    // Every layer exists: the list does not name modules that are gone.
    for layer in LAYERS {
        assert!(graph.contains_key(*layer), "LAYERS names {layer}, which has no source file");
    }
}

/// The helpers every transport may use (`transport/mod.rs` says so): a
/// transport imports no other transport, only these, and they import only
/// each other.
const TRANSPORT_HELPERS: &[&str] = &["admission", "authority", "buffers", "preface", "refuse", "tls"];

#[test]
fn transports_import_only_the_shared_helpers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transport");
    let mut files = Vec::new();
    source_files(&dir, &mut files);
    assert!(files.len() > TRANSPORT_HELPERS.len(), "the transports are in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable source");
        let own = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let mut named = named_after(&text, "super::");
        named.extend(named_after(&text, "crate::transport::"));
        for module in named.iter().filter(|m| m.as_str() != own) {
            assert!(
                TRANSPORT_HELPERS.contains(&module.as_str()),
                "{} names transport::{module}: a transport imports only the shared helpers {TRANSPORT_HELPERS:?}",
                file.display()
            );
        }
    }
}

#[test]
fn source_files_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable source");
        let lines = text.lines().count();
        let first_comment = text.lines().next().unwrap_or("");
        assert!(
            lines <= FILE_LINES_MAX || first_comment.contains("longer than"),
            "{} has {lines} lines: split it, or say in its first comment why it is longer than {FILE_LINES_MAX}",
            file.display()
        );
    }
}

#[test]
fn imports_are_read_from_use_lines_and_paths() {
    let text = "use crate::codes::RejectCode;\nuse crate::{bounds, config::Config};\n// crate::server\n\
                let x = crate::telemetry::LOCK_TARGET;\nuse crate::{\n    ebpf::AttributionMaps,\n    \
                metrics::{ATTRIBUTION_STATES, Metrics},\n    proto,\n};";
    assert_eq!(imports(text), vec!["codes", "bounds", "config", "telemetry", "ebpf", "metrics", "proto"]);
}

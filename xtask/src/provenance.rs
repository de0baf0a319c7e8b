//! The set-up guard: every library the workspace links and every program
//! its tests start must come from a Debian package that the set-up installs
//! (or pulls in as a dependency) or that the machine image ships.
//!
//! Why: CI runs on a developer's machine, where a package installed by hand
//! makes the build and the tests pass; a new machine then fails at the first
//! link (it happened: `-lcfg -lcmap -lvotequorum`, whose `-dev` packages the
//! set-up never named). The guard looks at what the build really uses —
//! the `-l` flags the build scripts ask for, the `NEEDED` entries of the
//! binaries built, the programs the test sources name — finds the package
//! that provides each (`dpkg -S`), and fails naming it unless the set-up or
//! the image accounts for it. On a machine where the file is missing
//! altogether, it names the package that would provide it (`apt-cache`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The packages the machine image ships, one `apt<TAB>name<TAB>version`
/// line each (the image's own record; other lines are pip and npm).
const IMAGE_LIST: &str = "/usr/share/package-lists/installed-rust.txt";

/// Where the sources that start programs live (tests, benchmarks, xtask).
const PROGRAM_SOURCES: &[&str] = &["tests", "dlm-agent/benches", "dlm-agent/tests", "xtask/src"];

/// What the build and the tests may use: packages and tools accounted for.
pub(crate) struct Accounted {
    /// The set-up's Debian packages and everything they depend on.
    setup: BTreeSet<String>,
    /// The image's packages, when its record is on the machine.
    image: Option<BTreeSet<String>>,
}

impl Accounted {
    pub(crate) fn read() -> Result<Accounted, String> {
        let named: Vec<&str> = crate::setup::PACKAGES.iter().map(|(p, _)| *p).collect();
        let image = std::fs::read_to_string(IMAGE_LIST).ok().map(|text| {
            text.lines()
                .filter_map(|line| line.strip_prefix("apt\t"))
                .filter_map(|rest| rest.split('\t').next())
                .map(|name| strip_arch(name).to_string())
                .collect()
        });
        Ok(Accounted { setup: dependency_closure(&named)?, image })
    }

    fn covers(&self, package: &str) -> bool {
        self.setup.contains(package) || self.image.as_ref().is_some_and(|image| image.contains(package))
    }
}

/// `names` and every installed package they depend on, recursively.
fn dependency_closure(names: &[&str]) -> Result<BTreeSet<String>, String> {
    let mut all: BTreeSet<String> = names.iter().map(|n| (*n).to_string()).collect();
    let output = Command::new("apt-cache")
        .args(["depends", "--recurse", "--installed", "--no-recommends", "--no-suggests", "--no-conflicts"])
        .args(["--no-breaks", "--no-replaces", "--no-enhances"])
        .args(names)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run apt-cache: {e}"))?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = match line.trim_start().strip_prefix("|") {
            Some(rest) => rest.trim_start(),
            None => line.trim_start(),
        };
        let name = name.strip_prefix("PreDepends: ").or_else(|| name.strip_prefix("Depends: ")).unwrap_or(name);
        // `<virtual>` names are provided by a real package listed elsewhere.
        if !name.starts_with('<') && !name.contains(' ') && !name.is_empty() {
            all.insert(strip_arch(name).to_string());
        }
    }
    Ok(all)
}

fn strip_arch(name: &str) -> &str {
    name.split(':').next().unwrap_or(name)
}

/// What the guard found wrong, one line each, and what it checked.
#[derive(Default)]
struct Report {
    problems: Vec<String>,
    checked: Vec<String>,
}

impl Report {
    /// Prints what was checked and fails with every problem found.
    fn finish(self, what: &str) -> Result<(), String> {
        for line in &self.checked {
            eprintln!("xtask: provenance: {line}");
        }
        if self.problems.is_empty() {
            eprintln!("xtask: provenance: {what}: every one comes from the set-up or the image");
            return Ok(());
        }
        let mut text = format!("the set-up does not account for what the {what} need:\n");
        for problem in &self.problems {
            text.push_str(&format!("  - {problem}\n"));
        }
        text.push_str("Add each package to PACKAGES in xtask/src/setup.rs (and to the README's list).");
        Err(text)
    }
}

/// The messages of a cargo command run with `--message-format=json`;
/// compiler diagnostics are printed as cargo would print them.
pub(crate) fn cargo_messages(args: &[&str]) -> Result<Vec<Value>, String> {
    use std::io::BufRead;
    eprintln!("xtask: $ cargo {}", args.join(" "));
    let mut child =
        crate::cargo().args(args).stdout(Stdio::piped()).spawn().map_err(|e| format!("cannot run cargo: {e}"))?;
    let mut messages = Vec::new();
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading cargo's output: {e}"))?;
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            // Not a cargo message: a build script's own output.
            println!("{line}");
            continue;
        };
        if message["reason"] == "compiler-message"
            && let Some(rendered) = message["message"]["rendered"].as_str()
        {
            eprint!("{rendered}");
        }
        messages.push(message);
    }
    let status = child.wait().map_err(|e| format!("waiting for cargo: {e}"))?;
    if status.success() { Ok(messages) } else { Err(format!("`cargo {}` failed ({status})", args.join(" "))) }
}

/// The guard before anything links: the `-l` flags of the build scripts in
/// `messages` and the programs the test sources name.
pub(crate) fn guard_sources(messages: &[Value], accounted: &Accounted) -> Result<(), String> {
    let mut report = Report::default();
    check_links(messages, accounted, &mut report);
    check_programs(accounted, &mut report)?;
    report.finish("build's libraries and the tests' programs")
}

/// Builds the tests (the test command's profile) and checks the shared
/// libraries their binaries and the agent's need.
pub(crate) fn guard_binaries(accounted: &Accounted) -> Result<(), String> {
    let built = cargo_messages(&[
        "test",
        "--workspace",
        "--all-targets",
        "--locked",
        "--profile",
        "ci-test",
        "--no-run",
        "--message-format=json",
    ])?;
    let mut report = Report::default();
    check_binaries(&built, accounted, &mut report)?;
    report.finish("binaries' shared libraries")
}

/// One `-l` flag a build script asked for.
struct Linked {
    name: String,
    static_only: bool,
    /// The package whose build script asked for it.
    by: String,
    /// Directories the build script added to the search (`-L`).
    search: Vec<PathBuf>,
}

fn linked_libraries(messages: &[Value]) -> Vec<Linked> {
    let mut linked = Vec::new();
    for message in messages.iter().filter(|m| m["reason"] == "build-script-executed") {
        let by = message["package_id"].as_str().unwrap_or("?");
        // `path+file:///…#name@1.0` or `registry+…#name@1.0`: keep `name@1.0`.
        let by = by.rsplit('#').next().unwrap_or(by).to_string();
        let search: Vec<PathBuf> = message["linked_paths"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|p| PathBuf::from(p.split_once('=').map_or(p, |(_, path)| path)))
            .collect();
        for flag in message["linked_libs"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            // `name`, `kind=name`, `kind:+modifier=name`, `name:rename`.
            let (kind, name) = flag.split_once('=').unwrap_or(("dylib", flag));
            let kind = kind.split(':').next().unwrap_or(kind);
            if kind == "framework" {
                continue;
            }
            let name = name.split(':').next().unwrap_or(name).to_string();
            linked.push(Linked { name, static_only: kind == "static", by: by.clone(), search: search.clone() });
        }
    }
    linked
}

/// Checks the `-l` flags of the build scripts in `messages` (of a `cargo
/// check`, `clippy` or `build` with `--message-format=json`): run before
/// the build links, so a missing library is named rather than failing in
/// the linker.
fn check_links(messages: &[Value], accounted: &Accounted, report: &mut Report) {
    let target = std::fs::canonicalize("target").unwrap_or_else(|_| PathBuf::from("target"));
    let mut seen = BTreeSet::new();
    let mut owners = Owners::default();
    for lib in linked_libraries(messages) {
        if !seen.insert(lib.name.clone()) {
            continue;
        }
        let mut files = vec![format!("lib{}.a", lib.name)];
        if !lib.static_only {
            files.insert(0, format!("lib{}.so", lib.name));
        }
        let found = files.iter().find_map(|file| {
            lib.search.iter().map(|dir| dir.join(file)).find(|p| p.exists()).or_else(|| compiler_finds(file))
        });
        let Some(path) = found.map(|p| tidy(&p)) else {
            report.problems.push(format!(
                "-l{} (asked for by {}): no {} where the linker looks{}",
                lib.name,
                lib.by,
                files.join(" or "),
                dev_package_hint(&lib.name).map(|p| format!("; Debian's {p} provides it")).unwrap_or_default()
            ));
            continue;
        };
        // A library the build made itself (in target/) needs no package.
        if path.starts_with(&target) {
            continue;
        }
        owners.ask(&path);
        report.checked.push(format!("-l{} → {}", lib.name, path.display()));
    }
    owners.judge(accounted, report, "library");
}

/// `path` with its directory resolved (no `..`), the file itself kept.
fn tidy(path: &Path) -> PathBuf {
    match (path.parent().map(std::fs::canonicalize), path.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// The full path of `file` if the C compiler's linker finds it.
fn compiler_finds(file: &str) -> Option<PathBuf> {
    let output = Command::new("cc").arg(format!("-print-file-name={file}")).output().ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    // It echoes the bare name when it finds nothing.
    (path.is_absolute() && path.exists()).then_some(path)
}

/// The `-dev` package that would provide `lib<name>.so` on this machine,
/// found from the runtime library's package (`libcfg.so.7` in libcfg7) and
/// the packages that depend on it, or by the usual name.
fn dev_package_hint(name: &str) -> Option<String> {
    let runtime = loader_paths().into_iter().find(|(soname, _)| soname.starts_with(&format!("lib{name}.so.")));
    if let Some((_, path)) = runtime
        && let Some(package) = package_of(&path)
    {
        let output = Command::new("apt-cache").args(["rdepends", &package]).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let dev = text
            .lines()
            .map(|l| l.trim().trim_start_matches('|'))
            .find(|l| l.ends_with("-dev") && l.starts_with(&format!("lib{name}")));
        if let Some(dev) = dev {
            return Some(dev.to_string());
        }
    }
    let guess = format!("lib{name}-dev");
    let known = Command::new("apt-cache").args(["show", "--no-all-versions", &guess]).output();
    known.is_ok_and(|out| out.status.success() && !out.stdout.is_empty()).then_some(guess)
}

/// The dynamic loader's cache: soname → path, for this machine's ABI.
fn loader_paths() -> Vec<(String, PathBuf)> {
    let Ok(output) = Command::new("ldconfig").arg("-p").output() else { return Vec::new() };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("x86-64") || !cfg!(target_arch = "x86_64"))
        .filter_map(|line| {
            let (left, path) = line.trim().split_once(" => ")?;
            Some((left.split_whitespace().next()?.to_string(), PathBuf::from(path)))
        })
        .collect()
}

/// The package that installed `path`, if any.
fn package_of(path: &Path) -> Option<String> {
    let mut owners = Owners::default();
    owners.ask(path);
    owners.resolve().remove(path).flatten()
}

/// Files whose Debian package is asked of `dpkg -S` in one call.
#[derive(Default)]
struct Owners {
    paths: BTreeSet<PathBuf>,
}

impl Owners {
    fn ask(&mut self, path: &Path) {
        self.paths.insert(path.to_path_buf());
    }

    /// Each file's package, or `None` when no package installed it. dpkg
    /// records a file under the path its package gives, so `/lib/x` and
    /// `/usr/lib/x` (merged /usr) and the target of a symbolic link are
    /// asked too.
    fn resolve(&self) -> BTreeMap<PathBuf, Option<String>> {
        let spellings = |path: &PathBuf| {
            // The file itself first: a `-dev` package's `libx.so` is a link
            // to the runtime package's `libx.so.7`, and it is the link that
            // the linker needs. Its directory may be spelled with `..`.
            let mut all = vec![path.clone()];
            if let (Some(dir), Some(name)) = (path.parent(), path.file_name())
                && let Ok(dir) = std::fs::canonicalize(dir)
            {
                all.push(dir.join(name));
            }
            if let Ok(real) = std::fs::canonicalize(path) {
                all.push(real);
            }
            all.into_iter()
                .flat_map(|p| {
                    let text = p.display().to_string();
                    let other = match text.strip_prefix("/usr/") {
                        Some(rest) => format!("/{rest}"),
                        None => format!("/usr{text}"),
                    };
                    [p, PathBuf::from(other)]
                })
                .collect::<Vec<_>>()
        };
        let asked: BTreeSet<PathBuf> = self.paths.iter().flat_map(spellings).collect();
        let mut owner_of: BTreeMap<PathBuf, String> = BTreeMap::new();
        if !asked.is_empty()
            && let Ok(output) = Command::new("dpkg").arg("-S").args(&asked).stderr(Stdio::null()).output()
        {
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                // `package[:arch][, other]: /path`; diversions are other lines.
                let Some((packages, path)) = line.split_once(": ") else { continue };
                if packages.starts_with("diversion ") {
                    continue;
                }
                let first = packages.split(", ").next().unwrap_or(packages);
                owner_of.insert(PathBuf::from(path), strip_arch(first).to_string());
            }
        }
        self.paths.iter().map(|p| (p.clone(), spellings(p).iter().find_map(|s| owner_of.get(s).cloned()))).collect()
    }

    /// Adds a problem for every file whose package the set-up and the image
    /// do not account for.
    fn judge(&self, accounted: &Accounted, report: &mut Report, kind: &str) {
        for (path, package) in self.resolve() {
            match package {
                Some(package) if accounted.covers(&package) => {}
                Some(package) => report.problems.push(format!(
                    "{kind} {} comes from the Debian package {package}, which the set-up does not install{}",
                    path.display(),
                    if accounted.image.is_some() { " and the image does not ship" } else { "" }
                )),
                None if kind == "library" => {
                    report.problems.push(format!("{kind} {} belongs to no Debian package", path.display()));
                }
                None => report.checked.push(format!("{kind} {} belongs to no Debian package", path.display())),
            }
        }
    }
}

/// Checks the `NEEDED` entries of every executable in `messages` (of a
/// `cargo build` or `test --no-run` with `--message-format=json`).
fn check_binaries(messages: &[Value], accounted: &Accounted, report: &mut Report) -> Result<(), String> {
    let loader: BTreeMap<String, PathBuf> = loader_paths().into_iter().rev().collect();
    let mut needed: BTreeMap<String, usize> = BTreeMap::new();
    let executables: BTreeSet<&str> = messages
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| m["executable"].as_str())
        .collect();
    for executable in &executables {
        for soname in needed_of(Path::new(executable))? {
            *needed.entry(soname).or_default() += 1;
        }
    }
    let mut owners = Owners::default();
    for soname in needed.keys() {
        match loader.get(soname) {
            Some(path) => owners.ask(path),
            None => report.problems.push(format!("{soname}, needed by the binaries, is not in the loader's cache")),
        }
    }
    report.checked.push(format!(
        "{} binaries need {} shared libraries: {}",
        executables.len(),
        needed.len(),
        needed.keys().cloned().collect::<Vec<_>>().join(" ")
    ));
    owners.judge(accounted, report, "library");
    Ok(())
}

/// The shared libraries an ELF file names as `NEEDED`.
fn needed_of(file: &Path) -> Result<Vec<String>, String> {
    let output = Command::new("readelf")
        .args(["--dynamic", "--wide"])
        .arg(file)
        .output()
        .map_err(|e| format!("cannot run readelf: {e}"))?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| Some(line.split_once('[')?.1.split_once(']')?.0.to_string()))
        .collect())
}

/// Checks every program the test, benchmark and xtask sources name (a
/// string literal that is the name of a program on the PATH).
fn check_programs(accounted: &Accounted, report: &mut Report) -> Result<(), String> {
    let mut names = BTreeSet::new();
    for dir in PROGRAM_SOURCES {
        for file in rust_files(Path::new(dir)) {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            names.extend(string_literals(&text).into_iter().filter(|s| looks_like_program(s)));
        }
    }
    let tools = cargo_tools();
    let mut owners = Owners::default();
    let mut found = Vec::new();
    for name in &names {
        let Some(path) = on_path(name) else { continue };
        found.push(name.clone());
        // Rustup's proxies and the tools the set-up installs with cargo.
        if path.parent().is_some_and(|dir| dir.ends_with(".cargo/bin")) {
            if !tools.contains(name.as_str()) && !is_rustup_proxy(&path) {
                report.problems.push(format!("program {} is not installed by the set-up", path.display()));
            }
            continue;
        }
        owners.ask(&path);
    }
    report.checked.push(format!("the test sources start {} programs: {}", found.len(), found.join(" ")));
    owners.judge(accounted, report, "program");
    Ok(())
}

/// The programs the set-up installs with `cargo install`.
fn cargo_tools() -> BTreeSet<&'static str> {
    crate::setup::CARGO_TOOLS.iter().map(|(name, ..)| *name).collect()
}

fn is_rustup_proxy(path: &Path) -> bool {
    let rustup = path.with_file_name("rustup");
    match (std::fs::read(path), std::fs::read(&rustup)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn looks_like_program(text: &str) -> bool {
    (2..=40).contains(&text.len())
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.+".contains(c))
}

fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return files };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            // Dependencies and fuzz inputs are not ours to scan.
            if !matches!(name.to_str(), Some("node_modules" | "corpus" | "target" | "artifacts")) {
                files.extend(rust_files(&path));
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The contents of the ordinary string literals of Rust source text,
/// skipping comments, raw strings and character literals.
fn string_literals(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut literals = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'\'' => {
                // '"' and '\"': a character, not the start of a string.
                if bytes.get(i + 1) == Some(&b'\\') {
                    i += 4;
                } else if bytes.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            b'r' if matches!(bytes.get(i + 1), Some(b'#' | b'"')) && (i == 0 || !is_ident(bytes[i - 1])) => {
                let hashes = bytes[i + 1..].iter().take_while(|&&b| b == b'#').count();
                let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
                i += 2 + hashes;
                while i < bytes.len() && !bytes[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if let Some(literal) = text.get(start..i.min(text.len())) {
                    literals.push(literal.to_string());
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    literals
}

fn is_ident(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_literals_skip_comments_raw_strings_and_characters() {
        let text = "let a = \"corosync\"; // \"commented\" \"\nlet q = '\"'; let r = r#\"raw \"x\" \"#; \
                    /* \"block\" */ f(\"redis-server\", \"with \\\" quote\");";
        assert_eq!(string_literals(text), ["corosync", "redis-server", "with \\\" quote"]);
    }

    #[test]
    fn a_program_name_is_one_word() {
        assert!(looks_like_program("corosync-quorumtool"));
        assert!(looks_like_program("python3"));
        assert!(!looks_like_program("two words"));
        assert!(!looks_like_program("/usr/bin/x"));
        assert!(!looks_like_program("X"));
    }

    #[test]
    fn linked_libraries_are_read_from_build_script_messages() {
        let message: Value = serde_json::from_str(
            r#"{"reason":"build-script-executed","package_id":"registry+https://github.com/rust-lang/crates.io-index#rust-corosync@0.1.4",
                "linked_libs":["cpg","static=ring_core","dylib:+verbatim=cfg","framework=X"],"linked_paths":["native=/opt/lib"]}"#,
        )
        .expect("json");
        let linked = linked_libraries(&[message]);
        let names: Vec<(&str, bool)> = linked.iter().map(|l| (l.name.as_str(), l.static_only)).collect();
        assert_eq!(names, [("cpg", false), ("ring_core", true), ("cfg", false)]);
        assert_eq!(linked[0].by, "rust-corosync@0.1.4");
        assert_eq!(linked[0].search, [PathBuf::from("/opt/lib")]);
    }
}

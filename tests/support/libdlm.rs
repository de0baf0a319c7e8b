//! dlm's libdlm for the programs of `tests/libdlm/`: the shared libraries
//! under their sonames, and C programs built as libdlm's users build them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{Scratch, under_ci};

/// Whether the header and a C compiler are here (else skip, or fail under CI).
pub fn available() -> bool {
    let present = Path::new("/usr/include/libdlm.h").exists()
        && Command::new("cc").arg("--version").output().is_ok_and(|out| out.status.success());
    if !present {
        assert!(!under_ci(), "libdlm-dev and cc are required under CI=true (cargo xtask setup installs them)");
        eprintln!("skipping: libdlm-dev (libdlm.h) or cc is not installed (cargo xtask setup installs them)");
    }
    present
}

/// A directory holding dlm's two libraries under their sonames, as cargo
/// built them for this test's profile (`cargo xtask test` builds them
/// first; no test depends on a shared library, so `cargo test` does not).
/// It lasts as long as the test process (the next run removes it).
pub fn library_dir() -> &'static Path {
    static DIR: OnceLock<Scratch> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").to_path_buf();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let build = format!(
            "build them first: `cargo build -p dlm-libdlm-threaded -p dlm-libdlm-lite --profile {profile}` \
             (`cargo xtask test` does)"
        );
        let sources = ["Cargo.lock", "libdlm", "dlm-client/src", "dlm-proto/src", "dlm-proto/proto", "dlm-core/src"];
        let newest = crate::newest_source(&sources);
        let dir = Scratch::new("libdlm");
        for (file, soname) in [("libdlm.so", "libdlm.so.3"), ("libdlm_lt.so", "libdlm_lt.so.3")] {
            let built = profile_dir.join(file);
            let Some(when) = std::fs::metadata(&built).and_then(|m| m.modified()).ok() else {
                panic!("dlm's {} is missing: {build}", built.display());
            };
            if let Some((source, _)) = newest.as_ref().filter(|(_, changed)| *changed > when) {
                panic!("dlm's {} is older than {}: {build}", built.display(), source.display());
            }
            let link = dir.join(soname);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&built, &link).expect("symlink");
        }
        dir
    })
}

/// Compiles `tests/libdlm/<name>.c` against Debian's header, linked with
/// `library` (`dlm` or `dlm_lt`) as Debian installs it, into a directory
/// that lasts as long as the test process (the next run removes it).
pub fn compile(name: &str, library: &str) -> PathBuf {
    static PROGRAMS: OnceLock<Scratch> = OnceLock::new();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("libdlm").join(format!("{name}.c"));
    let out = PROGRAMS.get_or_init(|| Scratch::new("libdlm-programs")).join(format!("{name}-{library}"));
    let compiled = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-O1", "-o"])
        .arg(&out)
        .arg(&source)
        .arg(format!("-l{library}"))
        .arg("-lpthread")
        .output()
        .expect("cc runs");
    assert!(compiled.status.success(), "{name}.c: {}", String::from_utf8_lossy(&compiled.stderr));
    let needed = Command::new("objdump").arg("-p").arg(&out).output().expect("objdump runs");
    let soname = format!("lib{library}.so.3");
    assert!(
        String::from_utf8_lossy(&needed.stdout).lines().any(|l| l.contains("NEEDED") && l.ends_with(&soname)),
        "{name} links {soname}, as a program built for libdlm does"
    );
    out
}

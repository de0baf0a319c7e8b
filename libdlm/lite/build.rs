//! The soname libdlm's users link against.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libdlm_lt.so.3");
}

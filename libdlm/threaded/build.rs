//! The soname libdlm's users link against.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libdlm.so.3");
}

//! The dlm eBPF programs: kernel lock contention, futex waits, off-CPU time
//! and memory-pressure stalls, aggregated in-kernel into per-CPU maps, and the
//! attribution of that time to processes that hold or wait for DLM locks.
//!
//! Built for `bpfel-unknown-none` by `aya-build` from `dlm-agent`'s build
//! script. On the host this target is an empty program, so workspace-wide
//! cargo commands still build.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

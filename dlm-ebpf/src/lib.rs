//! The dlm eBPF programs are the `dlm-ebpf` binary target (see `main.rs`);
//! this library target exists so `dlm-agent` can name the package as a build
//! dependency, which makes cargo rebuild the agent when the programs change.
#![no_std]

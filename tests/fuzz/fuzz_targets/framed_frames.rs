//! The framed-session protocol's reader: any bytes a local client sends on
//! the Unix socket, read frame by frame as the agent reads them, until the
//! first error. It must refuse, never panic or allocate past its bound.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One runtime for every input: reading from a slice never waits.
static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let runtime = RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"));
    runtime.block_on(async {
        let mut reader = data;
        let mut buffer = Vec::new();
        for _ in 0..64 {
            let frame =
                dlm_agent::framing::read_frame::<dlm_agent::proto::ClientMessage>(&mut reader, &mut buffer).await;
            if frame.is_err() {
                break;
            }
        }
    });
});

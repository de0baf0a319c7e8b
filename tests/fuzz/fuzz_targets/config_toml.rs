//! The configuration file: any text, parsed and validated as the agent
//! does at start. It must be taken or refused with a message, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = dlm_agent::config::Config::from_text(None, Some(text), &dlm_agent::config::Overrides::default());
});

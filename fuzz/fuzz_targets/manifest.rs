//! Any bytes as one manifest file (YAML and JSON): see `lb_agent::fuzzing::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| lb_agent::fuzzing::manifest(bytes));

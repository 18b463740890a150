//! Any bytes as object events through the model and the reconciler: see
//! `lb_agent::fuzzing::model`.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| lb_agent::fuzzing::model(bytes));

//! Istio policy compile and evaluation: any YAML either compiles or is refused, and a
//! compiled set decides every connection without panicking.
//!
//! The body is `ambit_agent::fuzzing::policy_compile`, which the stable smoke run
//! in `cargo test` calls too (`agent/src/fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ambit_agent::fuzzing::policy_compile(data));

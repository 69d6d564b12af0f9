//! SPIFFE ID parsing: never panics, and an accepted ID prints back to exactly the text it
//! came from (one spelling per identity) and parses again to the same value.
//!
//! The body is `ambit_agent::fuzzing::spiffe_id`, which the stable smoke run
//! in `cargo test` calls too (`agent/src/fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ambit_agent::fuzzing::spiffe_id(data));

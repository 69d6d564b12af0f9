//! The local-mode file parser: any text either parses into a state or is refused with an
//! error; it never panics.
//!
//! The body is `ambit_agent::fuzzing::config_parse`, which the stable smoke run
//! in `cargo test` calls too (`agent/src/fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ambit_agent::fuzzing::config_parse(data));

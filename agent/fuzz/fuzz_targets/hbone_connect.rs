//! The inbound HBONE request check with arbitrary method, authority and header bytes: it
//! never panics, accepts only a CONNECT to an `ip:port` within the header budget, and
//! refuses everything else with the status its reason calls for.
//!
//! The body is `ambit_agent::fuzzing::hbone_connect`, which the stable smoke run
//! in `cargo test` calls too (`agent/src/fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ambit_agent::fuzzing::hbone_connect(data));

//! The cgroup-path parser: never panics, and a UID it finds is always in the API server's
//! form (36 lowercase hex digits and dashes at 8, 13, 18, 23) and appears in the line.
//!
//! The body is `ambit_agent::fuzzing::cgroup_path`, which the stable smoke run
//! in `cargo test` calls too (`agent/src/fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ambit_agent::fuzzing::cgroup_path(data));

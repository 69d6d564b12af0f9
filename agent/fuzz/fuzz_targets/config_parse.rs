//! The local-mode file parser: any text either parses into a state or is refused with an
//! error; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for node in ["node1", "node2"] {
        if let Ok((state, _warnings)) = ambit_agent::config::parse(text, node) {
            // Rendering the accepted state must not panic either.
            let _ = format!("{state:?}");
        }
    }
});

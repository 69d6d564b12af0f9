//! SPIFFE ID parsing: never panics, and an accepted ID prints back to exactly the text it
//! came from (one spelling per identity) and parses again to the same value.
#![no_main]

use ambit_agent::identity::SpiffeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = text.parse::<SpiffeId>() else {
        return;
    };
    let shown = id.to_string();
    assert_eq!(shown, text, "an accepted ID must display as its input");
    let again: SpiffeId = shown.parse().expect("a displayed ID parses");
    assert_eq!(again, id);
});

//! The cgroup-path parser: never panics, and a UID it finds is always in the API server's
//! form (36 lowercase hex digits and dashes at 8, 13, 18, 23) and appears in the line.
#![no_main]

use ambit_agent::procscan::pod_uid_from_cgroup;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Some(uid) = pod_uid_from_cgroup(line) else {
        return;
    };
    let uid = uid.as_str();
    assert_eq!(uid.len(), 36, "{uid:?}");
    for (i, b) in uid.bytes().enumerate() {
        match i {
            8 | 13 | 18 | 23 => assert_eq!(b, b'-', "{uid:?}"),
            _ => assert!(b.is_ascii_digit() || (b'a'..=b'f').contains(&b), "{uid:?}"),
        }
    }
    // systemd writes the UID's dashes as '_': compare ignoring that and case.
    let normalise = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    assert!(normalise(line).contains(uid), "{uid:?} not in {line:?}");
});

//! `serialize_with` helpers for the config dump and the start-up log: durations in a unit a
//! person reads at a glance, paths as (lossy) strings, anything `Display` as its text.
//! serde's own `Duration` form (`{"secs":..,"nanos":..}`) is for machines, and its `Path`
//! form fails on a non-UTF-8 path, which would take the whole dump down with it.

use std::fmt::Display;
use std::path::Path;
use std::time::Duration;

use serde::Serializer;

/// `"500ms"` below a second or when not a whole number of seconds, else `"300s"`.
pub fn duration_text(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros())
    }
}

pub fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&duration_text(*d))
}

pub fn path<S: Serializer, P: AsRef<Path>>(p: &P, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.as_ref().to_string_lossy())
}

pub fn option_path<S: Serializer, P: AsRef<Path>>(p: &Option<P>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => path(p, s),
        None => s.serialize_none(),
    }
}

pub fn display<S: Serializer, T: Display>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_their_natural_unit() {
        assert_eq!(duration_text(Duration::from_secs(86_400)), "86400s");
        assert_eq!(duration_text(Duration::from_millis(500)), "500ms");
        assert_eq!(duration_text(Duration::from_millis(4_321)), "4321ms");
        assert_eq!(duration_text(Duration::from_micros(1_500)), "1500us");
        assert_eq!(duration_text(Duration::ZERO), "0s");
    }
}

//! Starting over pins left by an earlier agent, possibly of another version (a DaemonSet
//! rolling a new image):
//!
//! - every pinned link ends up running the program this agent loaded, swapped in place
//!   (BPF_LINK_UPDATE) so that the hook never goes without a program: pods stay captured
//!   across the switch ([`link_program`]);
//! - pinned maps are reused only when their definition is the one this agent's object
//!   declares ([`check_pinned_maps`]).

use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::{Path, PathBuf};

use ambit_common::maps;
use aya::maps::MapInfo;
use aya::programs::links::{FdLink, PinnedLink};
use tracing::{info, warn};

use super::{CaptureError, EBPF_OBJECT, PINNED_MAPS, Result};

/// What attaching one program to its pinned link did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkOutcome {
    /// The hook runs this agent's program: no pin was there and a new link was attached
    /// and pinned, or the pinned link already ran it (a retry by the same agent).
    Attached { prog_id: u32 },
    /// The pinned link now runs this agent's program instead of the earlier one.
    Replaced { old_prog_id: u32, new_prog_id: u32 },
    /// Replacing failed: the link keeps the earlier agent's program, which still captures
    /// (fail closed), and the error says why.
    KeptOld { old_prog_id: u32, error: String },
}

/// Attaches `prog` (id `new_prog_id`) at the hook whose link is pinned at `pin`.
///
/// Without a pin, `attach` makes a link, which is pinned. With one, the link is kept and
/// `replace` swaps its program for `prog` in place (given the link and the id of the program
/// it runs now); a failed swap leaves the earlier program attached and is reported as
/// [`LinkOutcome::KeptOld`] (logged and counted by the caller), not as an error: the pod
/// stays captured, only by the older code.
pub(super) fn link_program<P>(
    pin: &Path,
    prog: &mut P,
    new_prog_id: u32,
    attach: impl FnOnce(&mut P) -> Result<FdLink>,
    replace: impl FnOnce(&mut P, FdLink, u32) -> Result<()>,
) -> Result<LinkOutcome> {
    let pin_err = |source: Box<dyn std::error::Error + Send + Sync>| CaptureError::Pin {
        path: pin.to_path_buf(),
        source,
    };
    if !pin.exists() {
        attach(prog)?.pin(pin).map_err(|e| pin_err(Box::new(e)))?;
        return Ok(LinkOutcome::Attached {
            prog_id: new_prog_id,
        });
    }
    let running = |link: &FdLink| link.info().map(|i| i.program_id());
    let link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| pin_err(Box::new(e)))?);
    let old_prog_id = running(&link).map_err(|e| pin_err(Box::new(e)))?;
    if old_prog_id == new_prog_id {
        return Ok(LinkOutcome::Attached {
            prog_id: new_prog_id,
        });
    }
    let outcome = match replace(prog, link, old_prog_id) {
        Ok(()) => {
            // Read back what the kernel runs now, rather than trusting the call.
            let link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| pin_err(Box::new(e)))?);
            match running(&link) {
                Ok(id) if id == new_prog_id => LinkOutcome::Replaced {
                    old_prog_id,
                    new_prog_id,
                },
                Ok(id) => LinkOutcome::KeptOld {
                    old_prog_id: id,
                    error: format!(
                        "after the update the link runs program {id}, not {new_prog_id}"
                    ),
                },
                Err(e) => LinkOutcome::KeptOld {
                    old_prog_id,
                    error: format!("reading the link back: {e}"),
                },
            }
        }
        Err(e) => LinkOutcome::KeptOld {
            old_prog_id,
            error: e.to_string(),
        },
    };
    match &outcome {
        LinkOutcome::Replaced {
            old_prog_id,
            new_prog_id,
        } => {
            info!(pin = %pin.display(), old_prog_id, new_prog_id, "pinned link switched to this agent's program")
        }
        LinkOutcome::KeptOld { old_prog_id, error } => tracing::error!(
            pin = %pin.display(),
            old_prog_id,
            %error,
            "pinned link keeps the earlier agent's program (still capturing): replacing it failed"
        ),
        LinkOutcome::Attached { .. } => {}
    }
    Ok(outcome)
}

/// The in-place swap for links aya 0.14 cannot update (cgroup sock_addr and sock_ops, netns
/// sk_lookup): opens the link from its pin and swaps `old_prog_id` for `new_prog`.
pub(super) fn update_pinned_link(
    pin: &Path,
    new_prog: BorrowedFd<'_>,
    old_prog_id: u32,
) -> Result<()> {
    let err = |source| CaptureError::LinkUpdate {
        pin: pin.to_path_buf(),
        source,
    };
    let link = crate::sys::bpf_obj_get(pin).map_err(err)?;
    let old_prog = crate::sys::bpf_prog_get_fd_by_id(old_prog_id).map_err(err)?;
    crate::sys::bpf_link_update(link.as_fd(), new_prog, old_prog.as_fd()).map_err(err)
}

/// The parts of a map definition that must agree for a pinned map to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDefinition {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapDefinition {
    /// What the loader will create for `map`: aya rounds a ring buffer's size up to a
    /// power-of-two number of pages and creates it with value size 0.
    fn of_object(map: &aya_obj::Map, page_size: u32) -> Self {
        let map_type = map.map_type();
        let ringbuf = map_type == aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32;
        let mut max_entries = map.max_entries();
        let mut value_size = map.value_size();
        if ringbuf {
            if max_entries != 0 {
                max_entries = page_size * max_entries.div_ceil(page_size).next_power_of_two();
            }
            value_size = 0;
        }
        Self {
            map_type,
            key_size: map.key_size(),
            value_size,
            max_entries,
            flags: map.map_flags(),
        }
    }

    fn of_pinned(info: &MapInfo) -> Self {
        Self {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }

    /// Each field where the pinned map differs from this (expected) definition, as
    /// "field: pinned X, expected Y"; empty when they agree.
    pub fn differences(&self, pinned: &Self) -> Vec<String> {
        let mut out = Vec::new();
        if pinned.map_type != self.map_type {
            out.push(format!(
                "type: pinned {}, expected {}",
                map_type_name(pinned.map_type),
                map_type_name(self.map_type)
            ));
        }
        for (field, pinned, expected) in [
            ("key size", pinned.key_size, self.key_size),
            ("value size", pinned.value_size, self.value_size),
            ("max entries", pinned.max_entries, self.max_entries),
        ] {
            if pinned != expected {
                out.push(format!("{field}: pinned {pinned}, expected {expected}"));
            }
        }
        if pinned.flags != self.flags {
            out.push(format!(
                "flags: pinned {:#x}, expected {:#x}",
                pinned.flags, self.flags
            ));
        }
        out
    }
}

fn map_type_name(map_type: u32) -> String {
    aya_obj::generated::bpf_map_type::try_from(map_type)
        .map(|t| format!("{t:?}"))
        .unwrap_or_else(|_| format!("unknown ({map_type})"))
}

/// Pinned maps whose content must survive an upgrade: recreating them empty would open a
/// window in which pods escape capture.
///
/// ENROLLED is the fail-closed state itself: the moment the new connect4 is switched in, an
/// empty ENROLLED would let every enrolled pod connect out in plaintext until the agent has
/// enrolled it again. Such a map is never recreated silently: a definition change there is
/// refused with [`CaptureError::MapDefinitionChanged`] (the pods stay held by the earlier
/// programs meanwhile); a version that changes it must ship a migration.
///
/// Every other map is recreated, because losing its entries cannot leak anything:
/// PENDING / ORIG_DST / PEER_ORIG_DST describe connections in flight (the agent resets a
/// captured connection it cannot resolve; getpeername of an older socket reports the
/// agent's address); INBOUND_LISTENERS is refilled by each pod's `attach_inbound`, and an
/// sk_lookup program finding no listener drops (fail closed); EXCLUDED_PORTS and
/// SOCKMAP_SWITCH are written at every start before any link is switched; LOCAL_LEGS,
/// AGENT_UPSTREAMS and TCP_LEGS only speed up local legs (a socket whose peer is not in the
/// same map stays on TCP); SOCKMAP_STATS are counters, AYA_LOGS a log ring. Programs still
/// attached from the earlier agent keep the map they were loaded with until their link is
/// switched, so the two generations never share a map of two layouts.
const STATE_CARRYING_MAPS: [&str; 1] = [maps::ENROLLED];

/// Compares every pinned map under `maps_dir` with this agent's object before anything is
/// loaded. A map whose definition changed is unpinned so that the loader creates it afresh,
/// unless it carries state ([`STATE_CARRYING_MAPS`]): then start-up fails with an error
/// naming the map and each difference. Maps the object has but the pins lack (a new
/// version adding one) are simply created by the loader. Returns the maps recreated.
pub(super) fn check_pinned_maps(maps_dir: &Path) -> Result<Vec<&'static str>> {
    let object =
        aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| CaptureError::Object(e.to_string()))?;
    let page_size = crate::sys::page_size();
    let mut recreated = Vec::new();
    for name in PINNED_MAPS {
        let pin = maps_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let map = object
            .maps
            .get(name)
            .ok_or(CaptureError::MissingMap(name))?;
        let mut expected = MapDefinition::of_object(map, page_size);
        if let Some(entries) = super::max_entries_override(name) {
            expected.max_entries = entries;
        }
        let info = MapInfo::from_pin(&pin).map_err(|source| CaptureError::Map { name, source })?;
        let differences = expected.differences(&MapDefinition::of_pinned(&info));
        if differences.is_empty() {
            continue;
        }
        let differences = differences.join("; ");
        if STATE_CARRYING_MAPS.contains(&name) {
            return Err(CaptureError::MapDefinitionChanged {
                name,
                pin,
                differences,
            });
        }
        warn!(map = name, pin = %pin.display(), %differences, "pinned map's definition changed: recreating it empty");
        std::fs::remove_file(&pin).map_err(|source| CaptureError::Unpin {
            path: pin.clone(),
            source,
        })?;
        recreated.push(name);
    }
    Ok(recreated)
}

/// A pinned link and the program it runs (for checks and diagnostics).
#[derive(Clone, Debug)]
pub struct PinnedLinkProgram {
    pub pin: PathBuf,
    pub prog_id: u32,
}

/// Every link pinned under `pin_dir` (cgroup links and per-pod links) with the id of the
/// program it runs now.
pub fn pinned_link_programs(pin_dir: &Path) -> Result<Vec<PinnedLinkProgram>> {
    let mut dirs = vec![pin_dir.join("links")];
    if let Ok(pods) = std::fs::read_dir(pin_dir.join(super::inbound::PODS_DIR)) {
        dirs.extend(pods.flatten().map(|pod| pod.path()));
    }
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let pin = entry.path();
            let pin_err = |e: aya::programs::links::LinkError| CaptureError::Pin {
                path: pin.clone(),
                source: Box::new(e),
            };
            let link = FdLink::from(PinnedLink::from_pin(&pin).map_err(pin_err)?);
            let prog_id = link.info().map_err(pin_err)?.program_id();
            out.push(PinnedLinkProgram { pin, prog_id });
        }
    }
    out.sort_by(|a, b| a.pin.cmp(&b.pin));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: u32 = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32;
    const LRU: u32 = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32;

    fn def() -> MapDefinition {
        MapDefinition {
            map_type: HASH,
            key_size: 8,
            value_size: 8,
            max_entries: 16_384,
            flags: 0,
        }
    }

    #[test]
    fn same_definition_has_no_differences() {
        assert_eq!(def().differences(&def()), Vec::<String>::new());
    }

    #[test]
    fn every_differing_field_is_named_with_both_values() {
        let pinned = MapDefinition {
            map_type: LRU,
            key_size: 16,
            value_size: 4,
            max_entries: 65_536,
            flags: 1,
        };
        assert_eq!(
            def().differences(&pinned),
            vec![
                "type: pinned BPF_MAP_TYPE_LRU_HASH, expected BPF_MAP_TYPE_HASH".to_string(),
                "key size: pinned 16, expected 8".to_string(),
                "value size: pinned 4, expected 8".to_string(),
                "max entries: pinned 65536, expected 16384".to_string(),
                "flags: pinned 0x1, expected 0x0".to_string(),
            ]
        );
        let only_size = MapDefinition {
            max_entries: 1,
            ..def()
        };
        assert_eq!(
            def().differences(&only_size),
            vec!["max entries: pinned 1, expected 16384".to_string()]
        );
    }

    #[test]
    fn ring_buffer_size_is_compared_as_the_loader_creates_it() {
        let ring = aya_obj::Map::new_from_params(
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
            0,
            0,
            5000,
            0,
        );
        let expected = MapDefinition::of_object(&ring, 4096);
        assert_eq!(expected.max_entries, 8192, "two pages, a power of two");
        assert_eq!(expected.value_size, 0);
    }

    #[test]
    fn the_log_ring_is_created_at_its_own_size_which_the_kernel_accepts() {
        let entries = super::super::max_entries_override(maps::AYA_LOGS).expect("overridden");
        let page_size = crate::sys::page_size();
        assert!(entries < 128 * 1024, "smaller than aya-log-ebpf's 128 KiB");
        assert!(
            entries.is_power_of_two() && entries.is_multiple_of(page_size),
            "a ring buffer is a power-of-two number of pages: {entries}"
        );
        for name in PINNED_MAPS.into_iter().filter(|n| *n != maps::AYA_LOGS) {
            assert!(
                super::super::max_entries_override(name).is_none(),
                "{name} keeps its declared size"
            );
        }
    }

    #[test]
    fn every_pinned_map_of_the_object_is_classified() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("parse embedded object");
        for name in STATE_CARRYING_MAPS {
            assert!(PINNED_MAPS.contains(&name), "{name} is pinned");
            assert!(object.maps.contains_key(name), "{name} in the object");
        }
    }
}

//! The routing state that source preservation needs inside a pod's netns, over rtnetlink:
//! the policy rule and local route that deliver marked replies on lo, and lo's
//! `accept_local`.
//!
//! Why netlink: in a Kubernetes container that is not privileged /proc/sys is mounted
//! read-only, so the sysctl cannot be written through procfs, and the agent image carries
//! no iproute2. A NETLINK_ROUTE socket belongs to the netns of the thread that created it,
//! so [`Rtnl::open`] must run on a thread inside the pod's netns (`NetNs::run`).
//!
//! Messages are built and parsed by netlink-packet-route and sent over netlink-sys's
//! synchronous socket; the request/acknowledge loop is the only hand-written part.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_common::REPLY_MARK;
use netlink_packet_core::{
    DefaultNla, Emitable as _, NLA_F_NESTED, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::{AfSpecInet, AfSpecUnspec, LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::CaptureError;

/// Policy routing table that delivers marked replies locally.
pub(super) const REPLY_TABLE: u32 = 133;
/// The rule's priority. Fixed so that adding it again is "File exists" (the kernel only
/// detects a duplicate rule of the same priority; without one, every add would stack a new
/// copy). 32765 is what `ip rule add` picked for it in a fresh netns, which is how earlier
/// versions of the agent added it.
pub(super) const REPLY_RULE_PRIORITY: u32 = 32765;

/// `IFLA_INET_CONF` (linux/if_link.h) and `IPV4_DEVCONF_ACCEPT_LOCAL` (linux/ip.h): the crate
/// has them but does not export them.
const IFLA_INET_CONF: u16 = 1;
const IPV4_DEVCONF_ACCEPT_LOCAL: u16 = 23;
/// The kernel answers at once; this only bounds a wait that should never happen.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Enough for any answer the requests here get (lo's link message is about 1.5 KiB).
const RECV_BUFFER: usize = 64 * 1024;

type Result<T, E = CaptureError> = std::result::Result<T, E>;

/// A NETLINK_ROUTE socket in the netns of the thread that opened it.
pub(super) struct Rtnl {
    socket: Socket,
    sequence: u32,
    /// For error messages: the netns this socket talks to.
    netns: PathBuf,
}

/// lo as rtnetlink reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Loopback {
    pub index: u32,
    pub accept_local: i32,
}

impl Rtnl {
    /// Opens a socket in the calling thread's netns (`netns` names it in errors).
    pub fn open(netns: &Path) -> Result<Self> {
        let err = |source| CaptureError::Netlink {
            netns: netns.to_path_buf(),
            request: "open a NETLINK_ROUTE socket".into(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
        socket.bind_auto().map_err(err)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        socket2::SockRef::from(&socket)
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(err)?;
        Ok(Self {
            socket,
            sequence: 0,
            netns: netns.to_path_buf(),
        })
    }

    /// lo's index and its `accept_local` (RTM_GETLINK).
    pub fn loopback(&mut self) -> Result<Loopback> {
        let request = "get link lo";
        let mut query = LinkMessage::default();
        query.attributes.push(LinkAttribute::IfName("lo".into()));
        let answers = self.request(request, RouteNetlinkMessage::GetLink(query), 0)?;
        let link = answers
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .ok_or_else(|| self.error(request, io::Error::other("no link in the answer")))?;
        let accept_local = link
            .attributes
            .iter()
            .filter_map(|a| match a {
                LinkAttribute::AfSpecUnspec(families) => Some(families),
                _ => None,
            })
            .flatten()
            .filter_map(|f| match f {
                AfSpecUnspec::Inet(inet) => Some(inet),
                _ => None,
            })
            .flatten()
            .find_map(|a| match a {
                AfSpecInet::DevConf(conf) => Some(conf.accept_local),
                _ => None,
            })
            .ok_or_else(|| {
                self.error(
                    request,
                    io::Error::other("no IPv4 settings (IFLA_INET_CONF)"),
                )
            })?;
        Ok(Loopback {
            index: link.header.index,
            accept_local,
        })
    }

    /// Sets `accept_local` of the link `index` (RTM_SETLINK), and nothing else: see
    /// [`accept_local_request`].
    pub fn set_accept_local(&mut self, index: u32, value: i32) -> Result<()> {
        let request = format!("set accept_local={value} on lo");
        self.request(
            &request,
            RouteNetlinkMessage::SetLink(accept_local_request(index, value)),
            0,
        )?;
        Ok(())
    }

    /// `ip rule add fwmark REPLY_MARK lookup 133 pref 32765`; already there is success.
    pub fn add_reply_rule(&mut self) -> Result<()> {
        let request = reply_rule_description("add");
        match self.request(
            &request,
            RouteNetlinkMessage::NewRule(reply_rule(true)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(CaptureError::Netlink { source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// Deletes every copy of the reply rule, whatever its priority (earlier versions could
    /// stack several); none is success.
    pub fn delete_reply_rules(&mut self) -> Result<()> {
        let request = reply_rule_description("delete");
        // Bounded: each round removes one rule, and nothing else adds them meanwhile.
        for _ in 0..64 {
            match self.request(&request, RouteNetlinkMessage::DelRule(reply_rule(false)), 0) {
                Ok(_) => {}
                Err(CaptureError::Netlink { source, .. }) if absent(&source) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Err(self.error(&request, io::Error::other("more than 64 copies")))
    }

    /// `ip route replace local 0.0.0.0/0 dev lo table 133`.
    pub fn replace_reply_route(&mut self, lo_index: u32) -> Result<()> {
        let request = format!("replace route local 0.0.0.0/0 dev lo table {REPLY_TABLE}");
        self.request(
            &request,
            RouteNetlinkMessage::NewRoute(reply_route(Some(lo_index))),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// `ip route delete local 0.0.0.0/0 table 133`; none is success.
    pub fn delete_reply_route(&mut self) -> Result<()> {
        let request = format!("delete route local 0.0.0.0/0 table {REPLY_TABLE}");
        match self.request(
            &request,
            RouteNetlinkMessage::DelRoute(reply_route(None)),
            0,
        ) {
            Err(CaptureError::Netlink { source, .. }) if absent(&source) => Ok(()),
            other => other.map(drop),
        }
    }

    fn error(&self, request: &str, source: io::Error) -> CaptureError {
        CaptureError::Netlink {
            netns: self.netns.clone(),
            request: request.to_owned(),
            source,
        }
    }

    /// Sends one request with NLM_F_ACK and reads until the kernel acknowledges it,
    /// returning the messages that came before the acknowledgement. A negative
    /// acknowledgement is an error carrying the kernel's errno.
    fn request(
        &mut self,
        request: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|e| self.error(request, e))?;

        let mut answers = Vec::new();
        let mut buf = Vec::with_capacity(RECV_BUFFER);
        loop {
            buf.clear();
            let len = self
                .socket
                .recv(&mut buf, 0)
                .map_err(|e| self.error(request, e))?;
            if len > buf.len() {
                return Err(self.error(request, io::Error::other("answer truncated")));
            }
            let mut offset = 0;
            while offset < buf.len() {
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                    .map_err(|e| self.error(request, io::Error::other(e.to_string())))?;
                let length = answer.header.length as usize;
                if length == 0 {
                    return Err(self.error(request, io::Error::other("empty netlink message")));
                }
                offset += length.next_multiple_of(4);
                if answer.header.sequence_number != sequence {
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(answers),
                        Some(_) => return Err(self.error(request, e.to_io())),
                    },
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }
}

/// Nothing to delete: ENOENT for rules, ESRCH for routes.
fn absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn reply_rule_description(verb: &str) -> String {
    format!("{verb} rule fwmark {REPLY_MARK:#x} lookup {REPLY_TABLE} pref {REPLY_RULE_PRIORITY}")
}

/// The reply rule; without `with_priority` it matches copies of any priority (deletion).
fn reply_rule(with_priority: bool) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = AddressFamily::Inet;
    rule.header.table = REPLY_TABLE as u8;
    rule.header.action = RuleAction::ToTable;
    rule.attributes.push(RuleAttribute::FwMark(REPLY_MARK));
    rule.attributes.push(RuleAttribute::Table(REPLY_TABLE));
    if with_priority {
        rule.attributes
            .push(RuleAttribute::Priority(REPLY_RULE_PRIORITY));
    }
    rule
}

/// `local 0.0.0.0/0 [dev lo] table 133`, as `ip route` sends it.
fn reply_route(lo_index: Option<u32>) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header = RouteHeader {
        address_family: AddressFamily::Inet,
        table: REPLY_TABLE as u8,
        protocol: RouteProtocol::Boot,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    route.attributes.push(RouteAttribute::Table(REPLY_TABLE));
    if let Some(index) = lo_index {
        route.attributes.push(RouteAttribute::Oif(index));
    }
    route
}

/// RTM_SETLINK for link `index` carrying IFLA_AF_SPEC → AF_INET → IFLA_INET_CONF with the
/// one attribute IPV4_DEVCONF_ACCEPT_LOCAL. The kernel (inet_set_link_af) sets each devconf
/// attribute present and leaves the others alone. Built by hand: the crate's
/// `AfSpecInet::DevConfRequest` takes a whole devconf struct and skips zero fields, so it
/// cannot say "set accept_local to 0" (a restore) and would set every other non-zero
/// field it was given.
fn accept_local_request(index: u32, value: i32) -> LinkMessage {
    let setting = DefaultNla::new(IPV4_DEVCONF_ACCEPT_LOCAL, value.to_ne_bytes().to_vec());
    let mut conf = vec![0; setting.buffer_len()];
    setting.emit(&mut conf);
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::Other(DefaultNla::new(IFLA_INET_CONF | NLA_F_NESTED, conf)),
        ])]));
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emitted(message: RouteNetlinkMessage) -> Vec<u8> {
        let mut packet = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(message),
        );
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        out
    }

    /// nlmsghdr (16) + ifinfomsg (16), then the attributes.
    const LINK_ATTRS: usize = 32;

    #[test]
    fn accept_local_request_carries_only_that_setting() {
        for value in [0i32, 1] {
            let bytes = emitted(RouteNetlinkMessage::SetLink(accept_local_request(1, value)));
            let v = value.to_ne_bytes();
            #[rustfmt::skip]
            let expected: Vec<u8> = [
                // IFLA_AF_SPEC (26): len 20 (as iproute2 sends it, no NLA_F_NESTED)
                &[20, 0, 26, 0][..],
                // AF_INET (2): len 16
                &[16, 0, 2, 0],
                // IFLA_INET_CONF | NLA_F_NESTED: len 12
                &[12, 0, 1, 0x80],
                // IPV4_DEVCONF_ACCEPT_LOCAL (23): len 8, the value
                &[8, 0, 23, 0], &v,
            ]
            .concat();
            assert_eq!(&bytes[LINK_ATTRS..], &expected[..], "value {value}");
            // ifi_index
            assert_eq!(&bytes[20..24], &1u32.to_ne_bytes());
        }
    }

    #[test]
    fn reply_rule_matches_what_ip_rule_sends() {
        let rule = reply_rule(true);
        assert_eq!(rule.header.action, RuleAction::ToTable);
        assert_eq!(rule.header.table, 133);
        assert!(rule.attributes.contains(&RuleAttribute::FwMark(REPLY_MARK)));
        assert!(
            rule.attributes
                .contains(&RuleAttribute::Priority(REPLY_RULE_PRIORITY))
        );
        let any_priority = reply_rule(false);
        assert!(
            !any_priority
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(_)))
        );
    }

    #[test]
    fn reply_route_is_a_local_default_in_table_133() {
        let route = reply_route(Some(1));
        assert_eq!(route.header.kind, RouteType::Local);
        assert_eq!(route.header.scope, RouteScope::Host);
        assert_eq!(route.header.destination_prefix_length, 0);
        assert!(route.attributes.contains(&RouteAttribute::Table(133)));
        assert!(route.attributes.contains(&RouteAttribute::Oif(1)));
    }
}

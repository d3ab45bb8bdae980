//! The handover format: the messages a node and its successor exchange
//! during an upgrade in place, one per `SOCK_SEQPACKET` datagram, with the
//! descriptors they name passed alongside (`SCM_RIGHTS`).
//!
//! Pure encoding and decoding: no I/O. [`decode`] takes untrusted bytes and
//! never panics (fuzzed by `fuzz/fuzz_targets/handover.rs`).
//!
//! # Format, version 1
//!
//! Every message: `"PGUP"`, `u16` version, `u8` kind, then the kind's
//! fields in order. Integers are big-endian; `str` is a `u16` length and
//! UTF-8; `bytes` is a `u32` length and the bytes; `opt<T>` is a `u8` 0 or
//! 1 and then `T`; `addr` is a `u8` family (4 or 6), 4 or 16 address bytes
//! and a `u16` port. Nothing may follow the last field.
//!
//! | kind | message | fields | descriptors |
//! | --- | --- | --- | --- |
//! | 1 | `Hello` (successor → node) | `u16` n, n × `u16` versions it reads; `str` its version | — |
//! | 2 | `Listeners` (node → successor) | `u16` n, n × (`u8` what: 0 port, 1 admin, 2 control; `u16` port; `str` the control socket's path, else empty) | one per entry, in order |
//! | 3 | `Session` (node → successor) | see [`Session`] | client, target, then (read, write) of each direction's pipe that holds bytes |
//! | 4 | `Done` (node → successor) | `u32` sessions sent; `u64` next session id number; `str` the node's version | — |
//! | 5 | `Adopted` (successor → node) | `u32` sessions taken | — |
//! | 6 | `Commit` (node → successor) | — | — |
//! | 7 | `Fail` (either) | `str` why | — |
//!
//! `Session`: `u64` id; `str` route; `str` tenant; `u16` port; `opt<str>`
//! via; `str` target; `addr` peer; `addr` client; `opt<str>` endpoint;
//! `u64` started (Unix ms); `u64` age ms; `u64` idle ms; `u64` bytes to
//! target; `u64` bytes to client; `u8` first FIN (0 none, 1 client, 2
//! target); then client→target and target→client, each: `u8` stage (0 open,
//! 1 EOF seen, 2 FIN passed on); `bytes` pending (at most 65,536); `u32`
//! bytes in its pipe (0: no pipe passed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The handover versions this build reads and writes.
pub const VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"PGUP";
/// The most a direction may hold outside its pipe (one forwarding buffer).
pub const MAX_PENDING: usize = 64 * 1024;
/// The largest datagram a message may take.
pub const MAX_MESSAGE: usize = 2 * MAX_PENDING + 4096;

/// What a listener descriptor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerKind {
    /// A forwarding port.
    Port(u16),
    /// The admin port.
    Admin,
    /// The control socket, at this path.
    Control(String),
}

/// Where one direction of a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Open,
    Eof,
    Shut,
}

/// One direction of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direction {
    pub stage: Stage,
    /// Bytes read and not yet written on, before those in the pipe.
    pub pending: Vec<u8>,
    /// Bytes in the pipe passed with the message (0: no pipe).
    pub in_pipe: u32,
}

/// Which side of a session sent its FIN first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstFin {
    None,
    Client,
    Target,
}

/// One running session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: u64,
    pub route: String,
    pub tenant: String,
    pub port: u16,
    pub via: Option<String>,
    pub target: String,
    pub peer: SocketAddr,
    pub client: SocketAddr,
    pub endpoint: Option<String>,
    pub started_unix_ms: u64,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub to_target: u64,
    pub to_client: u64,
    pub first_fin: FirstFin,
    pub c2t: Direction,
    pub t2c: Direction,
}

impl Session {
    /// Descriptors that travel with this message.
    pub fn fd_count(&self) -> usize {
        2 + [&self.c2t, &self.t2c].iter().filter(|d| d.in_pipe > 0).count() * 2
    }
}

/// A handover message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello { reads: Vec<u16>, version: String },
    Listeners(Vec<ListenerKind>),
    Session(Box<Session>),
    Done { sessions: u32, next_id: u64, version: String },
    Adopted { sessions: u32 },
    Commit,
    Fail(String),
}

impl Message {
    /// Descriptors that travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Listeners(l) => l.len(),
            Message::Session(s) => s.fd_count(),
            _ => 0,
        }
    }
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a handover message (bad magic)")]
    Magic,
    #[error("handover version {0} (this build reads version {VERSION})")]
    Version(u16),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("message ends early")]
    Short,
    #[error("{0} bytes after the message's last field")]
    Trailing(usize),
    #[error("bad field: {0}")]
    Field(&'static str),
}

/// Encode `m` as one datagram.
pub fn encode(m: &Message) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    w.0.extend_from_slice(MAGIC);
    w.u16(VERSION);
    match m {
        Message::Hello { reads, version } => {
            w.u8(1);
            w.u16(reads.len() as u16);
            for v in reads {
                w.u16(*v);
            }
            w.str(version);
        }
        Message::Listeners(list) => {
            w.u8(2);
            w.u16(list.len() as u16);
            for l in list {
                let (what, port, path) = match l {
                    ListenerKind::Port(p) => (0, *p, ""),
                    ListenerKind::Admin => (1, 0, ""),
                    ListenerKind::Control(path) => (2, 0, path.as_str()),
                };
                w.u8(what);
                w.u16(port);
                w.str(path);
            }
        }
        Message::Session(s) => {
            w.u8(3);
            w.u64(s.id);
            w.str(&s.route);
            w.str(&s.tenant);
            w.u16(s.port);
            w.opt_str(s.via.as_deref());
            w.str(&s.target);
            w.addr(s.peer);
            w.addr(s.client);
            w.opt_str(s.endpoint.as_deref());
            for n in [s.started_unix_ms, s.age_ms, s.idle_ms, s.to_target, s.to_client] {
                w.u64(n);
            }
            w.u8(match s.first_fin {
                FirstFin::None => 0,
                FirstFin::Client => 1,
                FirstFin::Target => 2,
            });
            for d in [&s.c2t, &s.t2c] {
                w.u8(match d.stage {
                    Stage::Open => 0,
                    Stage::Eof => 1,
                    Stage::Shut => 2,
                });
                w.u32(d.pending.len() as u32);
                w.0.extend_from_slice(&d.pending);
                w.u32(d.in_pipe);
            }
        }
        Message::Done { sessions, next_id, version } => {
            w.u8(4);
            w.u32(*sessions);
            w.u64(*next_id);
            w.str(version);
        }
        Message::Adopted { sessions } => {
            w.u8(5);
            w.u32(*sessions);
        }
        Message::Commit => w.u8(6),
        Message::Fail(why) => {
            w.u8(7);
            w.str(why);
        }
    }
    w.0
}

/// Decode one datagram. The header's version must be [`VERSION`]; any
/// other is refused, so a message is never read with another layout.
pub fn decode(b: &[u8]) -> Result<Message, WireError> {
    let mut r = Reader(b);
    if r.take(4)? != MAGIC {
        return Err(WireError::Magic);
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let m = match r.u8()? {
        1 => {
            let n = r.u16()?;
            let reads = (0..n).map(|_| r.u16()).collect::<Result<_, _>>()?;
            Message::Hello { reads, version: r.str()? }
        }
        2 => {
            let n = r.u16()?;
            let mut list = Vec::with_capacity(usize::from(n).min(r.0.len() / 5));
            for _ in 0..n {
                let what = r.u8()?;
                let port = r.u16()?;
                let path = r.str()?;
                // One spelling per entry: fields a kind does not use are empty.
                list.push(match (what, port, path.is_empty()) {
                    (0, p, true) => ListenerKind::Port(p),
                    (1, 0, true) => ListenerKind::Admin,
                    (2, 0, false) => ListenerKind::Control(path),
                    (0..=2, _, _) => return Err(WireError::Field("listener entry")),
                    _ => return Err(WireError::Field("listener kind")),
                });
            }
            Message::Listeners(list)
        }
        3 => {
            let id = r.u64()?;
            let route = r.str()?;
            let tenant = r.str()?;
            let port = r.u16()?;
            let via = r.opt_str()?;
            let target = r.str()?;
            let peer = r.addr()?;
            let client = r.addr()?;
            let endpoint = r.opt_str()?;
            let (started_unix_ms, age_ms, idle_ms) = (r.u64()?, r.u64()?, r.u64()?);
            let (to_target, to_client) = (r.u64()?, r.u64()?);
            let first_fin = match r.u8()? {
                0 => FirstFin::None,
                1 => FirstFin::Client,
                2 => FirstFin::Target,
                _ => return Err(WireError::Field("first FIN")),
            };
            let c2t = r.direction()?;
            let t2c = r.direction()?;
            Message::Session(Box::new(Session {
                id,
                route,
                tenant,
                port,
                via,
                target,
                peer,
                client,
                endpoint,
                started_unix_ms,
                age_ms,
                idle_ms,
                to_target,
                to_client,
                first_fin,
                c2t,
                t2c,
            }))
        }
        4 => Message::Done { sessions: r.u32()?, next_id: r.u64()?, version: r.str()? },
        5 => Message::Adopted { sessions: r.u32()? },
        6 => Message::Commit,
        7 => Message::Fail(r.str()?),
        k => return Err(WireError::Kind(k)),
    };
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    Ok(m)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Strings here are route names, tenants, targets, endpoint ids and
    /// messages: far below 64 KiB; longer ones are cut at a char boundary.
    fn str(&mut self, s: &str) {
        let mut end = s.len().min(usize::from(u16::MAX));
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    fn addr(&mut self, a: SocketAddr) {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.u8(4);
                self.0.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.u8(6);
                self.0.extend_from_slice(&ip.octets());
            }
        }
        self.u16(a.port());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Short);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u16()?;
        let b = self.take(usize::from(n))?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Field("not UTF-8"))
    }
    fn opt_str(&mut self) -> Result<Option<String>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            _ => Err(WireError::Field("option flag")),
        }
    }
    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(WireError::Field("address family")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    fn direction(&mut self) -> Result<Direction, WireError> {
        let stage = match self.u8()? {
            0 => Stage::Open,
            1 => Stage::Eof,
            2 => Stage::Shut,
            _ => return Err(WireError::Field("direction stage")),
        };
        let n = self.u32()? as usize;
        if n > MAX_PENDING {
            return Err(WireError::Field("more pending bytes than a buffer holds"));
        }
        let pending = self.take(n)?.to_vec();
        Ok(Direction { stage, pending, in_pipe: self.u32()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            id: 0x1234_5678_9abc_def0,
            route: "tenant-a-web1".into(),
            tenant: "tenant-a".into(),
            port: 8022,
            via: Some("vpce-0a1b2c3d4e5f67890".into()),
            target: "10.0.1.5:22".into(),
            peer: "10.0.0.9:40000".parse().unwrap(),
            client: "[2001:db8::7]:50122".parse().unwrap(),
            endpoint: None,
            started_unix_ms: 1_796_000_000_000,
            age_ms: 36_000_000,
            idle_ms: 250,
            to_target: 1 << 33,
            to_client: 7,
            first_fin: FirstFin::Client,
            c2t: Direction { stage: Stage::Eof, pending: b"held".to_vec(), in_pipe: 0 },
            t2c: Direction { stage: Stage::Open, pending: Vec::new(), in_pipe: 65536 },
        }
    }

    #[test]
    fn every_message_round_trips() {
        let all = vec![
            Message::Hello { reads: vec![1, 2], version: "0.1.0".into() },
            Message::Listeners(vec![
                ListenerKind::Port(8000),
                ListenerKind::Admin,
                ListenerKind::Control("/run/portgate/control.sock".into()),
            ]),
            Message::Session(Box::new(session())),
            Message::Done { sessions: 3, next_id: u64::MAX, version: "0.1.0".into() },
            Message::Adopted { sessions: 3 },
            Message::Commit,
            Message::Fail("config invalid: x.toml:3:1: …".into()),
        ];
        for m in all {
            let b = encode(&m);
            assert!(b.len() <= MAX_MESSAGE);
            assert_eq!(decode(&b), Ok(m.clone()), "{m:?}");
            // Every strict prefix is refused, never misread.
            for cut in 0..b.len() {
                assert!(decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert_eq!(decode(&longer), Err(WireError::Trailing(1)));
        }
        assert_eq!(Message::Session(Box::new(session())).fd_count(), 4);
    }

    #[test]
    fn another_version_or_garbage_is_refused() {
        let mut b = encode(&Message::Commit);
        b[5] = 2;
        assert_eq!(decode(&b), Err(WireError::Version(2)));
        assert_eq!(decode(b"HTTP/1.1 200"), Err(WireError::Magic));
        let mut k = encode(&Message::Commit);
        k[6] = 99;
        assert_eq!(decode(&k), Err(WireError::Kind(99)));
        let mut big = encode(&Message::Session(Box::new(session())));
        // Claim a pending length above the limit.
        let s = session();
        let at = big.len() - (9 + s.t2c.pending.len()) - (9 + s.c2t.pending.len()) + 1;
        big[at..at + 4].copy_from_slice(&((MAX_PENDING as u32) + 1).to_be_bytes());
        assert!(matches!(decode(&big), Err(WireError::Field(_))));
    }
}

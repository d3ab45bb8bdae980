//! Upgrade in place: the binary now installed where this one was started
//! from takes over every listening socket and every running session, and
//! this process exits; nothing is refused, cut or lost.
//!
//! The steps, between the node (N) and the successor it starts (S), over a
//! `SOCK_SEQPACKET` socket pair that is S's standard input ([`channel`],
//! messages in [`wire`]):
//!
//! 1. N starts S (`run -c` the same config path, with `PORTGATE_HANDOVER`
//!    set). S loads the config afresh (an invalid one ends S, and the
//!    upgrade, here) and says `Hello` with the handover versions it reads.
//! 2. N sends its listening sockets (ports, admin, control), stops
//!    accepting (the sockets stay open: new connections wait in the
//!    kernel's queue), lets connections still in setup reach their target,
//!    then asks every running session to hand over ([`handed`]): each
//!    stops between two polls and leaves its frozen state (sockets, bytes
//!    held in buffers and pipes, counts). N sends each, then `Done`.
//! 3. S builds its node around them without accepting or forwarding yet,
//!    and answers `Adopted`.
//! 4. N tells systemd `MAINPID=<S>` and sends `Commit`; from then on S
//!    owns everything: it accepts, forwards, sends `READY=1` and logs
//!    `upgraded`. N exits without closing a session.
//!
//! Until `Commit`, N can take everything back: if S does not start, fails,
//! refuses the version, or has not answered 10 s after it was started, N
//! kills it, carries its frozen sessions on itself, accepts again, logs
//! `upgrade failed` and counts the failure. The node side is
//! `crate::node::upgrade` (N) and `crate::node::takeover` (S).

pub(crate) mod channel;
pub(crate) mod convert;
pub(crate) mod handed;
pub mod wire;

use std::time::Duration;

/// The environment variable that tells `run` its standard input is a
/// handover channel from the node it succeeds.
pub const HANDOVER_ENV: &str = "PORTGATE_HANDOVER";

/// For tests of the version check: the handover versions a successor
/// claims to read (comma-separated), instead of its own.
pub(crate) const VERSIONS_ENV: &str = "PORTGATE_HANDOVER_VERSIONS";

/// From starting the successor to its `Adopted`.
pub(crate) const TAKEOVER_LIMIT: Duration = Duration::from_secs(10);

/// How long connections still in setup (PROXY header, dial) get to reach
/// their target before the sessions are frozen.
pub(crate) const SETUP_WAIT: Duration = Duration::from_secs(3);

//! Stopping a forwarder where it stands and starting it again, in this
//! process or in its successor (upgrade in place).
//!
//! [`Forward::freeze`] is called between two polls, from the session's own
//! task, so nothing is half-done: each direction has its stage, at most one
//! of a buffer or a pipe holding bytes not yet written on, and its byte
//! count. The sockets and pipes are descriptors, duplicated here, so they
//! outlive this forwarder (dropping it deregisters and closes its own
//! copies, which sends nothing to the peers). [`Forward::thaw`] builds a
//! forwarder that writes the held bytes first and then carries on exactly
//! as the frozen one would have: no byte is lost or sent twice.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tokio::net::TcpStream;

use super::half::{FrozenHalf, Half};
use super::{idle_timer, ByteSink, Forward, Side};

/// A whole forwarder, stopped: its sockets, both directions, and which
/// side sent its FIN first.
#[derive(Debug)]
pub(crate) struct Frozen {
    pub(crate) client: OwnedFd,
    pub(crate) target: OwnedFd,
    pub(crate) c2t: FrozenHalf,
    pub(crate) t2c: FrozenHalf,
    pub(crate) first_fin: Option<Side>,
}

impl<S: ByteSink> Forward<S> {
    /// Stop forwarding and take the state out. The forwarder is left
    /// holding nothing but its own copies of the sockets; drop it next.
    pub(crate) fn freeze(&mut self) -> io::Result<Frozen> {
        let client = self.client.as_fd().try_clone_to_owned()?;
        let target = self.target.as_fd().try_clone_to_owned()?;
        Ok(Frozen {
            client,
            target,
            c2t: self.c2t.freeze(),
            t2c: self.t2c.freeze(),
            first_fin: self.first_fin,
        })
    }

    /// Carry on from `f`: `idle` is `timeouts.idle`, `idle_for` how long no
    /// byte has moved already. Must run inside the runtime.
    pub(crate) fn thaw(f: Frozen, idle: Option<Duration>, idle_for: Duration, sink: S) -> io::Result<Self> {
        let client = TcpStream::from_std(std::net::TcpStream::from(f.client))?;
        let target = TcpStream::from_std(std::net::TcpStream::from(f.target))?;
        for s in [&client, &target] {
            socket2::SockRef::from(s).set_nonblocking(true)?;
        }
        Ok(Forward {
            client,
            target,
            c2t: Half::thaw(f.c2t)?,
            t2c: Half::thaw(f.t2c)?,
            first_fin: f.first_fin,
            idle: idle_timer(idle, idle_for),
            sink,
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::forward::tests::{pair, pattern, Counts};
    use crate::forward::End;

    /// Freeze and thaw a forwarder again and again while 8 MiB stream each
    /// way (the target reads slowly, so buffers and pipes hold bytes at the
    /// moment of a freeze): every byte arrives once, in order.
    #[tokio::test]
    async fn freezing_and_thawing_under_load_loses_and_repeats_nothing() {
        let (mut user, client) = pair().await;
        let (target, mut backend) = pair().await;
        let up = pattern(8 << 20, 1);
        let down = pattern(8 << 20, 2);
        let (u, d) = (up.clone(), down.clone());
        let (mut user_r, mut user_w) = user.split();
        let users = async move {
            let w = async {
                user_w.write_all(&u).await.unwrap();
                user_w.shutdown().await.unwrap();
            };
            let r = async {
                let mut got = Vec::new();
                user_r.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(w, r).1
        };
        let backends = async move {
            let (mut br, mut bw) = backend.split();
            let w = async {
                bw.write_all(&d).await.unwrap();
                bw.shutdown().await.unwrap();
            };
            let r = async {
                let mut got = Vec::new();
                let mut chunk = vec![0u8; 7000];
                loop {
                    let n = br.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break got;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    // A slow reader: bytes pile up in buffers and pipes.
                    if got.len() % (64 * 1024) < n {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            };
            tokio::join!(w, r).1
        };
        let counts: &'static Counts = Box::leak(Box::default());
        let forwarder = async move {
            let mut fwd = Forward::new(client, target, b"early".to_vec(), None, counts);
            let (mut freezes, mut holding) = (0, 0);
            loop {
                let step = tokio::time::timeout(Duration::from_millis(2), &mut fwd).await;
                match step {
                    Ok(end) => break (end, fwd.bytes(), (freezes, holding)),
                    Err(_) => {
                        let frozen = fwd.freeze().unwrap();
                        drop(fwd);
                        freezes += 1;
                        let held = |h: &FrozenHalf| !h.pending.is_empty() || h.pipe.is_some();
                        if held(&frozen.c2t) || held(&frozen.t2c) {
                            holding += 1;
                        }
                        fwd = Forward::thaw(frozen, None, Duration::ZERO, counts).unwrap();
                    }
                }
            }
        };
        let (got_down, got_up, (end, bytes, (freezes, holding))) = tokio::join!(users, backends, forwarder);
        assert!(matches!(end, End::Closed { .. }), "{end:?}");
        assert!(freezes > 3, "the forwarder was frozen only {freezes} times");
        assert!(holding > 0, "no freeze caught bytes in a buffer or pipe ({freezes} freezes)");
        assert_eq!(got_up.len(), up.len() + 5);
        assert_eq!(&got_up[..5], b"early");
        assert!(got_up[5..] == up[..], "client-to-target bytes differ");
        assert!(got_down == down, "target-to-client bytes differ");
        assert_eq!(bytes, (up.len() as u64 + 5, down.len() as u64));
    }
}

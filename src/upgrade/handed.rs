//! Where sessions asked to hand over leave their frozen state: the
//! collector the upgrade opens before it asks, and closes when it is done
//! (a session that freezes after that carries on where it is).
//!
//! A leaf: it knows the registry entry and the forwarder's frozen state,
//! nothing of sockets or the wire.

use std::io;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::forward::Frozen;
use crate::node::registry::Entry;

/// What a session asked to hand over answers.
pub(crate) enum Deposit {
    /// Its state, stopped.
    Frozen(Frozen),
    /// It ended by itself just as it was asked (nothing to hand over).
    Ended,
    /// It could not be frozen (out of descriptors).
    Failed(io::ErrorKind),
}

/// One session, stopped for a handover.
pub(crate) struct Handed {
    pub(crate) entry: Arc<Entry>,
    pub(crate) frozen: Deposit,
}

/// The open collector, if an upgrade is collecting.
#[derive(Default)]
pub(crate) struct Collector {
    tx: Mutex<Option<mpsc::UnboundedSender<Handed>>>,
}

impl Collector {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<Handed>>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start collecting; what sessions deposit arrives on the receiver.
    pub(crate) fn open(&self) -> mpsc::UnboundedReceiver<Handed> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.lock() = Some(tx);
        rx
    }

    /// Stop collecting.
    pub(crate) fn close(&self) {
        *self.lock() = None;
    }

    /// Leave a session's state. When nobody collects, a frozen session is
    /// given back (`Err`) to carry on where it is.
    pub(crate) fn deposit(&self, entry: Arc<Entry>, frozen: Deposit) -> Result<(), (Arc<Entry>, Frozen)> {
        let refused = match self.lock().as_ref() {
            Some(tx) => match tx.send(Handed { entry, frozen }) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(h)) => h,
            },
            None => Handed { entry, frozen },
        };
        match refused.frozen {
            Deposit::Frozen(f) => Err((refused.entry, f)),
            Deposit::Ended | Deposit::Failed(_) => Ok(()),
        }
    }
}

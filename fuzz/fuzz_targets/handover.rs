//! Arbitrary bytes as a handover message (upgrade in place): the decoder of
//! `portgate::upgrade::wire` reads what another process sent.
//!
//! Beyond "never panics": a decoded message re-encodes to exactly the
//! input (the format has one spelling per message), every strict prefix of
//! a valid message is refused, and pending bytes never exceed one buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portgate::upgrade::wire::{decode, encode, Message, MAX_MESSAGE, MAX_PENDING};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = decode(data) else { return };
    assert_eq!(encode(&m), data, "a decoded message does not re-encode to its input");
    assert_eq!(decode(&encode(&m)), Ok(m.clone()));
    if let Message::Session(s) = &m {
        assert!(s.c2t.pending.len() <= MAX_PENDING && s.t2c.pending.len() <= MAX_PENDING);
        assert!(data.len() <= MAX_MESSAGE);
    }
    for cut in [0, data.len() / 2, data.len().saturating_sub(1)] {
        if cut < data.len() {
            assert!(decode(&data[..cut]).is_err(), "a prefix of a message decoded");
        }
    }
});

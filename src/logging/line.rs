//! One event, one line: the `text` and `json` formats, written straight
//! into a reused per-thread buffer and handed to the queue.
//!
//! `text` is `TIMESTAMP LEVEL MESSAGE key=value ...` (logfmt values: quoted,
//! with `\"`, `\\` and control characters escaped, when empty or holding a
//! space, `"`, `=` or a control character). `json` is one object with
//! `timestamp`, `level`, `message` and the event's fields at the top level
//! (numbers and booleans as JSON values, everything else as strings).
//! Either way one event is exactly one line: a newline inside a value or
//! a message is escaped.
//!
//! This is the connection path's share of logging (two lines per session),
//! so it formats without the general-purpose formatter's layers: a
//! timestamp whose date and time are formatted once per second, integers
//! and addresses by hand, no intermediate strings.

use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use super::queue::LogQueue;
use crate::config::LogFormat;

/// The layer that formats every enabled event and queues its line.
pub(super) struct LineLayer {
    pub(super) queue: Arc<LogQueue>,
    pub(super) format: LogFormat,
}

thread_local! {
    /// Each thread's buffers, reused from event to event: the line and
    /// the fields (written after the message, which may come later).
    static SCRATCH: std::cell::Cell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    /// The second whose `YYYY-MM-DDTHH:MM:SS` is in `STAMP_TEXT`.
    static STAMP_SECOND: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
    static STAMP_TEXT: std::cell::Cell<[u8; 19]> = const { std::cell::Cell::new([0; 19]) };
}

impl<S: Subscriber> Layer<S> for LineLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let (mut line, mut fields) = SCRATCH.take();
        line.clear();
        fields.clear();
        format_event(self.format, event, &mut line, &mut fields);
        self.queue.push(&line);
        SCRATCH.set((line, fields));
    }
}

fn format_event(format: LogFormat, event: &Event<'_>, line: &mut Vec<u8>, fields: &mut Vec<u8>) {
    // The message goes into `line` right after the level, the fields into
    // `fields` (a message may be recorded after them); then they are joined.
    start(format, *event.metadata().level(), line);
    let mut v = FieldWriter { format, message: line, fields, message_seen: false };
    event.record(&mut v);
    v.finish();
}

/// The line up to where the message goes.
fn start(format: LogFormat, level: Level, out: &mut Vec<u8>) {
    match format {
        LogFormat::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(out);
            out.extend_from_slice(b"\",\"level\":\"");
            out.extend_from_slice(level.as_str().as_bytes());
            out.extend_from_slice(b"\",\"message\":");
        }
        LogFormat::Text => {
            timestamp(out);
            out.extend_from_slice(match level {
                Level::TRACE => b" TRACE ",
                Level::DEBUG => b" DEBUG ",
                Level::INFO => b"  INFO ",
                Level::WARN => b"  WARN ",
                Level::ERROR => b" ERROR ",
            });
        }
    }
}

/// A complete line with no fields but `dropped` (the queue's own warning).
pub(super) fn dropped_warning(format: LogFormat, dropped: u64) -> Vec<u8> {
    let (mut out, mut fields) = (Vec::with_capacity(128), Vec::new());
    start(format, Level::WARN, &mut out);
    let mut v = FieldWriter { format, message: &mut out, fields: &mut fields, message_seen: false };
    v.write_message("log lines dropped");
    v.key("dropped");
    itoa(v.fields, dropped);
    v.finish();
    out
}

/// `2026-12-02T18:59:12.369016Z`: UTC, microseconds, like RFC 3339.
fn timestamp(out: &mut Vec<u8>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    if STAMP_SECOND.get() != secs {
        let whole = UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let text = humantime::format_rfc3339_seconds(whole).to_string();
        let mut stamp = [0u8; 19];
        if let Some(head) = text.as_bytes().get(..19) {
            stamp.copy_from_slice(head);
        }
        STAMP_TEXT.set(stamp);
        STAMP_SECOND.set(secs);
    }
    out.extend_from_slice(&STAMP_TEXT.get());
    out.push(b'.');
    let micros = now.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut m = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (m % 10) as u8;
        m /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// Visits an event's fields: the message into `message`, the rest into
/// `fields`.
struct FieldWriter<'a> {
    format: LogFormat,
    /// The line, written up to the message.
    message: &'a mut Vec<u8>,
    fields: &'a mut Vec<u8>,
    message_seen: bool,
}

impl FieldWriter<'_> {
    fn write_message(&mut self, text: &str) {
        self.message_seen = true;
        match self.format {
            LogFormat::Json => json_string(self.message, text),
            LogFormat::Text => escape_controls(self.message, text),
        }
    }

    /// Complete the line: the fields after the message, then the end.
    fn finish(self) {
        let json = self.format == LogFormat::Json;
        if json && !self.message_seen {
            self.message.extend_from_slice(b"\"\"");
        }
        self.message.extend_from_slice(self.fields);
        self.message.extend_from_slice(if json { b"}\n" } else { b"\n" });
    }

    /// ` key=` or `,"key":`.
    fn key(&mut self, name: &str) {
        match self.format {
            LogFormat::Json => {
                self.fields.extend_from_slice(b",\"");
                self.fields.extend_from_slice(name.as_bytes());
                self.fields.extend_from_slice(b"\":");
            }
            LogFormat::Text => {
                self.fields.push(b' ');
                self.fields.extend_from_slice(name.as_bytes());
                self.fields.push(b'=');
            }
        }
    }

    /// A string value, quoted and escaped as the format needs.
    fn string(&mut self, value: &str) {
        match self.format {
            LogFormat::Json => json_string(self.fields, value),
            LogFormat::Text => logfmt_value(self.fields, value),
        }
    }
}

impl Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.write_message(value);
        }
        self.key(field.name());
        self.string(value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field.name());
        itoa(self.fields, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field.name());
        if value < 0 {
            self.fields.push(b'-');
        }
        itoa(self.fields, value.unsigned_abs());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field.name());
        self.fields.extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field.name());
        if value.is_finite() {
            let _ = write!(Bytes(self.fields), "{value}");
        } else {
            self.string(&value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // Display values (`%x`) arrive here too, formatted by Debug. They
        // are written in place, and re-encoded only when the scan says the
        // text needs quoting or escaping (rare: our values are names,
        // addresses and reasons).
        let json = self.format == LogFormat::Json;
        if field.name() == "message" {
            self.message_seen = true;
            if json {
                self.message.push(b'"');
            }
            let at = self.message.len();
            let _ = write!(Bytes(self.message), "{value:?}");
            let region = &self.message[at..];
            if region.iter().any(|&b| b < b' ' || b == 0x7f || (json && (b == b'"' || b == b'\\'))) {
                let text = String::from_utf8_lossy(region).into_owned();
                self.message.truncate(if json { at - 1 } else { at });
                self.write_message(&text);
            } else if json {
                self.message.push(b'"');
            }
            return;
        }
        self.key(field.name());
        let at = self.fields.len();
        let _ = write!(Bytes(self.fields), "{value:?}");
        let region = &self.fields[at..];
        let clean = if json {
            !region.iter().any(|&b| b < b' ' || b == b'"' || b == b'\\')
        } else {
            !region.is_empty()
                && region.iter().all(|&b| b > b' ' && b != b'"' && b != b'=' && b != b'\\' && b != 0x7f)
        };
        if clean {
            if json {
                self.fields.insert(at, b'"');
                self.fields.push(b'"');
            }
            return;
        }
        let text = String::from_utf8_lossy(&self.fields[at..]).into_owned();
        self.fields.truncate(at);
        self.string(&text);
    }
}

/// `std::io::Write`-free `fmt::Write` onto a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A socket address for a log field (`client = %Addr(a)`): the same text
/// as `SocketAddr`'s `Display`, written by hand in one piece.
pub struct Addr(pub SocketAddr);

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let SocketAddr::V4(a) = self.0 {
            // `255.255.255.255:65535` fits on the stack.
            let mut stack = [0u8; 21];
            let n = v4_socket_addr(&mut stack, *a.ip(), a.port());
            return f.write_str(std::str::from_utf8(&stack[..n]).map_err(|_| fmt::Error)?);
        }
        fmt::Display::fmt(&self.0, f)
    }
}

/// `a.b.c.d:port` into `out`; returns the length.
fn v4_socket_addr(out: &mut [u8; 21], ip: Ipv4Addr, port: u16) -> usize {
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        out[n..n + bytes.len()].copy_from_slice(bytes);
        n += bytes.len();
    };
    let mut buf = [0u8; 20];
    for (i, o) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            put(b".");
        }
        put(decimal(u64::from(o), &mut buf));
    }
    put(b":");
    put(decimal(u64::from(port), &mut buf));
    n
}

/// The decimal digits of `n`, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Decimal digits of `n`, appended.
fn itoa(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0u8; 20]));
}

/// `"..."` with JSON's escapes.
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let mut from = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s.as_bytes()[from..i]);
        if esc.is_empty() {
            let _ = write!(Bytes(out), "\\u{:04x}", b);
        } else {
            out.extend_from_slice(esc);
        }
        from = i + 1;
    }
    out.extend_from_slice(&s.as_bytes()[from..]);
    out.push(b'"');
}

/// A logfmt value: bare when it can be, else quoted with escapes.
fn logfmt_value(out: &mut Vec<u8>, s: &str) {
    let bare =
        !s.is_empty() && s.bytes().all(|b| b > b' ' && b != b'"' && b != b'=' && b != b'\\' && b != 0x7f);
    if bare {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c => push_escaped_control(out, c),
        }
    }
    out.push(b'"');
}

/// The message in text: as written, but one line (control characters
/// escaped).
fn escape_controls(out: &mut Vec<u8>, s: &str) {
    if !s.bytes().any(|b| b < b' ' || b == 0x7f) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for c in s.chars() {
        push_escaped_control(out, c);
    }
}

fn push_escaped_control(out: &mut Vec<u8>, c: char) {
    match c {
        '\n' => out.extend_from_slice(b"\\n"),
        '\r' => out.extend_from_slice(b"\\r"),
        '\t' => out.extend_from_slice(b"\\t"),
        c if c.is_control() => {
            let _ = write!(Bytes(out), "\\u{{{:x}}}", c as u32);
        }
        c => {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> String {
        let mut out = Vec::new();
        logfmt_value(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn logfmt_values_are_bare_only_when_unambiguous() {
        assert_eq!(text("r1"), "r1");
        assert_eq!(text("10.0.0.1:22"), "10.0.0.1:22");
        assert_eq!(text(""), "\"\"");
        assert_eq!(text("a \"quoted\" tenant"), r#""a \"quoted\" tenant""#);
        assert_eq!(text("k=v"), "\"k=v\"");
        assert_eq!(text("two\nlines"), r#""two\nlines""#);
        assert_eq!(text("back\\slash"), r#""back\\slash""#);
    }

    #[test]
    fn json_strings_parse_back_to_the_value() {
        for s in ["plain", "", "q\"uote", "back\\slash", "nl\nand\ttab\u{1}", "ünï"] {
            let mut out = Vec::new();
            json_string(&mut out, s);
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn numbers_and_addresses_match_display() {
        for n in [0u64, 7, 10, 65535, u64::MAX] {
            let mut out = Vec::new();
            itoa(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
        for a in [
            "127.0.0.1:22",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:22",
            "[fe80::1%2]:80",
            "[::ffff:10.0.0.1]:5",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(Addr(addr).to_string(), addr.to_string());
        }
    }

    #[test]
    fn a_timestamp_is_rfc3339_with_microseconds() {
        let mut out = Vec::new();
        timestamp(&mut out);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s.len(), 27, "{s}");
        assert!(s.ends_with('Z'));
        humantime::parse_rfc3339(&s).unwrap();
    }

    #[test]
    fn the_dropped_warning_is_a_line_of_either_format() {
        let j: serde_json::Value = serde_json::from_slice(&dropped_warning(LogFormat::Json, 3)).unwrap();
        assert_eq!(
            (j["level"].as_str(), j["message"].as_str(), j["dropped"].as_u64()),
            (Some("WARN"), Some("log lines dropped"), Some(3))
        );
        let t = String::from_utf8(dropped_warning(LogFormat::Text, 3)).unwrap();
        assert!(t.ends_with("Z  WARN log lines dropped dropped=3\n"), "{t}");
    }
}

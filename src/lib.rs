//! portgate: a TCP port-range forwarding proxy for private maintenance lines.

pub mod config;
pub mod proxy_protocol;

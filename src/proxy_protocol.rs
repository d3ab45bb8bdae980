//! PROXY protocol v1/v2 header parsing (stub; replaced by the parser work).
use std::net::SocketAddr;
pub const MAX_HEADER_LEN: usize = 4096;
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command { Local, Proxy }
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub command: Command,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub vpc_endpoint: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError { #[error("not proxy")] NotProxy, #[error("too long")] TooLong }
pub fn parse(_buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> { todo!() }
pub fn encode_v1(_addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> { todo!() }
pub fn encode_v2(_command: Command, _addrs: Option<(SocketAddr, SocketAddr)>, _vpc_endpoint: Option<&str>, _extra_tlvs: &[(u8, &[u8])]) -> Vec<u8> { todo!() }

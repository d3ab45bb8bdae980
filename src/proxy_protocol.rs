//! PROXY protocol v1/v2 header parsing (skeleton).

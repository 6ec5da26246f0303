//! ringmail-bgp-glue: the anycast glue's I/O half.
#![forbid(unsafe_code)]

pub mod glue;
pub mod netlink;
pub mod speaker;

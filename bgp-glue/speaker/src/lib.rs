//! ringmail-bgp-glue: the anycast glue's I/O half.
#![forbid(unsafe_code)]

pub mod netlink;

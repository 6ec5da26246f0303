//! ringmail-mx: the MX role (to be written).
#![forbid(unsafe_code)]

pub mod config;
pub mod proxy;
pub mod runtime;
pub mod tls;
pub mod session;
pub mod admin;

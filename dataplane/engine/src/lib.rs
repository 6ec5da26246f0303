//! # ringmail-dataplane (in progress)
pub mod healthcheck;
pub mod runtime;

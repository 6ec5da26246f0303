//! Originate-only BGP session state machine (RFC 4271), without I/O.
//!
//! To be written: see the module plan in the crate docs.

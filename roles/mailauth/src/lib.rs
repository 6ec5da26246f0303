//! ringmail-mailauth: sender authentication checks (to be written).
#![forbid(unsafe_code)]

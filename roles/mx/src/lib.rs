//! ringmail-mx: the MX role (to be written).
#![forbid(unsafe_code)]

//! ringmail-smtp: the I/O-free SMTP core (to be written).
#![forbid(unsafe_code)]

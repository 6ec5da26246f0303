//! ringmail-queue: the durable spool (to be written).
#![forbid(unsafe_code)]

//! Session core (in progress).

//! [`Secret`]: a password that never shows up in `Debug` output or error strings, shared with
//! the SMTP core (LOGIN and AUTHENTICATE PLAIN passwords here, AUTH PLAIN/LOGIN there).

pub use ringmail_smtp::secret::Secret;

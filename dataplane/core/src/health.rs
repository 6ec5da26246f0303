//! Health checking, I/O-free. (API skeleton: filled in by the health-check work.)

/// What a health check does against a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckKind {
    /// TCP connect succeeds.
    #[default]
    Tcp,
    /// Read the 220 banner, EHLO, QUIT.
    Smtp,
    /// Banner, EHLO, STARTTLS, TLS handshake, QUIT.
    SmtpStarttls,
    /// Read the `* OK` greeting, LOGOUT.
    Imap,
    /// TLS handshake (IMAPS, submissions).
    Tls,
}

/// Rise/fall hysteresis for one backend.
#[derive(Debug, Clone)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    up: bool,
    streak: u32,
}

impl RiseFall {
    pub fn new(rise: u32, fall: u32, up: bool) -> Self {
        RiseFall { rise, fall, up, streak: 0 }
    }
    pub fn is_up(&self) -> bool {
        self.up
    }
    /// Records one check result; returns `Some(new_state)` when the state changes.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        let _ = (self.rise, self.fall, self.streak, ok);
        None
    }
}

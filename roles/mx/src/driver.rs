//! The socket side of one SMTP session, shared by the roles: feeds the I/O-free [`Server`] core
//! with the bytes read, writes its replies, enforces the command and data timeouts, and hands
//! every event to the role's [`Policy`] (the MX's or the MSA's).
//!
//! ```text
//!   socket ──read (timeout)──▶ Server core ──events──▶ Policy (role: verdicts, spool, checks)
//!   socket ◀──replies──────────┘         ◀──accept/reject/data_committed──┘
//! ```

use std::future::Future;
use std::io;
use std::time::Duration;

use ringmail_smtp::{Event, Server};

use crate::runtime::before;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most bytes taken from the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// How a drive ended.
pub(crate) enum Next {
    Closed,
    /// STARTTLS was accepted: do the handshake, call `tls_established`, drive again.
    StartTls,
}

/// What a role decides. Events that need a verdict must get one (`accept`, `reject`,
/// `auth_result`, `data_committed`) before the handler returns.
pub(crate) trait Policy {
    fn command_timeout(&self) -> Duration;
    fn data_timeout(&self) -> Duration;
    /// Helo, MailFrom, RcptTo, DataChunk, Auth*, Reset, Quit.
    fn on_event(&mut self, server: &mut Server, event: Event) -> impl Future<Output = ()>;
    /// DATA got 354 (or the first BDAT chunk arrived): open the spool file.
    fn on_data_start(&mut self, server: &mut Server);
    /// The message is complete: check, commit, reply. Returns whether it was queued.
    fn on_data_end(&mut self, server: &mut Server) -> impl Future<Output = bool>;
    /// The core refused the message being received; drop what was spooled.
    fn on_data_aborted(&mut self, reason: ringmail_smtp::AbortReason);
    /// A queued message's 250 could not be written: it may come again (duplicate).
    fn on_ack_maybe_lost(&mut self);
    /// The connection ended (EOF or error) with a transaction open: drop it.
    fn on_disconnect(&mut self);
    /// The role wants the session closed now (e.g. too many failed logins).
    fn wants_close(&self) -> bool {
        false
    }
    /// STARTTLS completed: the session starts over under TLS (forget logins, transactions).
    fn tls_started(&mut self) {}
}

/// Runs a plaintext session (port 25/587 style) to its end, with the STARTTLS handshake
/// (`acceptor`, 30 s) when the client asks for it and the rest of the session under TLS.
pub(crate) async fn serve_with_starttls<P: Policy>(
    mut stream: tokio::net::TcpStream,
    server: &mut Server,
    policy: &mut P,
    acceptor: tokio_rustls::TlsAcceptor,
    client: std::net::IpAddr,
) {
    match drive(&mut stream, server, policy).await {
        Ok(Next::StartTls) => {
            match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(stream)).await {
                Ok(Ok(mut tls)) => {
                    policy.tls_started();
                    server.tls_established();
                    let _ = drive(&mut tls, server, policy).await;
                    let _ = tls.shutdown().await;
                }
                Ok(Err(e)) => tracing::debug!(%client, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%client, "TLS handshake timed out"),
            }
        }
        // Plain TCP: dropping the stream closes it and the FIN follows the last reply (a
        // shutdown first would only cost a syscall, usually failing after the client's QUIT).
        Ok(Next::Closed) => {}
        Err(e) => tracing::debug!(%client, error = %e, "session ended"),
    }
}

/// Writes every reply the core has queued.
pub(crate) async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    server: &mut Server,
) -> io::Result<()> {
    let mut wrote = false;
    while let Some(bytes) = server.poll_transmit() {
        stream.write_all(&bytes).await?;
        wrote = true;
    }
    if wrote {
        stream.flush().await?;
    }
    Ok(())
}

/// Runs the core over `stream` until the session ends or STARTTLS needs a handshake. Every
/// queued reply is written before it returns `Closed`; closing the stream is the caller's.
pub(crate) async fn drive<S, P>(
    stream: &mut S,
    server: &mut Server,
    policy: &mut P,
) -> io::Result<Next>
where
    S: AsyncRead + AsyncWrite + Unpin,
    P: Policy,
{
    let mut data_deadline: Option<tokio::time::Instant> = None;
    // One timer for the whole session, moved before every read (a new one per read would be
    // registered with and removed from the runtime's timer wheel each time).
    let mut timer = std::pin::pin!(tokio::time::sleep(policy.command_timeout()));
    loop {
        while let Some(event) = server.poll_event() {
            match event {
                Event::StartTls => {
                    flush(stream, server).await?;
                    return Ok(Next::StartTls);
                }
                Event::DataStart => {
                    data_deadline = Some(tokio::time::Instant::now() + policy.data_timeout());
                    policy.on_data_start(server);
                }
                Event::DataEnd => {
                    data_deadline = None;
                    let committed = policy.on_data_end(server).await;
                    // The 250 must reach the client; if writing it fails the message is queued
                    // anyway and may come again: the role counts it (possible duplicate).
                    if let Err(e) = flush(stream, server).await {
                        if committed {
                            policy.on_ack_maybe_lost();
                        }
                        return Err(e);
                    }
                }
                Event::DataAborted { reason } => {
                    data_deadline = None;
                    policy.on_data_aborted(reason);
                }
                event @ (Event::AuthPlain { .. }
                | Event::AuthLogin { .. }
                | Event::AuthSasl { .. }) => {
                    // A login verdict may be slow (hashing, failure delay): send what is queued.
                    flush(stream, server).await?;
                    policy.on_event(server, event).await;
                }
                other => policy.on_event(server, other).await,
            }
        }
        flush(stream, server).await?;
        if server.should_close() || policy.wants_close() {
            // The replies are written; the caller closes the stream (a TLS caller sends its
            // close_notify first, a plain TCP one just drops it).
            return Ok(Next::Closed);
        }
        let deadline =
            data_deadline.unwrap_or_else(|| tokio::time::Instant::now() + policy.command_timeout());
        // Read straight into the core's input buffer: no buffer of our own to zero per
        // session, no copy.
        let read = {
            let mut space = server.input_space(READ_SIZE);
            before(timer.as_mut(), deadline, stream.read_buf(&mut space)).await
        };
        match read {
            Ok(Ok(0)) => {
                policy.on_disconnect();
                return Ok(Next::Closed);
            }
            Ok(Ok(n)) => server.received(n),
            Ok(Err(e)) => {
                policy.on_disconnect();
                return Err(e);
            }
            Err(_) => {
                server.timeout();
                data_deadline = None;
            }
        }
    }
}

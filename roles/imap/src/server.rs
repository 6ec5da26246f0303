//! A tokio driver for [`Session`] (cargo feature `server`): TCP accept, implicit TLS (993)
//! or STARTTLS (143) with tokio-rustls, login through an async [`Backend`] that hands out
//! the user's [`MailStore`], and IDLE wake-ups by polling the store every
//! [`ServerConfig::idle_poll`].
//!
//! Every call into the session (which may call the synchronous store) runs on tokio's
//! blocking pool, so a slow disk does not stall other connections.
//!
//! Limitation: output is written as the session produces it, without backpressure inside a
//! command (a `FETCH 1:* BODY[]` of a large mailbox is produced whole before it is sent).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::secret::Secret;
use crate::session::{Config, Event, Session};
use crate::store::MailStore;

/// What a login resolves to: the user's store, or `None` for bad credentials.
pub type LoginFuture = Pin<Box<dyn Future<Output = Option<Box<dyn MailStore>>> + Send>>;

/// Checks credentials and opens the user's store (the store factory).
pub trait Backend: Send + Sync + 'static {
    /// Checks `user`/`password`; on success returns a new store handle for this session.
    fn login(&self, user: String, password: Secret) -> LoginFuture;
}

/// Driver settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Session limits and offers. `offer_starttls` is ignored: the driver offers STARTTLS
    /// on plaintext listeners exactly when it has a TLS configuration.
    pub session: Config,
    /// Certificates for implicit TLS and STARTTLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How often the store is polled during IDLE.
    pub idle_poll: Duration,
    /// Inactivity before the session is logged out (RFC 9051: at least 30 minutes).
    pub inactivity: Duration,
    /// Time from connect (TLS handshake included) within which a client must log in, or
    /// it is sent BYE and disconnected (Dovecot: about 3 minutes).
    pub login_timeout: Duration,
    /// Longest TLS handshake (implicit TLS and STARTTLS).
    pub tls_handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            session: Config::default(),
            tls: None,
            idle_poll: Duration::from_millis(500),
            inactivity: Duration::from_secs(30 * 60),
            login_timeout: Duration::from_secs(180),
            tls_handshake_timeout: Duration::from_secs(20),
        }
    }
}

/// Errors that end the accept loop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Implicit TLS without a TLS configuration.
    #[error("implicit TLS needs a TLS configuration")]
    NoTls,
    /// Accepting failed.
    #[error("accept failed: {0}")]
    Accept(#[from] io::Error),
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Gone,
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Gone => Ok(0),
        }
    }

    /// True if input is already decrypted and waiting in the TLS layer (or the TLS layer has
    /// something to report, such as an error or the peer's close), so that the socket need
    /// not become readable for a read to return.
    fn input_buffered(&mut self) -> bool {
        match self {
            Conn::Tls(s) => s.get_mut().1.process_new_packets().map_or(true, |st| {
                st.plaintext_bytes_to_read() > 0 || st.peer_has_closed()
            }),
            Conn::Plain(_) | Conn::Gone => false,
        }
    }

    /// Waits for input, then reads it into a buffer allocated only once there is some: a
    /// connection waiting for its next command (in IDLE, or between commands) holds no read
    /// buffer. Cancel safe (a cancelled read leaves its bytes in the socket or the TLS layer).
    async fn read_input(&mut self) -> io::Result<Vec<u8>> {
        if !self.input_buffered() {
            match self {
                Conn::Plain(s) => s.readable().await?,
                Conn::Tls(s) => s.get_ref().0.readable().await?,
                Conn::Gone => return Ok(Vec::new()),
            }
        }
        let mut buf = vec![0u8; READ_SIZE];
        let n = self.read(&mut buf).await?;
        buf.truncate(n);
        Ok(buf)
    }

    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(buf).await,
            Conn::Tls(s) => s.write_all(buf).await,
            Conn::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush().await,
            Conn::Tls(s) => s.flush().await,
            Conn::Gone => Ok(()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Gone => Ok(()),
        };
    }
}

/// Accepts connections until the listener fails. `implicit_tls`: port 993 style.
pub async fn serve(
    listener: TcpListener,
    implicit_tls: bool,
    cfg: Arc<ServerConfig>,
    backend: Arc<dyn Backend>,
) -> Result<(), ServerError> {
    if implicit_tls && cfg.tls.is_none() {
        return Err(ServerError::NoTls);
    }
    loop {
        let (tcp, _) = listener.accept().await?;
        let cfg = cfg.clone();
        let backend = backend.clone();
        tokio::spawn(async move {
            let _ = connection(tcp, implicit_tls, cfg, backend).await;
        });
    }
}

/// Runs `f` on the session on the blocking pool. Not an `async fn`: the session moves into
/// the blocking task at once, so the returned future holds only the join handle (an `async
/// fn` would keep a slot for its `Session` argument inside every connection's future).
fn blocking<F>(mut s: Session, f: F) -> impl Future<Output = io::Result<Session>>
where
    F: FnOnce(&mut Session) + Send + 'static,
{
    let task = tokio::task::spawn_blocking(move || {
        f(&mut s);
        s
    });
    async move { task.await.map_err(io::Error::other) }
}

/// Bytes read at once. TLS records are up to 16 KiB and simply take several reads.
const READ_SIZE: usize = 4 * 1024;

/// Output is gathered into writes of up to this size: one TLS record and one system call
/// per write, not one per response line (`FETCH 1:* (FLAGS)` is one line per message).
const WRITE_CHUNK: usize = 16 * 1024;

/// Sends everything the session has queued, in writes of up to [`WRITE_CHUNK`] bytes. The
/// gathering buffer lives only as long as the call (an idle session keeps none).
async fn write_out(conn: &mut Conn, s: &mut Session) -> io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    while let Some(b) = s.poll_transmit() {
        if pending.len() + b.len() > WRITE_CHUNK && !pending.is_empty() {
            conn.write_all(&pending).await?;
            pending.clear();
        }
        if b.len() >= WRITE_CHUNK {
            conn.write_all(&b).await?;
        } else {
            if pending.capacity() == 0 {
                pending.reserve(WRITE_CHUNK);
            }
            pending.extend_from_slice(&b);
        }
    }
    if !pending.is_empty() {
        conn.write_all(&pending).await?;
    }
    Ok(())
}

/// A TLS handshake, at most `limit` long. The handshake's state is boxed so that it does
/// not size the connection future (the task every connection keeps for its whole life).
async fn handshake(a: &TlsAcceptor, tcp: TcpStream, limit: Duration) -> io::Result<Conn> {
    match tokio::time::timeout(limit, Box::pin(a.accept(tcp))).await {
        Ok(tls) => Ok(Conn::Tls(Box::new(tls?))),
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Refuses a connection: the TLS handshake on implicit TLS ports, then `* BYE <text>` and
/// close (for example over a connection limit).
pub async fn refuse(
    tcp: TcpStream,
    implicit_tls: bool,
    cfg: &ServerConfig,
    text: &str,
) -> io::Result<()> {
    let mut conn = match (&cfg.tls, implicit_tls) {
        (Some(t), true) => {
            handshake(
                &TlsAcceptor::from(t.clone()),
                tcp,
                cfg.tls_handshake_timeout,
            )
            .await?
        }
        (None, true) => return Err(io::ErrorKind::InvalidInput.into()),
        _ => Conn::Plain(tcp),
    };
    conn.write_all(format!("* BYE {text}\r\n").as_bytes())
        .await?;
    conn.flush().await?;
    conn.shutdown().await;
    Ok(())
}

/// Drives one connection to its end.
pub async fn connection(
    tcp: TcpStream,
    implicit_tls: bool,
    cfg: Arc<ServerConfig>,
    backend: Arc<dyn Backend>,
) -> io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let login_deadline = tokio::time::Instant::now() + cfg.login_timeout;
    let acceptor = cfg.tls.clone().map(TlsAcceptor::from);
    let mut conn = match (&acceptor, implicit_tls) {
        (Some(a), true) => {
            let limit = cfg.tls_handshake_timeout.min(cfg.login_timeout);
            handshake(a, tcp, limit).await?
        }
        (None, true) => return Err(io::ErrorKind::InvalidInput.into()),
        _ => Conn::Plain(tcp),
    };
    let session_cfg = Arc::new(Config {
        offer_starttls: acceptor.is_some(),
        ..cfg.session.clone()
    });
    let mut s = Session::new(session_cfg, implicit_tls, Instant::now());
    let mut last_input = tokio::time::Instant::now();
    loop {
        // Output first, then driver actions, until the session is quiet.
        loop {
            write_out(&mut conn, &mut s).await?;
            conn.flush().await?;
            let Some(ev) = s.poll_event() else { break };
            match ev {
                Event::StartTls => {
                    let Some(a) = &acceptor else {
                        return Ok(());
                    };
                    let Conn::Plain(tcp) = std::mem::replace(&mut conn, Conn::Gone) else {
                        return Ok(());
                    };
                    // Bytes the client sent after STARTTLS are still in the socket: the TLS
                    // handshake reads them, so injected plaintext fails the handshake.
                    conn = handshake(a, tcp, cfg.tls_handshake_timeout).await?;
                    s.tls_established();
                }
                Event::Login { user, password } => {
                    let store = backend.login(user, password).await;
                    s = blocking(s, move |s| s.login_result(store)).await?;
                }
                Event::Idle => {}
            }
        }
        if s.should_close() {
            conn.shutdown().await;
            return Ok(());
        }
        let throttle = s.poll_timeout();
        let idling = s.is_idling();
        let inactivity = if s.is_authenticated() {
            last_input + cfg.inactivity
        } else {
            (last_input + cfg.inactivity).min(login_deadline)
        };
        tokio::select! {
            r = conn.read_input(), if throttle.is_none() => {
                let data = r?;
                if data.is_empty() {
                    return Ok(());
                }
                last_input = tokio::time::Instant::now();
                s = blocking(s, move |s| s.receive(&data, Instant::now())).await?;
            }
            _ = tokio::time::sleep_until(throttle.map_or(inactivity, tokio::time::Instant::from_std)), if throttle.is_some() => {
                s = blocking(s, |s| s.handle_timeout(Instant::now())).await?;
            }
            _ = tokio::time::sleep(cfg.idle_poll), if idling => {
                s = blocking(s, |s| s.changes_available()).await?;
            }
            _ = tokio::time::sleep_until(inactivity) => {
                s.timeout();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoLogin;

    impl Backend for NoLogin {
        fn login(&self, _user: String, _password: Secret) -> LoginFuture {
            Box::pin(async { None })
        }
    }

    /// The connection future is the task every session keeps for its whole life, idle or not.
    #[tokio::test]
    async fn connection_task_is_small() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tcp = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let fut = connection(
            tcp,
            false,
            Arc::new(ServerConfig::default()),
            Arc::new(NoLogin),
        );
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        eprintln!(
            "rustls::ServerConnection: {} bytes, TlsStream: {} bytes, Session: {} bytes",
            std::mem::size_of::<rustls::ServerConnection>(),
            std::mem::size_of::<TlsStream<TcpStream>>(),
            std::mem::size_of::<Session>()
        );
        // 1,208 bytes with rustc 1.95 (debug); the TLS handshake alone would add over 1 KB.
        assert!(size <= 2048, "{size}");
    }
}

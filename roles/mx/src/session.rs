//! One inbound SMTP session: the I/O-free [`Server`] core driven over a socket, with the MX's
//! policy (our domains only, sender checks, rate limits) and the durable spool.
//!
//! ```text
//!  socket ─▶ [PROXY header from a trusted LB] ─▶ limits, DNSBL, iprev ─▶ 220
//!        ─▶ Server core ─events─▶ HELO: record │ MAIL: rate, SPF │ RCPT: our domains only
//!                                 DATA chunks ─▶ spool file (streamed) + bounded copy for DKIM
//!                                 end of data ─▶ DKIM/ARC/DMARC ─▶ commit (fsync) ─▶ 250 queued
//!        ◀─ replies ◀─────────────┘            STARTTLS: handshake, core resets
//! ```

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ringmail_mailauth::{AuthResult, Checker, IprevOutcome, SpfOutcome};
use ringmail_proxy_core::ratelimit::SourceRateLimiter;
use ringmail_queue::{
    BodyType, ClientInfo, Incoming, NewEnvelope, NewRecipient, Notify, Ret, Spool,
};
use ringmail_smtp::{
    Body, Domain, DsnNotify, DsnRet, Event, MailParams, Mailbox, RcptParams, Reply, Server,
    ServerConfig,
};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::admin::MxStats;
use crate::arfilter::ArFilter;
use crate::config::{Enforce, MxConfig};
use crate::driver::{Policy, flush};
use crate::limits::{ConnLimits, ConnSlot, Refused};
use crate::tls::TlsStore;

/// Everything the sessions of all workers share.
pub struct Mx {
    pub cfg: Arc<MxConfig>,
    pub smtp: Arc<ServerConfig>,
    pub spool: Spool,
    pub checker: Option<Checker>,
    /// Refuses unknown users at RCPT when set.
    pub accounts: Option<ringmail_accounts::Accounts>,
    pub tls: Arc<TlsStore>,
    pub stats: Arc<MxStats>,
    pub conn_rate: Option<SourceRateLimiter>,
    pub msg_rate: Option<SourceRateLimiter>,
    limits: ConnLimits,
    epoch: Instant,
    /// Wakes the relay when a message was queued.
    pub queued: Arc<tokio::sync::Notify>,
}

impl Mx {
    pub fn new(
        cfg: Arc<MxConfig>,
        spool: Spool,
        checker: Option<Checker>,
        accounts: Option<ringmail_accounts::Accounts>,
        tls: Arc<TlsStore>,
        stats: Arc<MxStats>,
    ) -> Mx {
        let smtp = Arc::new(ServerConfig {
            hostname: cfg.hostname.clone(),
            max_message_size: cfg.max_message_size,
            max_recipients: cfg.max_recipients,
            offer_starttls: true,
            offer_auth: false,
            ..ServerConfig::default()
        });
        Mx {
            limits: ConnLimits::new(cfg.max_connections, cfg.max_connections_per_ip),
            conn_rate: cfg
                .connection_rate
                .map(|r| SourceRateLimiter::new(r.max, r.period)),
            msg_rate: cfg
                .message_rate
                .map(|r| SourceRateLimiter::new(r.max, r.period)),
            cfg,
            smtp,
            spool,
            checker,
            accounts,
            tls,
            stats,
            epoch: Instant::now(),
            queued: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn since_epoch(&self) -> Duration {
        self.epoch.elapsed()
    }
}

/// A session in the active gauge while it lives (and, once admitted, in the connection
/// limits).
struct Slot<'a> {
    mx: &'a Mx,
    _limits: Option<ConnSlot<'a>>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.mx
            .stats
            .sessions_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The mail transaction being received.
struct Txn {
    sender: Option<String>,
    params: MailParams,
    spf: Option<SpfOutcome>,
    recipients: Vec<(String, RcptParams)>,
    /// [`envelope_key`] of each of `recipients`.
    recipient_keys: HashSet<String>,
    incoming: Option<Incoming>,
    /// Bounded in-memory copy for DKIM/DMARC (the whole message up to the checker's limit,
    /// else the header section only).
    copy: Vec<u8>,
    copy_complete: bool,
    bytes: u64,
    /// Drops forged `Authentication-Results` in our name from what is spooled.
    ar_filter: Option<ArFilter>,
    filtered: Vec<u8>,
}

impl Txn {
    fn new(sender: Option<String>, params: MailParams, spf: Option<SpfOutcome>) -> Txn {
        Txn {
            sender,
            params,
            spf,
            recipients: Vec::new(),
            recipient_keys: HashSet::new(),
            incoming: None,
            copy: Vec::new(),
            copy_complete: true,
            bytes: 0,
            ar_filter: None,
            filtered: Vec::new(),
        }
    }
}

/// Per-session state outside the protocol core.
struct Ctx<'a> {
    mx: &'a Mx,
    client: SocketAddr,
    helo: String,
    iprev: Option<IprevOutcome>,
    txn: Option<Txn>,
    tls: bool,
    messages: u32,
}

/// Runs one session on an accepted connection.
pub async fn run(mx: Arc<Mx>, mut stream: TcpStream, peer: SocketAddr, _local: SocketAddr) {
    let mx = &*mx;
    MxStats::inc(&mx.stats.sessions);
    mx.stats.sessions_active.fetch_add(1, Ordering::Relaxed);
    let mut slot = Slot { mx, _limits: None };

    // The real client: from the PROXY header when the peer is one of our LBs.
    let trusted = mx.cfg.trusted_proxies.iter().any(|c| c.contains(peer.ip()));
    let mut early = Vec::new();
    let client = if trusted {
        match crate::proxy::read_header(&mut stream, Duration::from_secs(10)).await {
            Ok(info) => {
                early = info.rest;
                info.client.unwrap_or(peer)
            }
            Err(e) => {
                MxStats::inc(&mx.stats.refused_proxy);
                warn!(%peer, error = %e, "refused: a trusted proxy sent no valid PROXY header");
                return;
            }
        }
    } else {
        peer
    };
    let ip = client.ip();

    let mut server = Server::new(Arc::clone(&mx.smtp), false);
    match admission(mx, ip) {
        Ok(admitted) => slot._limits = Some(admitted),
        Err(refusal) => {
            MxStats::inc(&mx.stats.refused_rate);
            server.refuse_connection(refusal.0, refusal.1, &refusal.2);
            let _ = flush(&mut stream, &mut server).await;
            return;
        }
    }

    let mut ctx = Ctx {
        mx,
        client,
        helo: String::new(),
        iprev: None,
        txn: None,
        tls: false,
        messages: 0,
    };
    if let Some(checker) = &mx.checker {
        if let Some(zone) = dnsbl_listed(checker, &mx.cfg.checks.dnsbl, ip).await {
            MxStats::inc(&mx.stats.refused_connect);
            info!(client = %ip, zone, "refused: listed in a DNSBL");
            server.refuse_connection(
                554,
                "5.7.1",
                &format!("Service unavailable; client [{ip}] blocked using {zone}"),
            );
            let _ = flush(&mut stream, &mut server).await;
            return;
        }
        let iprev = checker.iprev(ip).await;
        if mx.cfg.checks.iprev == Enforce::Reject && iprev.result != AuthResult::Pass {
            MxStats::inc(&mx.stats.refused_connect);
            server.refuse_connection(
                450,
                "4.7.25",
                &format!("Client host rejected: cannot find your hostname, [{ip}]"),
            );
            let _ = flush(&mut stream, &mut server).await;
            return;
        }
        ctx.iprev = Some(iprev);
    }

    server.greet();
    if !early.is_empty() {
        server.receive(&early);
    }
    crate::driver::serve_with_starttls(stream, &mut server, &mut ctx, mx.tls.acceptor(), ip).await;
    drop(ctx);
}

/// Connection-level limits: global, per address, rate.
fn admission(mx: &Mx, ip: IpAddr) -> Result<ConnSlot<'_>, (u16, &'static str, String)> {
    let too_many = |what: &str| {
        (
            421,
            "4.7.0",
            format!("{} Error: too many connections{what}", mx.cfg.hostname),
        )
    };
    let slot = mx.limits.admit(ip).map_err(|r| match r {
        Refused::Total => too_many(""),
        Refused::PerAddress => too_many(&format!(" from {ip}")),
    })?;
    if let Some(limiter) = &mx.conn_rate
        && !limiter.allow(ip, mx.since_epoch())
    {
        return Err((
            421,
            "4.7.0",
            format!(
                "{} Error: too many connections from {ip}; slow down",
                mx.cfg.hostname
            ),
        ));
    }
    Ok(slot)
}

async fn dnsbl_listed(checker: &Checker, zones: &[String], ip: IpAddr) -> Option<String> {
    for zone in zones {
        if checker.dnsbl_listed(ip, zone).await {
            return Some(zone.clone());
        }
    }
    None
}

impl Policy for Ctx<'_> {
    fn tls_started(&mut self) {
        MxStats::inc(&self.mx.stats.tls_sessions);
        self.tls = true;
    }

    fn command_timeout(&self) -> Duration {
        self.mx.cfg.command_timeout
    }

    fn data_timeout(&self) -> Duration {
        self.mx.cfg.data_timeout
    }

    async fn on_event(&mut self, server: &mut Server, event: Event) {
        on_event(server, self, event).await
    }

    fn on_data_start(&mut self, server: &mut Server) {
        on_data_start(server, self)
    }

    async fn on_data_end(&mut self, server: &mut Server) -> bool {
        on_data_end(server, self).await
    }

    fn on_data_aborted(&mut self, reason: ringmail_smtp::AbortReason) {
        debug!(client = %self.client.ip(), ?reason, "message refused by the protocol core");
        MxStats::inc(&self.mx.stats.refused_other);
        self.txn = None;
    }

    fn on_ack_maybe_lost(&mut self) {
        self.mx.spool.note_ack_maybe_lost();
        MxStats::inc(&self.mx.stats.acks_maybe_lost);
    }

    fn on_disconnect(&mut self) {
        self.txn = None;
    }
}

async fn on_event(server: &mut Server, ctx: &mut Ctx<'_>, event: Event) {
    match event {
        Event::Helo { name, .. } => {
            ctx.helo = name;
            ctx.txn = None;
            server.accept();
        }
        Event::MailFrom {
            reverse_path,
            params,
        } => on_mail(server, ctx, reverse_path, params).await,
        Event::RcptTo {
            forward_path,
            params,
        } => on_rcpt(server, ctx, &forward_path, params).await,
        Event::DataChunk(bytes) => on_chunk(ctx, &bytes),
        Event::AuthPlain { .. } | Event::AuthLogin { .. } | Event::AuthSasl { .. } => {
            server.auth_result(false)
        }
        Event::Reset => ctx.txn = None,
        Event::Quit => {}
        // Handled by the caller.
        Event::StartTls | Event::DataStart | Event::DataEnd | Event::DataAborted { .. } => {}
    }
}

async fn on_mail(
    server: &mut Server,
    ctx: &mut Ctx<'_>,
    reverse_path: Option<Mailbox>,
    params: MailParams,
) {
    let mx = ctx.mx;
    let ip = ctx.client.ip();
    if let Some(limiter) = &mx.msg_rate
        && !limiter.allow(ip, mx.since_epoch())
    {
        MxStats::inc(&mx.stats.refused_rate);
        server.reject(Reply::new(
            450,
            "4.7.1",
            "Error: too many messages from your address; try again later",
        ));
        return;
    }
    let sender = reverse_path.map(|m| m.raw().to_string());
    let spf = match &mx.checker {
        Some(checker) => {
            let spf = checker.spf(ip, &ctx.helo, sender.as_deref()).await;
            if spf.result == AuthResult::Fail && mx.cfg.checks.spf_fail == Enforce::Reject {
                MxStats::inc(&mx.stats.refused_spf);
                info!(client = %ip, sender = sender.as_deref().unwrap_or("<>"), domain = %spf.domain, "refused: SPF fail");
                server.reject(Reply::new(
                    550,
                    "5.7.23",
                    &format!("SPF validation failed for {}", printable(&spf.domain)),
                ));
                return;
            }
            Some(spf)
        }
        None => None,
    };
    ctx.txn = Some(Txn::new(sender, params, spf));
    server.accept();
}

/// Printable ASCII only, for echoing attacker-supplied text in a reply.
/// What makes two recipients of one transaction the same envelope recipient: the local part
/// as written, the domain ignoring case. A duplicate RCPT still gets its 250 but is queued
/// once (as Postfix's cleanup does with `duplicate_filter_limit`).
pub(crate) fn envelope_key(rcpt: &Mailbox) -> String {
    match rcpt.domain() {
        Domain::Name(d) => format!("{}@{}", rcpt.local(), d.to_ascii_lowercase()),
        _ => rcpt.raw().to_string(),
    }
}

pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect()
}

/// Our domains only, and none of the tricks that would make a relay of us.
fn relay_verdict(mx: &Mx, rcpt: &Mailbox) -> Result<(), Reply> {
    let denied = || Reply::new(550, "5.7.1", "Relay access denied");
    let domain = match rcpt.domain() {
        Domain::Name(d) => d,
        // IP literals are never one of our domains.
        _ => return Err(denied()),
    };
    let ours = mx.cfg.is_local_domain(domain)
        || (rcpt.local().eq_ignore_ascii_case("postmaster")
            && domain.eq_ignore_ascii_case(&mx.cfg.hostname));
    if !ours {
        return Err(denied());
    }
    // `user%other@ours`, `other!user@ours`, `"user@other"@ours`: routing through us.
    if rcpt.local_has_routing_chars() || rcpt.local_is_quoted() {
        return Err(denied());
    }
    Ok(())
}

/// With an account store: the recipient must be an account or an alias (Postfix's
/// `local_recipient_maps`), so unknown users are refused now instead of bounced later
/// (backscatter).
async fn recipient_verdict(mx: &Mx, rcpt: &Mailbox) -> Result<(), Reply> {
    match &mx.accounts {
        Some(accounts) => known_recipient(accounts, rcpt).await,
        None => Ok(()),
    }
}

/// The verdict on a recipient in one of our domains (the MX, and the MSA's
/// `smtpd_reject_unlisted_recipient`): an account or an alias of the store, also with a
/// detail (`user+detail@`, which the MDA files into a folder); `550 5.1.1` otherwise, `451
/// 4.3.0` when the store cannot be asked. Postmaster is always accepted (RFC 5321 section
/// 4.5.1); a disabled account is unknown.
pub(crate) async fn known_recipient(
    accounts: &ringmail_accounts::Accounts,
    rcpt: &Mailbox,
) -> Result<(), Reply> {
    if rcpt.local().eq_ignore_ascii_case("postmaster") {
        return Ok(());
    }
    let address = match rcpt.domain() {
        Domain::Name(d) => format!("{}@{}", rcpt.local(), d),
        _ => return Err(Reply::new(550, "5.7.1", "Relay access denied")),
    };
    let mut found = accounts.resolve(&address).await;
    if let Ok(None) = found
        && let (base, Some(_)) = crate::mda::split_plus(&address)
    {
        found = accounts.resolve(&base).await;
    }
    match found {
        Ok(Some(account)) if !account.disabled => Ok(()),
        Ok(_) => Err(Reply::new(
            550,
            "5.1.1",
            "Recipient address rejected: User unknown in local recipient table",
        )),
        Err(e) => {
            warn!(error = %e, "account store lookup failed");
            Err(Reply::new(
                451,
                "4.3.0",
                "Recipient address rejected: temporary lookup failure",
            ))
        }
    }
}

async fn on_rcpt(server: &mut Server, ctx: &mut Ctx<'_>, rcpt: &Mailbox, params: RcptParams) {
    if ctx.txn.is_none() {
        server.reject(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        return;
    }
    if let Err(reply) = relay_verdict(ctx.mx, rcpt) {
        MxStats::inc(&ctx.mx.stats.refused_relay);
        info!(client = %ctx.client.ip(), rcpt = %printable(rcpt.raw()), "refused: relay access denied");
        server.reject(reply);
        return;
    }
    if let Err(reply) = recipient_verdict(ctx.mx, rcpt).await {
        MxStats::inc(&ctx.mx.stats.refused_unknown_user);
        info!(client = %ctx.client.ip(), rcpt = %printable(rcpt.raw()), code = reply.code(), "refused: recipient");
        server.reject(reply);
        return;
    }
    if let Some(txn) = ctx.txn.as_mut()
        && txn.recipient_keys.insert(envelope_key(rcpt))
    {
        txn.recipients.push((rcpt.raw().to_string(), params));
    }
    server.accept();
}

fn on_data_start(server: &mut Server, ctx: &mut Ctx<'_>) {
    let Some(txn) = ctx.txn.as_mut() else {
        return;
    };
    txn.ar_filter = Some(ArFilter::new(&ctx.mx.cfg.hostname));
    match ctx.mx.spool.begin() {
        Ok(incoming) => txn.incoming = Some(incoming),
        Err(e) => {
            warn!(error = %e, "cannot start a spool file");
            // The core will get the verdict at DataEnd; remember the failure.
            txn.incoming = None;
        }
    }
    let _ = server;
}

fn on_chunk(ctx: &mut Ctx<'_>, bytes: &[u8]) {
    let limit = ctx
        .mx
        .checker
        .as_ref()
        .map_or(0, |c| c.config().max_message_bytes_for_dkim);
    let Some(txn) = ctx.txn.as_mut() else {
        return;
    };
    txn.bytes += bytes.len() as u64;
    txn.filtered.clear();
    let spooled = match txn.ar_filter.as_mut() {
        Some(f) => {
            f.push(bytes, &mut txn.filtered);
            &txn.filtered[..]
        }
        None => bytes,
    };
    if let Some(inc) = txn.incoming.as_mut()
        && let Err(e) = inc.write(spooled)
    {
        warn!(error = %e, "spool write failed");
        txn.incoming = None;
    }
    if ctx.mx.checker.is_some() {
        if txn.copy.len() + bytes.len() <= limit {
            txn.copy.extend_from_slice(bytes);
        } else {
            // Too big to verify DKIM: keep the header section only (for DMARC's From).
            txn.copy_complete = false;
            if !has_header_end(&txn.copy) {
                let room = 256 * 1024usize.saturating_sub(0);
                let take = bytes.len().min(room.saturating_sub(txn.copy.len()));
                txn.copy.extend_from_slice(&bytes[..take]);
            }
            if txn.copy.len() > 256 * 1024 {
                txn.copy.truncate(256 * 1024);
            }
        }
    }
}

fn has_header_end(b: &[u8]) -> bool {
    b.windows(4).any(|w| w == b"\r\n\r\n")
}

fn header_section(b: &[u8]) -> &[u8] {
    match b.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &b[..i + 4],
        None => b,
    }
}

/// Checks, trace headers, commit. Returns whether the message was committed.
async fn on_data_end(server: &mut Server, ctx: &mut Ctx<'_>) -> bool {
    let mx = ctx.mx;
    let Some(mut txn) = ctx.txn.take() else {
        server.reject(Reply::new(503, "5.5.1", "Error: no transaction"));
        return false;
    };
    let Some(mut incoming) = txn.incoming.take() else {
        server.reject(Reply::new(451, "4.3.0", "Error: queue file write error"));
        return false;
    };
    let ip = ctx.client.ip();
    if let Some(mut f) = txn.ar_filter.take() {
        let mut rest = Vec::new();
        f.finish(&mut rest);
        if let Err(e) = incoming.write(&rest) {
            warn!(error = %e, "spool write failed");
            incoming.abort();
            server.reject(Reply::new(451, "4.3.0", "Error: queue file write error"));
            return false;
        }
        if f.removed > 0 {
            info!(client = %ip, removed = f.removed, "removed Authentication-Results fields in our name");
        }
    }
    let mut auth_results = String::new();
    if let (Some(checker), Some(spf)) = (&mx.checker, txn.spf.as_ref()) {
        let outcome = if txn.copy_complete {
            checker
                .message(&txn.copy, ip, &ctx.helo, txn.sender.as_deref(), spf)
                .await
        } else {
            checker
                .message_too_large(header_section(&txn.copy), spf)
                .await
        };
        if outcome.dmarc_reject() && mx.cfg.checks.dmarc_reject {
            MxStats::inc(&mx.stats.refused_dmarc);
            let from = outcome.dmarc.header_from.clone().unwrap_or_default();
            info!(client = %ip, from = %printable(&from), "refused: DMARC policy reject");
            incoming.abort();
            server.reject(Reply::new(
                550,
                "5.7.1",
                &format!("Email rejected per DMARC policy for {}", printable(&from)),
            ));
            return false;
        }
        let iprev = ctx.iprev.clone().unwrap_or(IprevOutcome {
            result: AuthResult::None,
            ip,
            name: None,
            reason: None,
        });
        auth_results = checker.authentication_results(&iprev, spf, Some(&outcome));
    }
    let received = received_header(ctx, &txn, incoming.id().to_string());
    let envelope = new_envelope(ctx, &txn, format!("{received}{auth_results}"));
    let size = incoming.bytes_written();
    match incoming.commit(envelope).await {
        Ok(id) => {
            ctx.messages += 1;
            MxStats::inc(&mx.stats.messages_accepted);
            mx.stats.bytes_accepted.fetch_add(size, Ordering::Relaxed);
            mx.stats
                .recipients_accepted
                .fetch_add(txn.recipients.len() as u64, Ordering::Relaxed);
            info!(id = %id, client = %ip, sender = txn.sender.as_deref().unwrap_or("<>"), rcpts = txn.recipients.len(), size, "queued");
            server.data_committed(&id.to_string());
            mx.queued.notify_one();
            true
        }
        Err(e) => {
            warn!(error = %e, "queue commit failed");
            server.reject(Reply::new(451, "4.3.0", "Error: queue file write error"));
            false
        }
    }
}

fn received_header(ctx: &Ctx<'_>, txn: &Txn, id: String) -> String {
    let ip = ctx.client.ip();
    let rdns = ctx
        .iprev
        .as_ref()
        .and_then(|i| i.name.clone())
        .map(|n| printable(&n).replace(' ', ""))
        .unwrap_or_else(|| "unknown".into());
    let proto = match (ctx.tls, txn.params.smtputf8) {
        (true, true) => "UTF8SMTPS",
        (false, true) => "UTF8SMTP",
        (true, false) => "ESMTPS",
        (false, false) => "ESMTP",
    };
    let rcpt = if txn.recipients.len() == 1 {
        // UTF-8 is allowed in the header of an SMTPUTF8 message; controls never are.
        let r = &txn.recipients[0].0;
        let safe: String = r
            .chars()
            .filter(|c| {
                !c.is_control() && *c != '<' && *c != '>' && (txn.params.smtputf8 || c.is_ascii())
            })
            .take(300)
            .collect();
        format!("\r\n\tfor <{safe}>")
    } else {
        String::new()
    };
    format!(
        "Received: {}\r\n\tby {} (ringmail) with {proto} id {id}{rcpt};\r\n\t{}\r\n",
        received_from(&ctx.helo, &rdns, ip),
        ctx.mx.cfg.hostname,
        ringmail_queue::rfc5322_date(ringmail_queue::to_unix(std::time::SystemTime::now())),
    )
}

/// The `from HELO (RDNS [IP])` clause of a Received header: the HELO name made printable
/// without spaces or parentheses (`unknown` when empty), the address as a literal
/// (`IPv6:` prefixed for IPv6).
pub(crate) fn received_from(helo: &str, rdns: &str, ip: IpAddr) -> String {
    let helo = printable(helo).replace([' ', '(', ')'], "");
    let helo = if helo.is_empty() { "unknown" } else { &helo };
    match ip {
        IpAddr::V4(v4) => format!("from {helo} ({rdns} [{v4}])"),
        IpAddr::V6(v6) => format!("from {helo} ({rdns} [IPv6:{v6}])"),
    }
}

/// Carries RCPT parameters (NOTIFY=, ORCPT=) into the queued recipient.
pub(crate) fn apply_rcpt_params(r: &mut NewRecipient, p: &RcptParams) {
    r.orcpt = p
        .orcpt
        .as_ref()
        .map(|o| format!("{};{}", o.addr_type, o.addr));
    if let Some(list) = &p.notify {
        r.notify = Notify {
            never: list.contains(&DsnNotify::Never),
            success: list.contains(&DsnNotify::Success),
            failure: list.contains(&DsnNotify::Failure),
            delay: list.contains(&DsnNotify::Delay),
        };
    }
}

/// Carries MAIL parameters (RET=, ENVID=, BODY=, SMTPUTF8) into the queued envelope.
pub(crate) fn apply_mail_params(env: &mut NewEnvelope, p: &MailParams) {
    env.ret = p.ret.map(|r| match r {
        DsnRet::Full => Ret::Full,
        DsnRet::Hdrs => Ret::Hdrs,
    });
    env.envid = p.envid.clone();
    env.body = match p.body {
        Body::SevenBit => BodyType::SevenBit,
        Body::EightBitMime => BodyType::EightBitMime,
        Body::BinaryMime => BodyType::BinaryMime,
    };
    env.smtputf8 = p.smtputf8;
}

fn new_envelope(ctx: &Ctx<'_>, txn: &Txn, headers: String) -> NewEnvelope {
    let recipients = txn
        .recipients
        .iter()
        .map(|(addr, p)| {
            let mut r = NewRecipient::new(addr.clone());
            apply_rcpt_params(&mut r, p);
            r
        })
        .collect::<Vec<_>>();
    let mut env = NewEnvelope::new(txn.sender.clone(), recipients, "mda");
    apply_mail_params(&mut env, &txn.params);
    env.client = Some(ClientInfo {
        addr: ctx.client.to_string(),
        helo: ctx.helo.clone(),
        tls: ctx.tls,
        auth: None,
    });
    env.headers = headers;
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> String {
        envelope_key(&Mailbox::parse(s, false).expect("address"))
    }

    #[test]
    fn envelope_duplicates_compare_the_domain_ignoring_case() {
        assert_eq!(key("bob@example.test"), key("bob@EXAMPLE.test"));
        assert_eq!(key("bob@example.test"), "bob@example.test");
        // The local part is the receiving system's business (RFC 5321 2.4).
        assert_ne!(key("bob@example.test"), key("BOB@example.test"));
        assert_ne!(key("bob@example.test"), key("bob+x@example.test"));
    }
}

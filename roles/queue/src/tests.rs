//! Unit tests of the spool.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::segment::seg_name;
use crate::*;

/// A temporary directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ringmail-queue-{tag}-{}-{:x}",
            std::process::id(),
            crate::id::random_u64()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(dir: &TempDir) -> (Spool, RecoveryReport) {
    let mut cfg = QueueConfig::new(dir.path());
    cfg.hostname = "mx.example.net".into();
    Spool::open(cfg).unwrap()
}

/// A spool where every message gets its own files (no segments).
fn open_files(dir: &TempDir) -> (Spool, RecoveryReport) {
    let mut cfg = QueueConfig::new(dir.path());
    cfg.hostname = "mx.example.net".into();
    cfg.inline_max = 0;
    Spool::open(cfg).unwrap()
}

fn new_env(sender: Option<&str>, rcpts: &[&str]) -> NewEnvelope {
    NewEnvelope::new(
        sender.map(str::to_owned),
        rcpts.iter().map(|r| NewRecipient::new(*r)),
        "mda",
    )
}

const MSG: &[u8] = b"Received: from client.example.org\r\n\
From: alice@example.org\r\n\
To: bob@example.net\r\n\
Subject: hello\r\n\
\r\n\
The body line one.\r\n\
BODY-MARKER line two.\r\n";

async fn commit(spool: &Spool, env: NewEnvelope, content: &[u8]) -> QueueId {
    let mut inc = spool.begin().unwrap();
    for chunk in content.chunks(7) {
        inc.write(chunk).unwrap();
    }
    assert_eq!(inc.bytes_written(), content.len() as u64);
    inc.commit(env).await.unwrap()
}

fn body_of(spool: &Spool, id: &QueueId) -> Vec<u8> {
    let mut v = Vec::new();
    spool.open_body(id).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn files_in(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn secs(t: SystemTime) -> u64 {
    to_unix(t)
}

#[tokio::test]
async fn commit_list_get_open_body_delete() {
    let dir = TempDir::new("basic");
    let (spool, report) = open(&dir);
    assert_eq!(report, RecoveryReport::default());
    let id = commit(
        &spool,
        new_env(Some("alice@example.org"), &["bob@example.net"]),
        MSG,
    )
    .await;
    let env = spool.get(&id).unwrap().unwrap();
    assert_eq!(env.id, id);
    assert_eq!(env.size, MSG.len() as u64);
    assert_eq!(env.sender.as_deref(), Some("alice@example.org"));
    assert_eq!(env.recipients[0].status, RcptStatus::Pending);
    assert_eq!(env.route, "mda");
    assert_eq!(body_of(&spool, &id), MSG);
    assert_eq!(spool.list().unwrap(), vec![env.clone()]);
    assert_eq!(inspect(dir.path()).unwrap(), vec![env.clone()]);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    let stats = spool.stats();
    assert_eq!((stats.messages, stats.recipients_pending), (1, 1));
    assert_eq!(stats.bytes, MSG.len() as u64);

    // JSON for the CLI, and back.
    let json = serde_json::to_string(&env).unwrap();
    assert!(json.contains("\"version\":1"));
    assert_eq!(serde_json::from_str::<Envelope>(&json).unwrap(), env);
    let line = summary_line(&env);
    assert!(line.starts_with(id.as_str()), "{line}");
    assert!(line.contains("alice@example.org") && line.contains("bob@example.net  pending"));

    assert!(spool.delete(&id).unwrap());
    assert!(!spool.delete(&id).unwrap());
    assert_eq!(spool.get(&id).unwrap(), None);
    assert!(matches!(spool.open_body(&id), Err(QueueError::NotFound(_))));
    assert!(spool.list().unwrap().is_empty());
    assert!(files_in(&dir.path().join("msg")).is_empty());
}

#[tokio::test]
async fn empty_recipients_and_abort_leave_nothing() {
    let dir = TempDir::new("abort");
    let (spool, _) = open_files(&dir);
    let mut inc = spool.begin().unwrap();
    inc.write(MSG).unwrap();
    // Received straight into msg/ (an orphan until committed, never a message).
    assert_eq!(files_in(&dir.path().join("msg")).len(), 1);
    assert!(spool.list().unwrap().is_empty());
    inc.abort();
    let mut inc = spool.begin().unwrap();
    inc.write(MSG).unwrap();
    drop(inc);
    let inc = spool.begin().unwrap();
    assert!(matches!(
        inc.commit(new_env(None, &[])).await,
        Err(QueueError::NoRecipients)
    ));
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(files_in(&dir.path().join("msg")).is_empty());
}

#[tokio::test]
async fn second_open_is_refused() {
    let dir = TempDir::new("lock");
    let (_spool, _) = open(&dir);
    assert!(matches!(
        Spool::open(QueueConfig::new(dir.path())),
        Err(QueueError::Locked(_))
    ));
}

#[tokio::test]
async fn recovery_removes_uncommitted_leftovers() {
    let dir = TempDir::new("recover");
    let (spool, _) = open_files(&dir);
    let keep = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    let gone = commit(&spool, new_env(Some("a@x.org"), &["c@y.org"]), MSG).await;
    drop(spool);

    let msg = dir.path().join("msg");
    let tmp = dir.path().join("tmp");
    // An interrupted receive of an older version (data in tmp/) and an interrupted envelope
    // rewrite.
    std::fs::write(
        tmp.join(format!("{}.data", QueueId::generate())),
        b"partial",
    )
    .unwrap();
    std::fs::write(tmp.join(format!("{keep}.0123456789abcdef.env")), b"{\"half").unwrap();
    // An interrupted receive: a data file whose envelope never came.
    std::fs::write(msg.join(format!("{}.data", QueueId::generate())), MSG).unwrap();
    // An envelope whose data rename was lost.
    let orphan_env = QueueId::generate();
    std::fs::copy(
        msg.join(format!("{gone}.env")),
        msg.join(format!("{orphan_env}.env")),
    )
    .unwrap();
    // A truncated data file (size differs from the envelope).
    std::fs::write(msg.join(format!("{gone}.data")), &MSG[..10]).unwrap();

    let (spool, report) = open_files(&dir);
    assert_eq!(report.messages, 1);
    assert_eq!(report.tmp_removed, 2);
    assert_eq!(report.orphans_removed, 3);
    assert_eq!(report.quarantined, 0);
    assert!(files_in(&tmp).is_empty());
    assert_eq!(
        files_in(&msg),
        vec![format!("{keep}.data"), format!("{keep}.env")]
    );
    let ids: Vec<QueueId> = spool.list().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![keep.clone()]);
    assert_eq!(body_of(&spool, &keep), MSG);
}

#[tokio::test]
async fn corrupt_envelope_is_quarantined_not_deleted() {
    let dir = TempDir::new("corrupt");
    let (spool, _) = open_files(&dir);
    let id = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    drop(spool);
    std::fs::write(dir.path().join("msg").join(format!("{id}.env")), b"garbage").unwrap();
    let (spool, report) = open(&dir);
    assert_eq!((report.messages, report.quarantined), (0, 1));
    assert!(spool.list().unwrap().is_empty());
    assert_eq!(files_in(&dir.path().join("corrupt")).len(), 2);
}

#[tokio::test]
async fn envelope_replace_is_atomic() {
    let dir = TempDir::new("replace");
    let (spool, _) = open(&dir);
    let id = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    let before = spool.get(&id).unwrap().unwrap();
    drop(spool);
    // A crash after the new envelope was written to tmp/ but before its rename.
    let mut newer = before.clone();
    newer.frozen = true;
    newer.attempts = 7;
    std::fs::write(
        dir.path()
            .join("tmp")
            .join(format!("{id}.00000000deadbeef.env")),
        serde_json::to_vec(&newer).unwrap(),
    )
    .unwrap();
    let (spool, report) = open(&dir);
    assert_eq!(report.tmp_removed, 1);
    assert_eq!(spool.get(&id).unwrap().unwrap(), before);

    // A completed replacement is seen, and leaves no temporary file.
    assert!(spool.set_frozen(&id, true).unwrap());
    assert!(spool.get(&id).unwrap().unwrap().frozen);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(
        spool
            .due(SystemTime::now() + Duration::from_secs(86_400))
            .unwrap()
            .is_empty()
    );
    assert!(spool.set_frozen(&id, false).unwrap());
    assert_eq!(spool.due(SystemTime::now()).unwrap(), vec![id]);
}

#[test]
fn backoff_schedule() {
    let cfg = QueueConfig::new("/nonexistent");
    let mins: Vec<u64> = (0..8).map(|a| backoff(&cfg, a).as_secs() / 60).collect();
    assert_eq!(mins, vec![5, 10, 20, 40, 60, 60, 60, 60]);
    assert_eq!(backoff(&cfg, 200), cfg.retry_max);
}

#[tokio::test]
async fn temp_failures_back_off_exponentially() {
    let dir = TempDir::new("backoff");
    let (spool, _) = open(&dir);
    let id = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    let mut now = SystemTime::now();
    for (attempt, base) in [300u64, 600, 1200, 2400, 3600, 3600]
        .into_iter()
        .enumerate()
    {
        let claim = spool.claim(&id).unwrap();
        let s = spool
            .record_attempt(
                &id,
                vec![(
                    "b@y.org".into(),
                    Outcome::TempFail {
                        reply: "451 4.3.0 try later".into(),
                    },
                )],
                now,
            )
            .await
            .unwrap();
        drop(claim);
        assert_eq!((s.deferred, s.pending, s.failed), (1, 1, 0));
        let next = secs(s.next_attempt.unwrap()) - secs(now);
        assert!(
            next >= base && next <= base + base / 10,
            "attempt {attempt}: {next}s"
        );
        let env = spool.get(&id).unwrap().unwrap();
        assert_eq!(env.attempts as usize, attempt + 1);
        assert_eq!(env.next_attempt, secs(s.next_attempt.unwrap()));
        assert_eq!(env.recipients[0].attempts as usize, attempt + 1);
        assert!(spool.due(now).unwrap().is_empty());
        now = s.next_attempt.unwrap();
        assert_eq!(spool.due(now).unwrap(), vec![id.clone()]);
    }
}

#[tokio::test]
async fn delivery_with_the_envelope_read_under_the_claim() {
    let dir = TempDir::new("attempt-with");
    let (spool, _) = open(&dir);
    let id = commit(
        &spool,
        new_env(Some("a@x.org"), &["b@y.org", "c@y.org"]),
        MSG,
    )
    .await;
    // Until it first changes, the envelope comes from memory: it must be the one on disk.
    let env = spool.get(&id).unwrap().unwrap();
    assert_eq!(inspect(dir.path()).unwrap(), vec![env.clone()]);
    assert_eq!(spool.route(&id).as_deref(), Some("mda"));

    let claim = spool.claim(&id).unwrap();
    let tf = Outcome::TempFail {
        reply: "451 4.3.0 later".into(),
    };
    let delivered = Outcome::Delivered {
        reply: "250 2.0.0 ok".into(),
    };
    let s = spool
        .record_attempt_with(
            env,
            vec![
                ("b@y.org".into(), delivered.clone()),
                ("c@y.org".into(), tf),
            ],
            SystemTime::now(),
        )
        .await
        .unwrap();
    drop(claim);
    assert_eq!(
        (s.delivered, s.deferred, s.pending, s.removed),
        (1, 1, 1, false)
    );
    // The changed envelope is read from the disk again, and is the recorded one.
    let env = spool.get(&id).unwrap().unwrap();
    assert_eq!(inspect(dir.path()).unwrap(), vec![env.clone()]);
    assert_eq!(env.pending().count(), 1);
    assert_eq!(env.attempts, 1);

    // Without the claim it is refused; with it the last recipient removes the message.
    assert!(matches!(
        spool
            .record_attempt_with(env.clone(), vec![], SystemTime::now())
            .await,
        Err(QueueError::NotClaimed(_))
    ));
    let claim = spool.claim(&id).unwrap();
    let s = spool
        .record_attempt_with(env, vec![("c@y.org".into(), delivered)], SystemTime::now())
        .await
        .unwrap();
    drop(claim);
    assert!(s.removed);
    assert_eq!(spool.get(&id).unwrap(), None);
    assert!(files_in(&dir.path().join("msg")).is_empty());
    assert_eq!(spool.stats().messages, 0);
}

#[tokio::test]
async fn record_attempt_needs_the_claim() {
    let dir = TempDir::new("claim");
    let (spool, _) = open(&dir);
    let a = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    let b = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    let claim = spool.claim(&a).unwrap();
    assert_eq!(claim.id(), &a);
    assert!(spool.claim(&a).is_none(), "a second worker gets nothing");
    assert_eq!(spool.due(SystemTime::now()).unwrap(), vec![b.clone()]);
    assert!(matches!(spool.delete(&a), Err(QueueError::Busy(_))));
    assert!(!spool.retry_now(&a).unwrap());
    assert!(matches!(
        spool.record_attempt(&b, vec![], SystemTime::now()).await,
        Err(QueueError::NotClaimed(_))
    ));
    drop(claim);
    assert!(spool.claim(&a).is_some());
    assert!(spool.claim(&QueueId::generate()).is_none());

    // Concurrent workers racing for the same due messages never share one.
    let due = spool.due(SystemTime::now()).unwrap();
    let won = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let mut held = Vec::new();
                for id in &due {
                    if let Some(c) = spool.claim(id) {
                        won.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        held.push(c);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            });
        }
    });
    assert_eq!(won.into_inner(), due.len());
}

#[tokio::test]
async fn due_is_ordered_by_next_attempt() {
    let dir = TempDir::new("due");
    let (spool, _) = open(&dir);
    let now = SystemTime::now();
    let a = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    let b = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    let c = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    let fail = |id: QueueId, at: SystemTime| {
        let spool = spool.clone();
        async move {
            let _claim = spool.claim(&id).unwrap();
            spool
                .record_attempt(
                    &id,
                    vec![(
                        "b@y.org".into(),
                        Outcome::TempFail {
                            reply: "421 busy".into(),
                        },
                    )],
                    at,
                )
                .await
                .unwrap()
        }
    };
    // a: retried at about now+2h+5m, b: at about now+5m, c: due now.
    fail(a.clone(), now + Duration::from_secs(7200)).await;
    fail(b.clone(), now).await;
    assert_eq!(
        spool.due(now + Duration::from_secs(1)).unwrap(),
        vec![c.clone()]
    );
    assert_eq!(
        spool.due(now + Duration::from_secs(86_400)).unwrap(),
        vec![c.clone(), b.clone(), a.clone()]
    );
    assert_eq!(
        spool.due_limited(now + Duration::from_secs(86_400), 2),
        vec![c.clone(), b.clone()]
    );
    assert!(spool.next_due().unwrap() <= now + Duration::from_secs(1));

    assert!(spool.retry_now(&a).unwrap());
    let later = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(spool.due(later).unwrap(), vec![a.clone(), c.clone()]);
    assert_eq!(spool.flush().unwrap(), 1);
    let mut all = spool
        .due(SystemTime::now() + Duration::from_secs(1))
        .unwrap();
    all.sort();
    assert_eq!(all, vec![a.clone(), b, c.clone()]);

    // The durable schedule survives a restart: a (retry_now) and c are due; the flush was
    // in memory only, so b waits for its stored time again.
    drop(spool);
    let (spool, report) = open(&dir);
    assert_eq!(report.messages, 3);
    let mut due = spool
        .due(SystemTime::now() + Duration::from_secs(1))
        .unwrap();
    due.sort();
    let mut want = vec![a, c];
    want.sort();
    assert_eq!(due, want);
    assert_eq!(spool.due(now + Duration::from_secs(3600)).unwrap().len(), 3);
}

/// Splits a MIME body on `--boundary` lines; returns (headers, body) of each part.
fn mime_parts(body: &str, boundary: &str) -> Vec<(String, String)> {
    let delim = format!("\r\n--{boundary}");
    let close = format!("--{boundary}--");
    assert!(body.contains(&close), "closing delimiter missing");
    let mut parts = Vec::new();
    let after_preamble = body.split_once(&delim).expect("first boundary").1;
    for chunk in after_preamble.split(&delim) {
        if chunk.starts_with("--") {
            break;
        }
        let chunk = chunk.strip_prefix("\r\n").unwrap();
        let (h, b) = chunk.split_once("\r\n\r\n").unwrap_or((chunk, ""));
        parts.push((h.to_owned(), b.to_owned()));
    }
    parts
}

fn split_message(msg: &str) -> (String, String) {
    let (h, b) = msg.split_once("\r\n\r\n").unwrap();
    (h.to_owned(), b.to_owned())
}

fn boundary_of(headers: &str) -> String {
    let unfolded = headers.replace("\r\n\t", " ");
    let ct = unfolded
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))
        .unwrap()
        .to_owned();
    assert!(ct.contains("multipart/report"), "{ct}");
    assert!(ct.contains("report-type=delivery-status"), "{ct}");
    ct.split("boundary=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

async fn perm_fail(spool: &Spool, id: &QueueId, rcpt: &str, reply: &str) -> AttemptSummary {
    let _claim = spool.claim(id).unwrap();
    spool
        .record_attempt(
            id,
            vec![(
                rcpt.into(),
                Outcome::PermFail {
                    reply: reply.into(),
                },
            )],
            SystemTime::now(),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn bounce_is_an_rfc3464_report() {
    let dir = TempDir::new("dsn");
    let (spool, _) = open(&dir);
    let mut env = new_env(
        Some("alice@example.org"),
        &["bob@example.net", "carol@example.net"],
    );
    env.envid = Some("ENV-42".into());
    env.recipients[0].orcpt = Some("rfc822;Bob@Example.NET".into());
    let id = commit(&spool, env, MSG).await;

    let s = perm_fail(
        &spool,
        &id,
        "bob@example.net",
        "550 5.1.1 <bob@example.net>: no such user",
    )
    .await;
    assert_eq!((s.failed, s.pending, s.removed), (1, 1, false));
    let bounce_id = s.bounce.expect("a bounce");
    let orig = spool.get(&id).unwrap().unwrap();
    assert!(matches!(
        orig.recipients[0].status,
        RcptStatus::Failed { .. }
    ));

    let bounce = spool.get(&bounce_id).unwrap().unwrap();
    assert_eq!(bounce.sender, None);
    assert_eq!(bounce.recipients.len(), 1);
    assert_eq!(bounce.recipients[0].address, "alice@example.org");
    assert_eq!(bounce.route, "mta");
    assert_eq!(spool.stats().dsns, 1);
    // The DSN knows what it reports on (for the log, should it fail in turn).
    assert_eq!(
        bounce.report_of,
        Some(ReportOf {
            id: id.to_string(),
            recipients: vec!["bob@example.net".into()],
        })
    );
    // The delivery log's view of the attempt.
    assert_eq!(
        s.recipients,
        vec![RecipientResult {
            address: "bob@example.net".into(),
            status: DeliveryStatus::Bounced,
            reply: "550 5.1.1 <bob@example.net>: no such user".into(),
            dsn: "5.1.1".into(),
        }]
    );

    let text = String::from_utf8(body_of(&spool, &bounce_id)).unwrap();
    let (headers, body) = split_message(&text);
    assert!(headers.contains("From: Mail Delivery System <MAILER-DAEMON@mx.example.net>"));
    assert!(headers.contains("To: <alice@example.org>"));
    assert!(headers.contains(&format!("Message-ID: <{bounce_id}@mx.example.net>")));
    assert!(headers.contains("\r\nDate: "));
    assert!(headers.contains("MIME-Version: 1.0"));
    let parts = mime_parts(&body, &boundary_of(&headers));
    assert_eq!(parts.len(), 3);
    assert!(parts[0].0.contains("text/plain"));
    assert!(parts[0].1.contains("<bob@example.net>: 550 5.1.1"));
    assert!(parts[1].0.contains("Content-Type: message/delivery-status"));
    let ds = &parts[1].1;
    assert!(ds.contains("Reporting-MTA: dns; mx.example.net\r\n"));
    assert!(ds.contains("Original-Envelope-Id: ENV-42\r\n"));
    assert!(ds.contains("Arrival-Date: "));
    assert!(ds.contains("\r\n\r\nFinal-Recipient: rfc822; bob@example.net\r\n"));
    assert!(ds.contains("Original-Recipient: rfc822;Bob@Example.NET\r\n"));
    assert!(ds.contains("Action: failed\r\n"));
    assert!(ds.contains("Status: 5.1.1\r\n"));
    assert!(ds.contains("Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: no such user\r\n"));
    assert!(!ds.contains("carol"));
    assert!(parts[2].0.contains("Content-Type: message/rfc822"));
    assert_eq!(parts[2].1.as_bytes(), MSG, "the whole message");

    // The last recipient delivered: the message is finished and removed.
    let _claim = spool.claim(&id).unwrap();
    let s = spool
        .record_attempt(
            &id,
            vec![(
                "carol@example.net".into(),
                Outcome::Delivered {
                    reply: "250 2.0.0 ok".into(),
                },
            )],
            SystemTime::now(),
        )
        .await
        .unwrap();
    assert!(s.removed && s.bounce.is_none());
    assert_eq!(spool.get(&id).unwrap(), None);
    assert!(!dir.path().join("msg").join(format!("{id}.data")).exists());
}

#[tokio::test]
async fn each_recipient_of_an_attempt_is_reported_and_a_double_bounce_is_discarded() {
    let dir = TempDir::new("results");
    let (spool, _) = open(&dir);
    let id = commit(
        &spool,
        new_env(
            Some("alice@example.org"),
            &["a@example.net", "b@example.net", "c@example.net"],
        ),
        MSG,
    )
    .await;
    let claim = spool.claim(&id).unwrap();
    let s = spool
        .record_attempt(
            &id,
            vec![
                (
                    "a@example.net".into(),
                    Outcome::Delivered {
                        reply: "250 2.0.0 queued as X".into(),
                    },
                ),
                (
                    "b@example.net".into(),
                    Outcome::TempFail {
                        reply: "451 4.4.1 connect to mx.example.net: refused".into(),
                    },
                ),
                (
                    "c@example.net".into(),
                    Outcome::PermFail {
                        reply: "554 rejected".into(),
                    },
                ),
            ],
            SystemTime::now(),
        )
        .await
        .unwrap();
    drop(claim);
    let got: Vec<(&str, DeliveryStatus, &str)> = s
        .recipients
        .iter()
        .map(|r| (r.address.as_str(), r.status, r.dsn.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("a@example.net", DeliveryStatus::Sent, "2.0.0"),
            ("b@example.net", DeliveryStatus::Deferred, "4.4.1"),
            ("c@example.net", DeliveryStatus::Bounced, "5.0.0"),
        ]
    );
    assert_eq!(DeliveryStatus::Bounced.to_string(), "bounced");

    // The bounce to alice fails in turn: nobody is told (null sender), the DSN is gone.
    let bounce = s.bounce.expect("a bounce");
    let s = perm_fail(
        &spool,
        &bounce,
        "alice@example.org",
        "550 5.1.1 no such user",
    )
    .await;
    assert!(s.removed && s.bounce.is_none());
    assert_eq!(s.recipients[0].status, DeliveryStatus::Bounced);
    assert_eq!(spool.stats().dsns, 1);
    assert_eq!(spool.get(&bounce).unwrap(), None);
}

#[tokio::test]
async fn bounce_of_an_smtputf8_message_is_a_global_report() {
    let dir = TempDir::new("dsn-utf8");
    let (spool, _) = open(&dir);
    let mut env = new_env(
        Some("álvaro@example.org"),
        &["josé@例え.jp", "ascii@example.net"],
    );
    env.smtputf8 = true;
    let msg = "From: álvaro@example.org\r\nTo: josé@例え.jp\r\nSubject: ¡hola!\r\n\r\nbody\r\n";
    let id = commit(&spool, env, msg.as_bytes()).await;
    let s = perm_fail(
        &spool,
        &id,
        "josé@例え.jp",
        "550 5.1.1 <josé@例え.jp>: no such user",
    )
    .await;
    let bounce_id = s.bounce.expect("a bounce");
    let bounce = spool.get(&bounce_id).unwrap().unwrap();
    assert!(bounce.smtputf8, "sent with SMTPUTF8");
    assert_eq!(bounce.recipients[0].address, "álvaro@example.org");
    let text = String::from_utf8(body_of(&spool, &bounce_id)).unwrap();
    let (headers, body) = split_message(&text);
    assert!(headers.contains("To: <álvaro@example.org>"), "{headers}");
    let parts = mime_parts(&body, &boundary_of(&headers));
    assert!(parts[0].0.contains("charset=utf-8"));
    assert!(
        parts[0]
            .1
            .contains("<josé@例え.jp>: 550 5.1.1 <josé@例え.jp>: no such user")
    );
    assert!(
        parts[1]
            .0
            .contains("Content-Type: message/global-delivery-status")
    );
    assert!(
        parts[1]
            .1
            .contains("Final-Recipient: utf-8; josé@例え.jp\r\n")
    );
    assert!(
        parts[1]
            .1
            .contains("Diagnostic-Code: smtp; 550 5.1.1 <josé@例え.jp>: no such user")
    );
    assert!(parts[2].0.contains("Content-Type: message/global"));
    assert_eq!(parts[2].1, msg);
}

#[tokio::test]
async fn ret_hdrs_returns_only_the_headers() {
    let dir = TempDir::new("hdrs");
    let (spool, _) = open(&dir);
    let mut env = new_env(Some("alice@example.org"), &["bob@example.net"]);
    env.ret = Some(Ret::Hdrs);
    let id = commit(&spool, env, MSG).await;
    let s = perm_fail(&spool, &id, "bob@example.net", "554 rejected").await;
    assert!(s.removed);
    let text = String::from_utf8(body_of(&spool, &s.bounce.unwrap())).unwrap();
    let (headers, body) = split_message(&text);
    let parts = mime_parts(&body, &boundary_of(&headers));
    assert_eq!(parts.len(), 3);
    assert!(parts[1].1.contains("Status: 5.0.0\r\n"));
    assert!(parts[2].0.contains("Content-Type: text/rfc822-headers"));
    assert!(parts[2].1.contains("Subject: hello\r\n"));
    assert!(!parts[2].1.contains("BODY-MARKER"));
    assert!(!text.contains("BODY-MARKER"));
}

#[tokio::test]
async fn no_bounce_for_null_sender_never_or_bounces() {
    let dir = TempDir::new("nobounce");
    let (spool, _) = open(&dir);
    // The null sender.
    let id = commit(&spool, new_env(None, &["bob@example.net"]), MSG).await;
    let s = perm_fail(&spool, &id, "bob@example.net", "550 no").await;
    assert!(s.removed && s.bounce.is_none());

    // NOTIFY=NEVER.
    let mut env = new_env(Some("alice@example.org"), &["bob@example.net"]);
    env.recipients[0].notify.never = true;
    let id = commit(&spool, env, MSG).await;
    assert!(
        perm_fail(&spool, &id, "bob@example.net", "550 no")
            .await
            .bounce
            .is_none()
    );

    // A bounce that bounces.
    let id = commit(
        &spool,
        new_env(Some("alice@example.org"), &["bob@example.net"]),
        MSG,
    )
    .await;
    let bounce = perm_fail(&spool, &id, "bob@example.net", "550 no")
        .await
        .bounce
        .unwrap();
    let s = perm_fail(&spool, &bounce, "alice@example.org", "550 nobody here").await;
    assert!(s.removed && s.bounce.is_none());
    assert!(spool.list().unwrap().is_empty());
    assert_eq!(spool.stats().dsns, 1);
}

#[tokio::test]
async fn expiry_turns_temp_failures_permanent() {
    let dir = TempDir::new("expiry");
    let (spool, _) = open(&dir);
    let id = commit(
        &spool,
        new_env(
            Some("alice@example.org"),
            &["bob@example.net", "carol@example.net"],
        ),
        MSG,
    )
    .await;
    let env = spool.get(&id).unwrap().unwrap();
    assert_eq!(env.expires_at, secs(env.received_at) + 5 * 86_400);

    // Before expiry, retries are not scheduled past expires_at.
    let claim = spool.claim(&id).unwrap();
    let just_before = from_unix(env.expires_at - 60);
    let s = spool
        .record_attempt(
            &id,
            vec![(
                "bob@example.net".into(),
                Outcome::TempFail {
                    reply: "451 4.4.1 no answer".into(),
                },
            )],
            just_before,
        )
        .await
        .unwrap();
    assert_eq!(secs(s.next_attempt.unwrap()), env.expires_at);
    assert!(s.bounce.is_none());

    // At expiry: bob's temporary failure and carol (never tried) fail for good.
    let s = spool
        .record_attempt(
            &id,
            vec![(
                "bob@example.net".into(),
                Outcome::TempFail {
                    reply: "451 4.4.1 no answer".into(),
                },
            )],
            from_unix(env.expires_at),
        )
        .await
        .unwrap();
    drop(claim);
    assert_eq!(
        (s.failed, s.deferred, s.pending, s.removed),
        (2, 0, 0, true)
    );
    let text = String::from_utf8(body_of(&spool, &s.bounce.unwrap())).unwrap();
    assert!(text.contains(
        "Final-Recipient: rfc822; bob@example.net\r\nAction: failed\r\nStatus: 4.4.1\r\n"
    ));
    assert!(text.contains(
        "Final-Recipient: rfc822; carol@example.net\r\nAction: failed\r\nStatus: 4.4.7\r\n"
    ));
}

#[tokio::test]
async fn delay_warning_once() {
    let dir = TempDir::new("delay");
    let mut cfg = QueueConfig::new(dir.path());
    cfg.bounce_after_delay_warning = Some(Duration::from_secs(4 * 3600));
    let (spool, _) = Spool::open(cfg).unwrap();
    let id = commit(
        &spool,
        new_env(Some("alice@example.org"), &["bob@example.net"]),
        MSG,
    )
    .await;
    let received = spool.get(&id).unwrap().unwrap().received_at;
    let _claim = spool.claim(&id).unwrap();
    let tf = || {
        vec![(
            "bob@example.net".to_owned(),
            Outcome::TempFail {
                reply: "451 4.2.0 full".into(),
            },
        )]
    };
    let s = spool
        .record_attempt(&id, tf(), received + Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(s.delay_warning.is_none());
    let s = spool
        .record_attempt(&id, tf(), received + Duration::from_secs(5 * 3600))
        .await
        .unwrap();
    let warning = s.delay_warning.expect("a delay warning");
    let text = String::from_utf8(body_of(&spool, &warning)).unwrap();
    assert!(text.contains("Action: delayed\r\nStatus: 4.2.0\r\n"));
    assert!(text.contains("Will-Retry-Until: "));
    assert!(text.contains("text/rfc822-headers"));
    assert!(!text.contains("BODY-MARKER"));
    let s = spool
        .record_attempt(&id, tf(), received + Duration::from_secs(6 * 3600))
        .await
        .unwrap();
    assert!(s.delay_warning.is_none(), "only one warning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_batches_concurrent_commits() {
    for inline in [false, true] {
        group_commit_batches(inline).await;
    }
}

async fn group_commit_batches(inline: bool) {
    let dir = TempDir::new("group");
    let (spool, _) = if inline { open(&dir) } else { open_files(&dir) };
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move {
                let content = format!("Subject: {i}\r\n\r\n{}\r\n", "x".repeat(2048));
                commit(
                    &spool,
                    new_env(Some("a@x.org"), &["b@y.org"]),
                    content.as_bytes(),
                )
                .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50);
    let stats = spool.stats();
    assert_eq!(stats.commits, 50);
    if inline {
        // One segment, one flush per round, no directory fsync.
        assert_eq!((stats.segments, stats.dir_fsyncs), (1, 0), "{stats:?}");
        assert!(
            stats.files_synced <= 15,
            "50 concurrent commits took {} segment flushes",
            stats.files_synced
        );
        assert!(files_in(&dir.path().join("msg")).is_empty());
    } else {
        assert_eq!(stats.files_synced, 100);
        assert!(
            stats.dir_fsyncs <= 15,
            "50 concurrent commits took {} directory fsyncs",
            stats.dir_fsyncs
        );
    }
    assert_eq!(spool.list().unwrap().len(), 50);
}

#[tokio::test]
async fn ack_maybe_lost_counter() {
    let dir = TempDir::new("acks");
    let (spool, _) = open(&dir);
    spool.note_ack_maybe_lost();
    spool.clone().note_ack_maybe_lost();
    assert_eq!(spool.stats().acks_maybe_lost, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syncfs_mode_commits_in_one_round_and_recovers() {
    let dir = TempDir::new("syncfs");
    let mut cfg = QueueConfig::new(dir.path());
    cfg.sync = crate::SyncMode::Syncfs;
    // Files of their own: a round of segment records alone is flushed with one fdatasync.
    cfg.inline_max = 0;
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let mut inc = spool.begin().unwrap();
            inc.write(format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes())
                .unwrap();
            inc.commit(new_env(Some("a@b.test"), &["c@d.test"]))
                .await
                .unwrap()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let stats = spool.stats();
    assert_eq!(stats.commits, 40);
    assert!(stats.syncfs >= 1, "{stats:?}");
    assert!(stats.syncfs < 40, "rounds are shared: {stats:?}");
    drop(spool);
    let (spool, report) = Spool::open(cfg).unwrap();
    assert_eq!(report.messages, 40);
    for id in ids {
        let env = spool.get(&id).unwrap().unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut spool.open_body(&id).unwrap(), &mut body).unwrap();
        assert_eq!(body.len() as u64, env.size);
    }
}

fn deliver(
    spool: &Spool,
    id: &QueueId,
    ok: bool,
) -> impl std::future::Future<Output = AttemptSummary> {
    let claim = spool.claim(id).unwrap();
    let rcpt = spool.get(id).unwrap().unwrap().recipients[0]
        .address
        .clone();
    let outcome = if ok {
        Outcome::Delivered {
            reply: "250 2.0.0 ok".into(),
        }
    } else {
        Outcome::TempFail {
            reply: "451 4.3.0 later".into(),
        }
    };
    let spool = spool.clone();
    let id = id.clone();
    async move {
        let s = spool
            .record_attempt(&id, vec![(rcpt, outcome)], SystemTime::now())
            .await
            .unwrap();
        drop(claim);
        s
    }
}

fn segment_files(dir: &TempDir) -> Vec<String> {
    files_in(&dir.path().join("seg"))
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect()
}

#[tokio::test]
async fn small_messages_share_a_segment_and_move_to_files_when_deferred() {
    let dir = TempDir::new("segment");
    let (spool, _) = open(&dir);
    let env = || new_env(Some("a@x.org"), &["b@y.org"]);
    let a = commit(&spool, env(), MSG).await;
    let b = commit(&spool, env(), MSG).await;
    let c = commit(&spool, env(), MSG).await;
    assert!(files_in(&dir.path().join("msg")).is_empty());
    assert_eq!(segment_files(&dir), vec![seg_name(1)]);
    assert_eq!(spool.stats().segments, 1);
    assert_eq!(inspect(dir.path()).unwrap().len(), 3);
    assert_eq!(body_of(&spool, &c), MSG);

    assert!(deliver(&spool, &a, true).await.removed);
    // Deferred: its content and new envelope move to files of their own.
    assert!(!deliver(&spool, &b, false).await.removed);
    assert_eq!(
        files_in(&dir.path().join("msg")),
        vec![format!("{b}.data"), format!("{b}.env")]
    );
    assert_eq!(spool.get(&b).unwrap().unwrap().attempts, 1);
    assert_eq!(body_of(&spool, &b), MSG);
    let listed: Vec<QueueId> = inspect(dir.path())
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(listed, vec![b.clone(), c.clone()]);
    drop(spool);

    let (spool, report) = open(&dir);
    assert_eq!((report.messages, report.segments), (2, 1), "{report:?}");
    assert_eq!(
        spool.get(&a).unwrap(),
        None,
        "a delivered message stays gone"
    );
    assert_eq!(spool.get(&b).unwrap().unwrap().attempts, 1);
    assert_eq!(body_of(&spool, &b), MSG);
    assert_eq!(body_of(&spool, &c), MSG);
    // The last message of the old segment done: it goes (done records go to a new one).
    assert!(deliver(&spool, &b, true).await.removed);
    assert!(deliver(&spool, &c, true).await.removed);
    assert_eq!(segment_files(&dir), vec![seg_name(2)]);
    assert!(files_in(&dir.path().join("msg")).is_empty());
    assert_eq!(spool.stats().messages, 0);
    drop(spool);
    let (spool, report) = open(&dir);
    assert_eq!(report.messages, 0, "{report:?}");
    assert!(spool.list().unwrap().is_empty());
}

#[tokio::test]
async fn a_done_record_keeps_its_segment_until_the_older_one_is_gone() {
    let dir = TempDir::new("segment-order");
    let env = || new_env(Some("a@x.org"), &["b@y.org"]);
    let (spool, _) = open(&dir);
    let a = commit(&spool, env(), MSG).await;
    let x = commit(&spool, env(), MSG).await;
    drop(spool);
    // x's done record goes to segment 2; segment 1 still holds a.
    let (spool, _) = open(&dir);
    assert!(deliver(&spool, &x, true).await.removed);
    drop(spool);
    let (spool, report) = open(&dir);
    assert_eq!(report.messages, 1, "{report:?}");
    assert_eq!(spool.get(&x).unwrap(), None);
    // Segment 2 holds no message, but deleting it would bring x back.
    assert_eq!(segment_files(&dir), vec![seg_name(1), seg_name(2)]);
    drop(spool);
    let (spool, _) = open(&dir);
    assert_eq!(spool.get(&x).unwrap(), None, "x stays delivered");
    assert!(deliver(&spool, &a, true).await.removed);
    // Segment 1 is empty now, and then so is 2; 3 takes the done record.
    assert_eq!(segment_files(&dir), vec![seg_name(3)]);
    drop(spool);
    let (spool, report) = open(&dir);
    assert_eq!(report.messages, 0, "{report:?}");
    assert!(spool.list().unwrap().is_empty());
}

#[tokio::test]
async fn a_torn_segment_tail_is_not_a_message_and_not_appended_to() {
    let dir = TempDir::new("segment-torn");
    let env = || new_env(Some("a@x.org"), &["b@y.org"]);
    let (spool, _) = open(&dir);
    let a = commit(&spool, env(), MSG).await;
    let b = commit(&spool, env(), MSG).await;
    drop(spool);
    // The remains of a round a crash interrupted: half a record after the last one.
    let path = dir.path().join("seg").join(seg_name(1));
    let mut rec = crate::segment::start_record(0);
    rec.extend_from_slice(MSG);
    crate::segment::finish_message(&mut rec, &QueueId::generate(), b"{}");
    let end = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &rec[..rec.len() / 2], end).unwrap();
    drop(f);
    let (spool, report) = open(&dir);
    assert_eq!(
        (report.messages, report.torn_segments),
        (2, 1),
        "{report:?}"
    );
    let c = commit(&spool, env(), MSG).await;
    assert_eq!(
        segment_files(&dir),
        vec![seg_name(1), seg_name(2)],
        "a new segment"
    );
    drop(spool);
    let (spool, report) = open(&dir);
    assert_eq!(
        (report.messages, report.torn_segments),
        (3, 1),
        "{report:?}"
    );
    for id in [&a, &b, &c] {
        assert_eq!(body_of(&spool, id), MSG);
    }
}

#[tokio::test]
async fn a_message_larger_than_inline_max_gets_its_own_files() {
    let dir = TempDir::new("segment-large");
    let (spool, _) = open(&dir);
    let max = spool.config().inline_max;
    let fits = vec![b'a'; max];
    let big = vec![b'b'; max + 1];
    let env = || new_env(Some("a@x.org"), &["b@y.org"]);
    let small = commit(&spool, env(), &fits).await;
    let large = commit(&spool, env(), &big).await;
    assert_eq!(
        files_in(&dir.path().join("msg")),
        vec![format!("{large}.data"), format!("{large}.env")]
    );
    assert_eq!(body_of(&spool, &small), fits);
    assert_eq!(body_of(&spool, &large), big);
    drop(spool);
    let (spool, report) = open(&dir);
    assert_eq!(report.messages, 2);
    assert_eq!(body_of(&spool, &small), fits);
    assert_eq!(body_of(&spool, &large), big);
}

#[tokio::test]
async fn a_corrupt_envelope_in_a_segment_is_quarantined() {
    let dir = TempDir::new("segment-corrupt");
    let (spool, _) = open(&dir);
    let good = commit(&spool, new_env(Some("a@x.org"), &["b@y.org"]), MSG).await;
    drop(spool);
    // A record that checks out around an envelope that does not parse: damage, not a crash.
    let bad = QueueId::generate();
    let mut rec = crate::segment::start_record(0);
    rec.extend_from_slice(MSG);
    crate::segment::finish_message(&mut rec, &bad, b"{\"not\": \"an envelope\"}");
    std::fs::write(dir.path().join("seg").join(seg_name(7)), &rec).unwrap();
    let (spool, report) = open(&dir);
    assert_eq!((report.messages, report.quarantined), (1, 1), "{report:?}");
    assert_eq!(body_of(&spool, &good), MSG);
    let corrupt = dir.path().join("corrupt");
    assert_eq!(
        files_in(&corrupt),
        vec![format!("{bad}.data"), format!("{bad}.env")]
    );
    assert_eq!(
        std::fs::read(corrupt.join(format!("{bad}.data"))).unwrap(),
        MSG
    );
}

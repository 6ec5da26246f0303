//! Delivery status notifications (RFC 3464): bounces and delay warnings.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::time::SystemTime;

use crate::envelope::{
    BodyType, Envelope, NewEnvelope, NewRecipient, RecipientState, ReportOf, Ret, one_line,
    rfc5322_date, to_unix,
};
use crate::spool::copy_into;
use crate::{QueueError, QueueId, Spool};

/// Longest header section returned with `text/rfc822-headers`.
const MAX_HEADERS: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Action: failed.
    Failed,
    /// Action: delayed.
    Delayed,
}

/// The status code for a reply: its enhanced code if it has one of the right class, else one
/// derived from the basic code, else `fallback`.
pub fn dsn_status(reply: &str, fallback: &str) -> String {
    let reply = reply.trim_start();
    let basic = reply
        .get(..3)
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
    if let Some(basic) = basic {
        let rest = reply[3..].trim_start_matches(['-', ' ']);
        let word = rest.split_whitespace().next().unwrap_or("");
        let parts: Vec<&str> = word.split('.').collect();
        let enhanced_ok = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && parts[0] == &basic[..1]
            && matches!(parts[0], "2" | "4" | "5");
        if enhanced_ok {
            return word.to_owned();
        }
        if matches!(&basic[..1], "4" | "5") {
            return format!("{}.0.0", &basic[..1]);
        }
    }
    fallback.to_owned()
}

/// The status code of a recipient that failed with `reply`: the reply's own, else 4.4.7
/// (delivery time expired) after temporary failures, else 5.0.0.
pub(crate) fn failed_status(r: &RecipientState, reply: &str) -> String {
    let fallback = if r.last_reply.as_deref().is_some_and(|l| l.starts_with('4'))
        || reply.contains("expired")
    {
        "4.4.7"
    } else {
        "5.0.0"
    };
    dsn_status(reply, fallback)
}

/// Header-safe text: printable ASCII only.
fn header_safe(s: &str) -> String {
    one_line(s)
        .chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// Text for a DSN about an SMTPUTF8 message (RFC 6533): UTF-8 stays, controls do not.
fn utf8_safe(s: &str) -> String {
    one_line(s)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Builds and queues a DSN about `rcpts` (indices into `env.recipients`) to the sender of
/// `env`, with the null sender, on the configured bounce route. Durable when it returns.
pub(crate) async fn queue_dsn(
    spool: &Spool,
    env: &Envelope,
    rcpts: &[usize],
    kind: Kind,
    now: SystemTime,
) -> Result<QueueId, QueueError> {
    let Some(sender) = env.sender.clone() else {
        return Err(QueueError::NoRecipients);
    };
    // A DSN about an SMTPUTF8 message is an internationalised one (RFC 6533): addresses and
    // replies keep their UTF-8, the report is message/global-delivery-status, the returned
    // message message/global (or message/global-headers), and it is sent with SMTPUTF8.
    let global = env.smtputf8;
    let text = |s: &str| if global { utf8_safe(s) } else { header_safe(s) };
    let cfg = spool.config();
    let host = header_safe(&cfg.hostname);
    let mut inc = spool.begin()?;
    let id = inc.id().clone();
    let boundary = format!("{id}/{host}");
    let now_secs = to_unix(now);
    let return_full =
        kind == Kind::Failed && env.ret != Some(Ret::Hdrs) && env.size <= cfg.bounce_size_limit;

    let (subject, action) = match kind {
        Kind::Failed => ("Undelivered Mail Returned to Sender", "failed"),
        Kind::Delayed => ("Delayed Mail (still being retried)", "delayed"),
    };
    let mut head = String::new();
    let _ = write!(
        head,
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}@{host}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset={charset}\r\n\
         \r\n\
         This is the mail system at host {host}.\r\n\r\n",
        to = text(&sender),
        charset = if global { "utf-8" } else { "us-ascii" },
        date = rfc5322_date(now_secs),
    );
    match kind {
        Kind::Failed => head.push_str(
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n\r\n",
        ),
        Kind::Delayed => {
            let _ = write!(
                head,
                "Your message could not be delivered for {} hours.\r\n\
                 It will be retried until {}.\r\n\r\n\
                 This is a warning only; you do not need to resend your message.\r\n\r\n",
                now_secs.saturating_sub(to_unix(env.received_at)) / 3600,
                rfc5322_date(env.expires_at),
            );
        }
    }
    for &i in rcpts {
        let r = &env.recipients[i];
        let reply = match &r.status {
            crate::RcptStatus::Failed { reply, .. } => Some(reply.as_str()),
            _ => r.last_reply.as_deref(),
        };
        let _ = write!(
            head,
            "<{}>: {}\r\n",
            text(&r.address),
            text(reply.unwrap_or("no reply"))
        );
    }
    if kind == Kind::Failed && !return_full {
        head.push_str("\r\nOnly the headers of the message are returned.\r\n");
    }

    // The delivery-status part.
    let _ = write!(
        head,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/{global}delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {host}\r\n\
         X-Ringmail-Queue-ID: {orig}\r\n",
        orig = env.id,
        global = if global { "global-" } else { "" },
    );
    if let Some(envid) = &env.envid {
        let _ = write!(head, "Original-Envelope-Id: {}\r\n", header_safe(envid));
    }
    let _ = write!(
        head,
        "Arrival-Date: {}\r\n",
        rfc5322_date(to_unix(env.received_at))
    );
    for &i in rcpts {
        let r = &env.recipients[i];
        let (reply, mut status) = match &r.status {
            crate::RcptStatus::Failed { reply, .. } => {
                (Some(reply.as_str()), failed_status(r, reply))
            }
            _ => (
                r.last_reply.as_deref(),
                dsn_status(r.last_reply.as_deref().unwrap_or(""), "4.0.0"),
            ),
        };
        if kind == Kind::Delayed && !status.starts_with('4') {
            status = "4.0.0".to_owned();
        }
        // RFC 6533 3.2: a non-ASCII address is of type utf-8 in a global report.
        let addr_type = if global && !r.address.is_ascii() {
            "utf-8"
        } else {
            "rfc822"
        };
        let _ = write!(
            head,
            "\r\nFinal-Recipient: {addr_type}; {}\r\n",
            text(&r.address)
        );
        if let Some(orcpt) = &r.orcpt {
            let orcpt = text(orcpt);
            if orcpt.contains(';') {
                let _ = write!(head, "Original-Recipient: {orcpt}\r\n");
            } else {
                let _ = write!(head, "Original-Recipient: rfc822; {orcpt}\r\n");
            }
        }
        let _ = write!(head, "Action: {action}\r\nStatus: {status}\r\n");
        if let Some(reply) = reply
            && reply
                .trim_start()
                .get(..3)
                .is_some_and(|c| c.bytes().all(|b| b.is_ascii_digit()))
        {
            let _ = write!(head, "Diagnostic-Code: smtp; {}\r\n", text(reply));
        } else if let Some(reply) = reply {
            let _ = write!(head, "Diagnostic-Code: X-Ringmail; {}\r\n", text(reply));
        }
        if kind == Kind::Delayed {
            let _ = write!(
                head,
                "Will-Retry-Until: {}\r\n",
                rfc5322_date(env.expires_at)
            );
        }
    }

    // The returned message.
    let _ = write!(
        head,
        "\r\n--{boundary}\r\n\
         Content-Description: {}\r\n\
         Content-Type: {}\r\n\
         \r\n",
        if return_full {
            "Undelivered Message"
        } else {
            "Message Headers"
        },
        match (return_full, global) {
            (true, false) => "message/rfc822",
            (false, false) => "text/rfc822-headers",
            (true, true) => "message/global",
            (false, true) => "message/global-headers",
        },
    );
    inc.write(head.as_bytes())?;
    let mut body = spool.open_body(&env.id)?;
    let mut last = Vec::new();
    if return_full {
        copy_into(&mut body, &mut inc)?;
        // Keep the closing boundary on its own line.
        let mut tail = [0u8; 1];
        if env.size > 0 {
            use std::io::{Seek, SeekFrom};
            body.seek(SeekFrom::End(-1))
                .and_then(|_| body.read_exact(&mut tail))
                .map_err(|e| QueueError::io("read", "message content", e))?;
            last.push(tail[0]);
        }
    } else {
        let mut reader = BufReader::new(body.take(MAX_HEADERS));
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| QueueError::io("read", "message content", e))?;
            if n == 0 || line == b"\r\n" || line == b"\n" {
                break;
            }
            inc.write(&line)?;
            last = line.clone();
        }
    }
    let eol = if last.last() == Some(&b'\n') {
        ""
    } else {
        "\r\n"
    };
    inc.write(format!("{eol}\r\n--{boundary}--\r\n").as_bytes())?;

    let body = if return_full {
        env.body
    } else {
        BodyType::SevenBit
    };
    let mut new = NewEnvelope::new(None, [NewRecipient::new(sender)], cfg.bounce_route.clone());
    new.body = body;
    new.smtputf8 = env.smtputf8;
    new.report_of = Some(ReportOf {
        id: env.id.to_string(),
        recipients: rcpts
            .iter()
            .map(|&i| env.recipients[i].address.clone())
            .collect(),
    });
    let id = inc.commit(new).await?;
    spool.count_dsn();
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::dsn_status;

    #[test]
    fn status_codes() {
        assert_eq!(dsn_status("550 5.1.1 no such user", "5.0.0"), "5.1.1");
        assert_eq!(dsn_status("550-5.7.1 policy", "5.0.0"), "5.7.1");
        assert_eq!(dsn_status("554 rejected", "5.0.0"), "5.0.0");
        assert_eq!(dsn_status("451 4.7.1 later", "4.4.7"), "4.7.1");
        assert_eq!(dsn_status("550 4.1.1 mismatched class", "5.0.0"), "5.0.0");
        assert_eq!(dsn_status("connection refused", "4.4.7"), "4.4.7");
    }
}

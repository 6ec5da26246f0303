//! Command-line parsing (server side) and the MAIL/RCPT parameters (RFC 1870 SIZE, RFC 6152
//! 8BITMIME, RFC 3030 BINARYMIME, RFC 6531 SMTPUTF8, RFC 3461 DSN, RFC 4954 AUTH=).
//!
//! Parse errors are returned as the [`Reply`] the server sends: the mapping from a syntax
//! problem to a reply code lives here, next to the grammar.

use crate::address::decode_xtext;
use crate::reply::Reply;

/// The BODY= parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Body {
    /// `BODY=7BIT`, or no BODY parameter.
    #[default]
    SevenBit,
    /// `BODY=8BITMIME` (RFC 6152).
    EightBitMime,
    /// `BODY=BINARYMIME` (RFC 3030): BDAT only; bare CR and LF allowed in the content.
    BinaryMime,
}

/// RET= (RFC 3461).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnRet {
    /// Return the full message in a DSN.
    Full,
    /// Return the headers only.
    Hdrs,
}

/// One NOTIFY= value (RFC 3461). `Never` never appears together with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnNotify {
    /// No DSN at all.
    Never,
    /// On successful delivery.
    Success,
    /// On failure.
    Failure,
    /// On delay.
    Delay,
}

/// ORCPT= (RFC 3461): the original recipient, decoded from xtext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orcpt {
    /// The address type, such as `rfc822` or `utf-8`.
    pub addr_type: String,
    /// The address, decoded.
    pub addr: String,
}

/// Parameters of MAIL FROM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// SIZE= in octets.
    pub size: Option<u64>,
    /// BODY=.
    pub body: Body,
    /// SMTPUTF8.
    pub smtputf8: bool,
    /// RET=.
    pub ret: Option<DsnRet>,
    /// ENVID=, decoded.
    pub envid: Option<String>,
    /// AUTH= (RFC 4954), decoded; `<>` when the submitter is unknown.
    pub auth: Option<String>,
}

/// Parameters of RCPT TO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// NOTIFY=.
    pub notify: Option<Vec<DsnNotify>>,
    /// ORCPT=.
    pub orcpt: Option<Orcpt>,
}

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command<'a> {
    Helo(&'a str),
    Ehlo(&'a str),
    Lhlo(&'a str),
    Mail {
        path: &'a str,
        params: &'a str,
    },
    Rcpt {
        path: &'a str,
        params: &'a str,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth {
        mechanism: &'a str,
        initial: Option<&'a str>,
    },
}

pub(crate) fn syntax(text: &str) -> Reply {
    Reply::new(501, "5.5.4", &format!("Syntax: {text}"))
}

/// The path between angle brackets, and what follows `>`.
/// Quoted strings may contain `>`.
fn split_path(s: &str) -> Option<(&str, &str)> {
    let inner = s.strip_prefix('<')?;
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in inner.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '>' if !in_quote => {
                let rest = &inner[i + 1..];
                if !rest.is_empty() && !rest.starts_with(' ') {
                    return None;
                }
                return Some((&inner[..i], rest));
            }
            _ => {}
        }
    }
    None
}

/// Parses one command line (CRLF removed, already checked for NUL and UTF-8).
pub(crate) fn parse_command(line: &str) -> Result<Command<'_>, Reply> {
    let (verb, args) = match line.find(' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let upper = verb.to_ascii_uppercase();
    let no_args = |c: Command<'static>, usage: &str| match args {
        None => Ok(c),
        Some(_) => Err(syntax(usage)),
    };
    let one_arg = |usage: &str| match args {
        Some(a) if !a.is_empty() && !a.contains(' ') => Ok(a),
        _ => Err(syntax(usage)),
    };
    match upper.as_str() {
        "HELO" => one_arg("HELO hostname").map(Command::Helo),
        "EHLO" => one_arg("EHLO hostname").map(Command::Ehlo),
        "LHLO" => one_arg("LHLO hostname").map(Command::Lhlo),
        "MAIL" => {
            let usage = "MAIL FROM:<address>";
            let a = args.ok_or_else(|| syntax(usage))?;
            if a.len() < 5 || !a.as_bytes()[..5].eq_ignore_ascii_case(b"FROM:") {
                return Err(syntax(usage));
            }
            let a = &a[5..];
            let a = a.strip_prefix(' ').unwrap_or(a);
            let (path, params) = split_path(a).ok_or_else(|| syntax(usage))?;
            Ok(Command::Mail { path, params })
        }
        "RCPT" => {
            let usage = "RCPT TO:<address>";
            let a = args.ok_or_else(|| syntax(usage))?;
            if a.len() < 3 || !a.as_bytes()[..3].eq_ignore_ascii_case(b"TO:") {
                return Err(syntax(usage));
            }
            let a = &a[3..];
            let a = a.strip_prefix(' ').unwrap_or(a);
            let (path, params) = split_path(a).ok_or_else(|| syntax(usage))?;
            Ok(Command::Rcpt { path, params })
        }
        "DATA" => no_args(Command::Data, "DATA"),
        "BDAT" => {
            let usage = "BDAT count [LAST]";
            let a = args.ok_or_else(|| syntax(usage))?;
            let mut it = a.split(' ');
            let n = it.next().unwrap_or("");
            let last = match it.next() {
                None => false,
                Some(l) if l.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Err(syntax(usage)),
            };
            if it.next().is_some()
                || n.is_empty()
                || n.len() > 19
                || !n.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(syntax(usage));
            }
            let size = n.parse().map_err(|_| syntax(usage))?;
            Ok(Command::Bdat { size, last })
        }
        "RSET" => no_args(Command::Rset, "RSET"),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit, "QUIT"),
        "VRFY" => match args {
            Some(a) if !a.is_empty() => Ok(Command::Vrfy),
            _ => Err(syntax("VRFY address")),
        },
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_args(Command::StartTls, "STARTTLS"),
        "AUTH" => {
            let usage = "AUTH mechanism [initial-response]";
            let a = args.ok_or_else(|| syntax(usage))?;
            let mut it = a.split(' ');
            let mechanism = it.next().unwrap_or("");
            let initial = it.next();
            if mechanism.is_empty() || it.next().is_some() || initial == Some("") {
                return Err(syntax(usage));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        _ => Err(Reply::new(500, "5.5.2", "Error: command not recognized")),
    }
}

/// `KEYWORD[=value]` tokens; any run of spaces separates them.
fn tokens(params: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    params
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| match t.find('=') {
            Some(i) => (&t[..i], Some(&t[i + 1..])),
            None => (t, None),
        })
}

fn bad_value(keyword: &str) -> Reply {
    Reply::new(501, "5.5.4", &format!("Bad {keyword} parameter value"))
}

fn unsupported(keyword: &str) -> Reply {
    // The keyword (or `KEYWORD=value` we name) is echoed only if it is short, plain ASCII.
    let k = if keyword.len() <= 20
        && keyword
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'=')
    {
        keyword
    } else {
        "parameter"
    };
    Reply::new(555, "5.5.4", &format!("Unsupported option: {k}"))
}

fn duplicate(keyword: &str) -> Reply {
    Reply::new(501, "5.5.4", &format!("Duplicate {keyword} parameter"))
}

/// What the session allows in MAIL parameters.
pub(crate) struct MailParamPolicy {
    pub esmtp: bool,
    pub binarymime: bool,
    pub auth: bool,
}

pub(crate) fn parse_mail_params(params: &str, p: &MailParamPolicy) -> Result<MailParams, Reply> {
    let mut out = MailParams::default();
    let mut seen_body = false;
    let mut seen_utf8 = false;
    for (k, v) in tokens(params) {
        if !p.esmtp {
            return Err(Reply::new(
                555,
                "5.5.4",
                "Error: MAIL parameters require EHLO",
            ));
        }
        let kw = k.to_ascii_uppercase();
        match (kw.as_str(), v) {
            ("SIZE", Some(v)) => {
                if out.size.is_some() {
                    return Err(duplicate("SIZE"));
                }
                if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad_value("SIZE"));
                }
                // Larger than u64: certainly too large.
                out.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) => {
                if seen_body {
                    return Err(duplicate("BODY"));
                }
                seen_body = true;
                out.body = match v.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    "BINARYMIME" if p.binarymime => Body::BinaryMime,
                    "BINARYMIME" => return Err(unsupported("BODY=BINARYMIME")),
                    _ => return Err(bad_value("BODY")),
                };
            }
            ("SMTPUTF8", None) => {
                if seen_utf8 {
                    return Err(duplicate("SMTPUTF8"));
                }
                seen_utf8 = true;
                out.smtputf8 = true;
            }
            ("RET", Some(v)) => {
                if out.ret.is_some() {
                    return Err(duplicate("RET"));
                }
                out.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => DsnRet::Full,
                    "HDRS" => DsnRet::Hdrs,
                    _ => return Err(bad_value("RET")),
                });
            }
            ("ENVID", Some(v)) => {
                if out.envid.is_some() {
                    return Err(duplicate("ENVID"));
                }
                if v.is_empty() || v.len() > 100 {
                    return Err(bad_value("ENVID"));
                }
                out.envid = Some(decode_xtext(v).map_err(|_| bad_value("ENVID"))?);
            }
            ("AUTH", Some(v)) if p.auth => {
                if out.auth.is_some() {
                    return Err(duplicate("AUTH"));
                }
                if v.is_empty() || v.len() > 500 {
                    return Err(bad_value("AUTH"));
                }
                out.auth = Some(decode_xtext(v).map_err(|_| bad_value("AUTH"))?);
            }
            ("SIZE" | "BODY" | "RET" | "ENVID", None) => return Err(bad_value(k)),
            ("SMTPUTF8", Some(_)) => return Err(bad_value(k)),
            _ => return Err(unsupported(k)),
        }
    }
    Ok(out)
}

pub(crate) fn parse_rcpt_params(params: &str, esmtp: bool) -> Result<RcptParams, Reply> {
    let mut out = RcptParams::default();
    for (k, v) in tokens(params) {
        if !esmtp {
            return Err(Reply::new(
                555,
                "5.5.4",
                "Error: RCPT parameters require EHLO",
            ));
        }
        let kw = k.to_ascii_uppercase();
        match (kw.as_str(), v) {
            ("NOTIFY", Some(v)) => {
                if out.notify.is_some() {
                    return Err(duplicate("NOTIFY"));
                }
                let mut list = Vec::new();
                for item in v.split(',') {
                    let n = match item.to_ascii_uppercase().as_str() {
                        "NEVER" => DsnNotify::Never,
                        "SUCCESS" => DsnNotify::Success,
                        "FAILURE" => DsnNotify::Failure,
                        "DELAY" => DsnNotify::Delay,
                        _ => return Err(bad_value("NOTIFY")),
                    };
                    if list.contains(&n) {
                        return Err(bad_value("NOTIFY"));
                    }
                    list.push(n);
                }
                if list.contains(&DsnNotify::Never) && list.len() > 1 {
                    return Err(bad_value("NOTIFY"));
                }
                out.notify = Some(list);
            }
            ("ORCPT", Some(v)) => {
                if out.orcpt.is_some() {
                    return Err(duplicate("ORCPT"));
                }
                let (t, a) = v.split_once(';').ok_or_else(|| bad_value("ORCPT"))?;
                if t.is_empty()
                    || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    || a.is_empty()
                    || v.len() > 500
                {
                    return Err(bad_value("ORCPT"));
                }
                let addr = decode_xtext(a).map_err(|_| bad_value("ORCPT"))?;
                out.orcpt = Some(Orcpt {
                    addr_type: t.to_string(),
                    addr,
                });
            }
            ("NOTIFY" | "ORCPT", None) => return Err(bad_value(k)),
            _ => return Err(unsupported(k)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(
            parse_command("mail from:<a@b>"),
            Ok(Command::Mail {
                path: "a@b",
                params: ""
            })
        );
        assert_eq!(
            parse_command("MAIL FROM: <a@b> SIZE=1"),
            Ok(Command::Mail {
                path: "a@b",
                params: " SIZE=1"
            })
        );
        assert_eq!(
            parse_command("RCPT TO:<\"x>y\"@b>"),
            Ok(Command::Rcpt {
                path: "\"x>y\"@b",
                params: ""
            })
        );
        for bad in [
            "MAIL FROM:a@b",
            "MAIL FROM:<a@b",
            "MAIL FROM:<a@b>x",
            "MAIL FROM:  <a@b>",
            "MAIL  FROM:<a@b>",
            "MAIL TO:<a@b>",
            "RCPT TO:a@b",
            "DATA x",
            "STARTTLS x",
            "QUIT now",
            "BDAT",
            "BDAT x",
            "BDAT 1 LAST x",
            "BDAT 1 FIRST",
            "BDAT -1",
            "BDAT 99999999999999999999",
            "AUTH",
            "HELO",
            "EHLO a b",
        ] {
            assert_eq!(parse_command(bad).unwrap_err().code(), 501, "{bad}");
        }
        assert_eq!(parse_command("FOO").unwrap_err().code(), 500);
        // Multi-byte characters where ASCII keywords are expected (found by fuzzing).
        for s in ["MAIL é:<a@b>", "MAIL FRé:<a@b>", "RCPT é", "RCPT Té:<a@b>"] {
            assert_eq!(parse_command(s).unwrap_err().code(), 501, "{s}");
        }
        assert!(crate::address::Domain::parse("[IPvé:1]", true).is_err());
        assert_eq!(
            parse_command("BDAT 10 last"),
            Ok(Command::Bdat {
                size: 10,
                last: true
            })
        );
    }

    #[test]
    fn params() {
        let p = MailParamPolicy {
            esmtp: true,
            binarymime: false,
            auth: false,
        };
        let m =
            parse_mail_params(" SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=a+2Bb", &p).unwrap();
        assert_eq!(m.size, Some(100));
        assert_eq!(m.body, Body::EightBitMime);
        assert!(m.smtputf8);
        assert_eq!(m.ret, Some(DsnRet::Hdrs));
        assert_eq!(m.envid.as_deref(), Some("a+b"));
        assert_eq!(parse_mail_params("FOO=1", &p).unwrap_err().code(), 555);
        assert_eq!(parse_mail_params("AUTH=<>", &p).unwrap_err().code(), 555);
        assert_eq!(
            parse_mail_params("BODY=BINARYMIME", &p).unwrap_err(),
            Reply::new(555, "5.5.4", "Unsupported option: BODY=BINARYMIME")
        );
        assert_eq!(parse_mail_params("SIZE=x", &p).unwrap_err().code(), 501);
        assert_eq!(
            parse_mail_params("SIZE=1 SIZE=2", &p).unwrap_err().code(),
            501
        );
        assert_eq!(parse_mail_params("ENVID=a+zz", &p).unwrap_err().code(), 501);
        assert_eq!(parse_mail_params("RET=ALL", &p).unwrap_err().code(), 501);
        let helo = MailParamPolicy {
            esmtp: false,
            binarymime: false,
            auth: false,
        };
        assert_eq!(parse_mail_params("SIZE=1", &helo).unwrap_err().code(), 555);

        let r = parse_rcpt_params("NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+40b", true).unwrap();
        assert_eq!(r.notify, Some(vec![DsnNotify::Success, DsnNotify::Delay]));
        assert_eq!(
            r.orcpt,
            Some(Orcpt {
                addr_type: "rfc822".into(),
                addr: "a@b".into()
            })
        );
        for bad in [
            "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=",
            "NOTIFY=SOMETIMES",
            "NOTIFY=DELAY,DELAY",
            "ORCPT=rfc822",
            "ORCPT=;a",
            "ORCPT=rfc822;a+",
        ] {
            assert_eq!(
                parse_rcpt_params(bad, true).unwrap_err().code(),
                501,
                "{bad}"
            );
        }
        assert_eq!(parse_rcpt_params("X=1", true).unwrap_err().code(), 555);
        assert_eq!(
            parse_rcpt_params("NOTIFY=NEVER", false).unwrap_err().code(),
            555
        );
    }
}

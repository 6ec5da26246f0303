//! Independent DKIM verification for tests: dkimpy (Debian `python3-dkim`; `python3-nacl` for
//! ed25519-sha256), run by `/usr/bin/python3`, with a `dnsfunc` that answers TXT queries from
//! the records the test gives, so no DNS is needed.
//!
//! ```ignore
//! if !common::dkimverify::dkimpy_available() { return; } // prints SKIP, or panics when required
//! let rec = ringmail_mx::dkim::keygen(DkimAlgo::Ed25519, 0, "example.com", "s1", &key)?;
//! let records = vec![common::dkimverify::zone_txt(&rec).unwrap()];
//! let results = common::dkimverify::dkim_verify(&message, &records)?;
//! assert_eq!(results, ["d=example.com s=s1 a=ed25519-sha256 pass"]);
//! ```
//!
//! This file stands alone (std only) so that other test crates can include it with
//! `#[path = ".../tests/common/dkimverify.rs"] mod dkimverify;` (roles/mx does); keep it so.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};

/// The interpreter the Debian packages install their modules for.
pub const PYTHON: &str = "/usr/bin/python3";

/// Debian packages the verifier needs, for messages.
pub const PACKAGES: &str = "python3-dkim python3-nacl";

/// `None` when dkimpy and PyNaCl can be imported; otherwise what is missing.
pub fn dkimpy_missing() -> Option<String> {
    let mut missing = Vec::new();
    for (module, package) in [("dkim", "python3-dkim"), ("nacl", "python3-nacl")] {
        let ok = Command::new(PYTHON)
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing.push(package);
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// True when dkimpy can run. Otherwise prints `SKIP: python3-dkim not installed …` and returns
/// false, or panics when `RINGMAIL_REQUIRE_ALL=1`.
pub fn dkimpy_available() -> bool {
    let Some(missing) = dkimpy_missing() else {
        return true;
    };
    let msg = format!("SKIP: {missing} not installed (Debian packages: {PACKAGES})");
    if std::env::var("RINGMAIL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{msg}, and RINGMAIL_REQUIRE_ALL=1");
    }
    eprintln!("{msg}");
    false
}

const VERIFY_PY: &str = r#"
import json, logging, sys
import dkim
from dkim.util import parse_tag_value

records = {name.lower().rstrip("."): data for name, data in json.loads(sys.argv[1])}

def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    data = records.get(name.lower().rstrip("."))
    return data.encode() if data is not None else None

class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []
    def emit(self, record):
        if record.levelno >= logging.INFO:
            self.lines.append(record.getMessage())

message = sys.stdin.buffer.read()
sigs = [v for k, v in dkim.DKIM(message).headers if k.lower() == b"dkim-signature"]
for idx, value in enumerate(sigs):
    try:
        tags = parse_tag_value(value)
    except Exception:
        tags = {}
    who = " ".join(
        "%s=%s" % (t, tags.get(t.encode(), b"?").decode("ascii", "replace")) for t in "dsa"
    )
    collect = Collect()
    logger = logging.getLogger("dkimverify%d" % idx)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(collect)
    try:
        ok = dkim.DKIM(message, logger=logger).verify(idx=idx, dnsfunc=dnsfunc)
        why = "; ".join(collect.lines)
    except Exception as e:
        ok, why = False, "%s: %s" % (type(e).__name__, e)
    print(who + (" pass" if ok else " fail (%s)" % (why or "signature did not verify")))
"#;

/// Verifies every DKIM-Signature of `message` with dkimpy, answering key queries from
/// `txt_records` (name without the trailing dot, e.g. `s1._domainkey.example.com`, → TXT data,
/// the strings joined). Returns one line per signature, top first:
/// `d=<domain> s=<selector> a=<algorithm> pass`, or `… fail (<reason>)`; empty when there is
/// none. `Err` when dkimpy cannot be run.
pub fn dkim_verify(
    message: &[u8],
    txt_records: &[(String, String)],
) -> Result<Vec<String>, String> {
    let records = format!(
        "[{}]",
        txt_records
            .iter()
            .map(|(n, d)| format!("[{},{}]", json_string(n), json_string(d)))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut child = Command::new(PYTHON)
        .args(["-c", VERIFY_PY, &records])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {PYTHON}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let message = message.to_vec();
    // Write from a thread so a large message cannot deadlock against the output pipe.
    let writer = std::thread::spawn(move || stdin.write_all(&message));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("dkimpy: {e}"))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(format!(
            "dkimpy failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// A zone-file TXT line as `ringmail dkim keygen` prints it (`NAME. IN TXT ( "…" "…" )`, or
/// without the parentheses) → (name without the trailing dot, the strings joined).
pub fn zone_txt(line: &str) -> Option<(String, String)> {
    let (name, rest) = line.trim().split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let rest = rest.strip_prefix("IN").unwrap_or(rest).trim_start();
    let rest = rest.strip_prefix("TXT")?;
    let mut data = String::new();
    let mut parts = rest.split('"');
    parts.next()?;
    // Inside quotes at odd positions (no escapes in DKIM records).
    for (i, part) in parts.enumerate() {
        if i % 2 == 0 {
            data.push_str(part);
        }
    }
    Some((name.trim_end_matches('.').to_string(), data))
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

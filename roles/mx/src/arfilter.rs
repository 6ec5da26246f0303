//! Removes `Authentication-Results:` fields that carry our own authserv-id from a message's
//! header section as it streams into the spool (RFC 8601 section 5: a border MTA must not let
//! a sender forge results in its name). `ARC-Authentication-Results` and A-R fields of other
//! authserv-ids pass untouched. No I/O: bytes in, bytes out.
//!
//! A field is held until its last folded line has arrived; one longer than [`MAX_FIELD`] is
//! judged on its first [`MAX_FIELD`] bytes (the SMTP core already limits content lines to
//! 1000 octets, so a partial line never grows beyond that).

/// Largest field held for judging.
pub const MAX_FIELD: usize = 64 * 1024;

/// The streaming filter of one message.
#[derive(Debug)]
pub struct ArFilter {
    authserv_id: String,
    /// Past the header section: everything passes.
    body: bool,
    /// Bytes of an incomplete line.
    partial: Vec<u8>,
    /// The field being assembled (its complete lines).
    field: Vec<u8>,
    /// The current field was already judged (too long): keep (`true`) or drop its remaining
    /// continuation lines.
    decided: Option<bool>,
    /// Fields removed.
    pub removed: u32,
}

impl ArFilter {
    pub fn new(authserv_id: &str) -> ArFilter {
        ArFilter {
            authserv_id: authserv_id.to_ascii_lowercase(),
            body: false,
            partial: Vec::new(),
            field: Vec::new(),
            decided: None,
            removed: 0,
        }
    }

    /// Filters the next bytes of the message, appending what is kept to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.body {
                out.extend_from_slice(input);
                return;
            }
            let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                self.partial.extend_from_slice(input);
                if self.partial.len() > MAX_FIELD {
                    // Not a header line the core would let through; stop judging.
                    self.end_fields(out);
                    out.append(&mut self.partial);
                    self.body = true;
                }
                return;
            };
            self.partial.extend_from_slice(&input[..=nl]);
            input = &input[nl + 1..];
            let line = std::mem::take(&mut self.partial);
            self.line(line, out);
        }
    }

    /// The message ended: flushes what is held.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.body {
            self.end_fields(out);
            out.append(&mut self.partial);
            self.body = true;
        }
    }

    fn line(&mut self, line: Vec<u8>, out: &mut Vec<u8>) {
        if line == b"\r\n" || line == b"\n" {
            self.end_fields(out);
            out.extend_from_slice(&line);
            self.body = true;
            return;
        }
        if matches!(line[0], b' ' | b'\t') && (self.decided.is_some() || !self.field.is_empty()) {
            match self.decided {
                Some(true) => out.extend_from_slice(&line),
                Some(false) => {}
                None => {
                    self.field.extend_from_slice(&line);
                    if self.field.len() > MAX_FIELD {
                        let keep = !self.forged(&self.field);
                        if keep {
                            out.append(&mut self.field);
                        } else {
                            self.removed += 1;
                            self.field.clear();
                        }
                        self.decided = Some(keep);
                    }
                }
            }
            return;
        }
        self.end_fields(out);
        self.field = line;
    }

    /// Judges and emits (or drops) the field being assembled.
    fn end_fields(&mut self, out: &mut Vec<u8>) {
        if self.decided.take().is_some() {
            return;
        }
        if self.field.is_empty() {
            return;
        }
        if self.forged(&self.field) {
            self.removed += 1;
            self.field.clear();
        } else {
            out.append(&mut self.field);
        }
    }

    /// An `Authentication-Results` field whose authserv-id is ours.
    fn forged(&self, field: &[u8]) -> bool {
        authserv_id(field).is_some_and(|id| id.eq_ignore_ascii_case(&self.authserv_id))
    }
}

/// The authserv-id of an `Authentication-Results` field (`None`: another field, or none
/// found). CFWS (folding, comments) before it is skipped; a quoted-string is unquoted.
pub fn authserv_id(field: &[u8]) -> Option<String> {
    let colon = field.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&field[..colon]).ok()?.trim();
    if !name.eq_ignore_ascii_case("Authentication-Results") {
        return None;
    }
    let v = &field[colon + 1..];
    let mut i = 0;
    // CFWS: whitespace (folding included) and nested comments with quoted-pairs.
    loop {
        while i < v.len() && matches!(v[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        if i < v.len() && v[i] == b'(' {
            let mut depth = 0usize;
            while i < v.len() {
                match v[i] {
                    b'\\' => i += 1,
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            continue;
        }
        break;
    }
    let rest = v.get(i..)?;
    let id: Vec<u8> = if rest.first() == Some(&b'"') {
        let mut id = Vec::new();
        let mut j = 1;
        while j < rest.len() && rest[j] != b'"' {
            if rest[j] == b'\\' {
                j += 1;
            }
            if let Some(&b) = rest.get(j) {
                id.push(b);
            }
            j += 1;
        }
        id
    } else {
        rest.iter()
            .take_while(|&&b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b';' | b'('))
            .copied()
            .collect()
    };
    if id.is_empty() {
        return None;
    }
    String::from_utf8(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(msg: &[u8], chunk: usize) -> (Vec<u8>, u32) {
        let mut f = ArFilter::new("MX.example.test");
        let mut out = Vec::new();
        for c in msg.chunks(chunk) {
            f.push(c, &mut out);
        }
        f.finish(&mut out);
        (out, f.removed)
    }

    const FORGED: &[u8] = b"Received: from x\r\n\
Authentication-Results: mx.example.test; dkim=pass header.d=example.test; spf=pass; dmarc=pass\r\n\
Authentication-Results: (comment (nested)) \"MX.Example.Test\";\r\n\tspf=pass\r\n\
authentication-results:\r\n mx.example.test\r\n ; dkim=pass\r\n\
Authentication-Results: other.example; spf=fail\r\n\
ARC-Authentication-Results: i=1; mx.example.test; spf=pass\r\n\
Authentication-Results: mx.example.test.evil; spf=pass\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.example.test; body lines are not headers\r\n";

    const KEPT: &[u8] = b"Received: from x\r\n\
Authentication-Results: other.example; spf=fail\r\n\
ARC-Authentication-Results: i=1; mx.example.test; spf=pass\r\n\
Authentication-Results: mx.example.test.evil; spf=pass\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.example.test; body lines are not headers\r\n";

    #[test]
    fn removes_our_authserv_id_at_every_chunk_boundary() {
        for chunk in 1..=FORGED.len() {
            let (out, removed) = filter(FORGED, chunk);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(KEPT),
                "chunk {chunk}"
            );
            assert_eq!(removed, 3);
        }
    }

    #[test]
    fn passes_messages_without_such_fields_unchanged() {
        let msgs: [&[u8]; 4] = [
            b"Subject: a\r\n\r\nbody\r\n",
            b"Subject: no body",
            b"\r\nbody only\r\n",
            b" leading continuation\r\nSubject: x\r\n\r\n",
        ];
        for m in msgs {
            assert_eq!(filter(m, 3).0, m);
        }
    }

    #[test]
    fn authserv_ids() {
        assert_eq!(
            authserv_id(b"Authentication-Results: a.b; spf=pass\r\n").as_deref(),
            Some("a.b")
        );
        assert_eq!(
            authserv_id(b"Authentication-Results : (c) a.b 1; none\r\n").as_deref(),
            Some("a.b")
        );
        assert_eq!(
            authserv_id(b"ARC-Authentication-Results: i=1; a.b\r\n"),
            None
        );
        assert_eq!(authserv_id(b"Subject: a.b\r\n"), None);
    }

    #[test]
    fn an_overlong_forged_field_is_still_removed() {
        let mut m = b"Authentication-Results: mx.example.test;\r\n".to_vec();
        for _ in 0..2000 {
            m.extend_from_slice(b" spf=pass (padding padding padding padding)\r\n");
        }
        m.extend_from_slice(b"Subject: x\r\n\r\nb\r\n");
        let (out, removed) = filter(&m, 4096);
        assert_eq!(out, b"Subject: x\r\n\r\nb\r\n");
        assert_eq!(removed, 1);
    }
}

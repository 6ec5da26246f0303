//! Message content for FETCH and SEARCH: the MIME tree (from mail-parser) with byte ranges
//! into the raw message, body sections, ENVELOPE and BODYSTRUCTURE as imap-types values.

use std::num::NonZeroU32;
use std::ops::Range;

use imap_codec::imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, Language, Location, MultiPartExtensionData,
    SinglePartExtensionData, SpecificFields,
};
use imap_codec::imap_types::core::{AString, IString, Literal, NString, NonEmptyVec};
use imap_codec::imap_types::envelope::{Address as ImapAddress, Envelope};
use imap_codec::imap_types::fetch::{Part, Section};
use mail_parser::{Address, HeaderValue, Message, MessageParser, MimeHeaders, PartType};

use crate::cte::{self, Cte};

/// Deepest message/rfc822 nesting the tree follows; deeper parts are opaque.
const MAX_DEPTH: usize = 8;

/// One MIME part with absolute byte ranges.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    header: Range<usize>,
    body: Range<usize>,
    ctype: String,
    subtype: String,
    params: Vec<(String, String)>,
    id: Option<String>,
    description: Option<String>,
    encoding: Option<String>,
    disposition: Option<(String, Vec<(String, String)>)>,
    language: Vec<String>,
    location: Option<String>,
    children: Vec<Node>,
    /// For message/rfc822: the root of the encapsulated message.
    message: Option<Box<Node>>,
}

/// A parsed message: the raw bytes and the MIME tree.
pub(crate) struct Parsed<'a> {
    pub raw: &'a [u8],
    pub root: Node,
}

impl<'a> Parsed<'a> {
    pub fn new(raw: &'a [u8]) -> Parsed<'a> {
        Parsed {
            raw,
            root: build(raw, 0..raw.len(), 0),
        }
    }

    /// The header block of the top-level message (with the blank line).
    pub fn header(&self) -> &[u8] {
        &self.raw[self.root.header.clone()]
    }

    /// The body of the top-level message.
    pub fn text(&self) -> &[u8] {
        &self.raw[self.root.body.clone()]
    }

    fn find(&self, part: &Part) -> Option<&Node> {
        self.find_path(part.0.as_ref())
    }

    fn find_path(&self, path: &[NonZeroU32]) -> Option<&Node> {
        let mut cur = &self.root;
        for (i, n) in path.iter().enumerate() {
            if i > 0
                && let Some(m) = &cur.message
            {
                cur = m;
            }
            let n = n.get() as usize;
            if !cur.children.is_empty() {
                cur = cur.children.get(n - 1)?;
            } else if n != 1 {
                return None;
            }
        }
        Some(cur)
    }

    /// The bytes of a body section; `None` when the part does not exist (FETCH then returns
    /// an empty string, as most servers do).
    pub fn section(&self, section: Option<&Section<'_>>) -> Option<Vec<u8>> {
        let raw = self.raw;
        let nested = |p: &Option<Part>| -> Option<&Node> {
            match p {
                None => Some(&self.root),
                Some(p) => self.find(p)?.message.as_deref(),
            }
        };
        Some(match section {
            None => raw.to_vec(),
            Some(Section::Part(p)) => raw[self.find(p)?.body.clone()].to_vec(),
            Some(Section::Header(p)) => raw[nested(p)?.header.clone()].to_vec(),
            Some(Section::Text(p)) => raw[nested(p)?.body.clone()].to_vec(),
            Some(Section::Mime(p)) => raw[self.find(p)?.header.clone()].to_vec(),
            Some(Section::HeaderFields(p, names)) => {
                filter_fields(&raw[nested(p)?.header.clone()], names.as_ref(), true)
            }
            Some(Section::HeaderFieldsNot(p, names)) => {
                filter_fields(&raw[nested(p)?.header.clone()], names.as_ref(), false)
            }
        })
    }

    /// BINARY[part] (RFC 3516): the section with its Content-Transfer-Encoding decoded.
    /// An empty part is the whole message with every part decoded and its header then naming
    /// `binary` (as Dovecot does). `Ok(None)`: no such part.
    pub fn binary(&self, part: &[NonZeroU32]) -> Result<Option<Vec<u8>>, UnknownCte> {
        if part.is_empty() {
            let mut out = Vec::with_capacity(self.raw.len());
            convert(
                self.raw,
                &self.root,
                &mut out,
                &mut |header, body, cte, out| {
                    let cte = Cte::of(cte).ok_or(UnknownCte)?;
                    if cte == Cte::Identity {
                        out.extend_from_slice(header);
                        out.extend_from_slice(body);
                    } else {
                        out.extend_from_slice(&cte::with_cte(header, "binary"));
                        out.extend_from_slice(&cte.decode(body));
                    }
                    Ok(())
                },
            )?;
            return Ok(Some(out));
        }
        let Some(node) = self.find_path(part) else {
            return Ok(None);
        };
        let cte = Cte::of(node.encoding.as_deref()).ok_or(UnknownCte)?;
        Ok(Some(cte.decode(&self.raw[node.body.clone()])))
    }

    pub fn body_structure(&self, extensible: bool) -> BodyStructure<'static> {
        structure(self.raw, &self.root, extensible)
    }
}

/// A Content-Transfer-Encoding that BINARY cannot decode (`NO [UNKNOWN-CTE]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnknownCte;

/// The leaf parts of a message rewritten by `leaf(header, body, encoding, out)`; multipart
/// bodies (boundaries, preamble, epilogue) and message/rfc822 wrappers are copied as they
/// are. A node whose parts overlap or leave its body (a broken tree) is copied whole.
type Leaf<'f> = dyn FnMut(&[u8], &[u8], Option<&str>, &mut Vec<u8>) -> Result<(), UnknownCte> + 'f;

fn convert(raw: &[u8], n: &Node, out: &mut Vec<u8>, leaf: &mut Leaf<'_>) -> Result<(), UnknownCte> {
    let inner: Vec<&Node> = if !n.children.is_empty() {
        n.children.iter().collect()
    } else if let Some(m) = &n.message
        && Cte::of(n.encoding.as_deref()) == Some(Cte::Identity)
    {
        vec![m.as_ref()]
    } else {
        return leaf(
            &raw[n.header.clone()],
            &raw[n.body.clone()],
            n.encoding.as_deref(),
            out,
        );
    };
    let mut at = n.body.start;
    let sane = n.header.end <= n.body.start
        && inner.iter().all(|c| {
            let ok =
                c.header.start >= at && c.header.end <= c.body.start && c.body.end <= n.body.end;
            at = c.body.end.max(at);
            ok
        });
    if !sane {
        out.extend_from_slice(&raw[n.header.start..n.body.end]);
        return Ok(());
    }
    out.extend_from_slice(&raw[n.header.clone()]);
    let mut at = n.body.start;
    for c in inner {
        out.extend_from_slice(&raw[at..c.header.start]);
        convert(raw, c, out, leaf)?;
        at = c.body.end;
    }
    out.extend_from_slice(&raw[at..n.body.end]);
    Ok(())
}

/// A message APPENDed as literal8, for storing: parts whose Content-Transfer-Encoding is
/// `binary` are base64-encoded and their header then names `base64` (as Dovecot does).
pub(crate) fn encode_binary_parts(raw: &[u8]) -> Vec<u8> {
    let p = Parsed::new(raw);
    let mut out = Vec::with_capacity(raw.len());
    let r = convert(raw, &p.root, &mut out, &mut |header, body, cte, out| {
        if cte.is_some_and(|c| c.trim().eq_ignore_ascii_case("binary")) {
            // The body exactly as BODY[n] has it, so BINARY[n] gives the same octets after.
            out.extend_from_slice(&cte::with_cte(header, "base64"));
            out.extend_from_slice(&cte::base64_lines(body));
        } else {
            out.extend_from_slice(header);
            out.extend_from_slice(body);
        }
        Ok(())
    });
    match r {
        Ok(()) => out,
        Err(UnknownCte) => raw.to_vec(),
    }
}

fn build(raw: &[u8], range: Range<usize>, depth: usize) -> Node {
    let base = range.start;
    let slice = &raw[range.clone()];
    let plain = || Node {
        header: base..base,
        body: range.clone(),
        ctype: "text".into(),
        subtype: "plain".into(),
        params: vec![],
        id: None,
        description: None,
        encoding: None,
        disposition: None,
        language: vec![],
        location: None,
        children: vec![],
        message: None,
    };
    match MessageParser::default().parse(slice) {
        Some(msg) if !msg.parts.is_empty() => from_part(raw, &msg, 0, base, depth, 0),
        _ => plain(),
    }
}

fn clamp(r: Range<usize>, len: usize) -> Range<usize> {
    let end = r.end.min(len);
    r.start.min(end)..end
}

fn from_part(
    raw: &[u8],
    msg: &Message<'_>,
    id: usize,
    base: usize,
    depth: usize,
    level: usize,
) -> Node {
    let p = &msg.parts[id];
    let header = clamp(
        base + p.offset_header as usize..base + p.offset_body as usize,
        raw.len(),
    );
    let body = clamp(
        base + p.offset_body as usize..base + p.offset_end as usize,
        raw.len(),
    );
    let (ctype, subtype, params) = match p.content_type() {
        Some(ct) => (
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or("plain").to_ascii_lowercase(),
            ct.attributes()
                .unwrap_or(&[])
                .iter()
                .map(|a| (a.name.to_string(), a.value.to_string()))
                .collect(),
        ),
        None => ("text".into(), "plain".into(), vec![]),
    };
    let mut node = Node {
        header,
        body: body.clone(),
        ctype,
        subtype,
        params,
        id: p.content_id().map(|s| format!("<{s}>")),
        description: p.content_description().map(str::to_owned),
        encoding: p.content_transfer_encoding().map(str::to_owned),
        disposition: p.content_disposition().map(|d| {
            (
                d.ctype().to_owned(),
                d.attributes()
                    .unwrap_or(&[])
                    .iter()
                    .map(|a| (a.name.to_string(), a.value.to_string()))
                    .collect(),
            )
        }),
        language: match p.content_language() {
            HeaderValue::Text(t) => vec![t.to_string()],
            HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
            _ => vec![],
        },
        location: p.content_location().map(str::to_owned),
        children: vec![],
        message: None,
    };
    match &p.body {
        PartType::Multipart(ids) if level < 64 => {
            node.children = ids
                .iter()
                .filter(|&&c| (c as usize) < msg.parts.len() && c as usize != id)
                .map(|&c| from_part(raw, msg, c as usize, base, depth, level + 1))
                .collect();
        }
        PartType::Message(_) if depth < MAX_DEPTH => {
            node.message = Some(Box::new(build(raw, body, depth + 1)));
        }
        _ => {}
    }
    node
}

fn filter_fields(header: &[u8], names: &[AString<'_>], keep: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut include = false;
    for line in header.split_inclusive(|&b| b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if !matches!(line.first(), Some(b' ' | b'\t')) {
            let name = line
                .iter()
                .position(|&b| b == b':')
                .map(|i| line[..i].trim_ascii_end())
                .unwrap_or(b"");
            let listed = names.iter().any(|n| n.as_ref().eq_ignore_ascii_case(name));
            include = listed == keep && !name.is_empty();
        }
        if include {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// An IMAP string: quoted when it can be, a literal otherwise.
pub(crate) fn istring(s: &str) -> IString<'static> {
    IString::try_from(s.to_owned())
        .unwrap_or_else(|_| IString::Literal(Literal::unvalidated(s.as_bytes().to_vec())))
}

pub(crate) fn nstring(s: Option<&str>) -> NString<'static> {
    NString(s.map(istring))
}

/// Bytes as an IMAP literal (NUL bytes included: imap-codec 1.0 has no literal8).
pub(crate) fn nstring_bytes(b: Vec<u8>) -> NString<'static> {
    NString(Some(IString::Literal(Literal::unvalidated(b))))
}

fn params(p: &[(String, String)]) -> Vec<(IString<'static>, IString<'static>)> {
    p.iter().map(|(k, v)| (istring(k), istring(v))).collect()
}

fn ext_tail(n: &Node) -> Option<Disposition<'static>> {
    Some(Disposition {
        disposition: n.disposition.as_ref().map(|(d, p)| (istring(d), params(p))),
        tail: Some(Language {
            language: n.language.iter().map(|l| istring(l)).collect(),
            tail: Some(Location {
                location: nstring(n.location.as_deref()),
                extensions: vec![],
            }),
        }),
    })
}

fn structure(raw: &[u8], n: &Node, ext: bool) -> BodyStructure<'static> {
    if let Ok(children) = NonEmptyVec::try_from(
        n.children
            .iter()
            .map(|c| structure(raw, c, ext))
            .collect::<Vec<_>>(),
    ) {
        return BodyStructure::Multi {
            bodies: children,
            subtype: istring(&n.subtype),
            extension_data: ext.then(|| MultiPartExtensionData {
                parameter_list: params(&n.params),
                tail: ext_tail(n),
            }),
        };
    }
    let body_bytes = &raw[n.body.clone()];
    // Lines, counting an unterminated last line.
    let lf = body_bytes.iter().filter(|&&b| b == b'\n').count();
    let partial = usize::from(body_bytes.last().is_some_and(|&b| b != b'\n'));
    let lines = u32::try_from(lf + partial).unwrap_or(u32::MAX);
    let specific = match (n.ctype.as_str(), &n.message) {
        ("text", _) => SpecificFields::Text {
            subtype: istring(&n.subtype),
            number_of_lines: lines,
        },
        ("message", Some(m)) => SpecificFields::Message {
            envelope: Box::new(envelope(body_bytes)),
            body_structure: Box::new(structure(raw, m, ext)),
            number_of_lines: lines,
        },
        _ => SpecificFields::Basic {
            r#type: istring(&n.ctype),
            subtype: istring(&n.subtype),
        },
    };
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: params(&n.params),
                id: nstring(n.id.as_deref()),
                description: nstring(n.description.as_deref()),
                content_transfer_encoding: istring(n.encoding.as_deref().unwrap_or("7bit")),
                size: u32::try_from(body_bytes.len()).unwrap_or(u32::MAX),
            },
            specific,
        },
        extension_data: ext.then(|| SinglePartExtensionData {
            md5: NString(None),
            tail: ext_tail(n),
        }),
    }
}

fn addresses(a: Option<&Address<'_>>) -> Vec<ImapAddress<'static>> {
    let one = |name: Option<&str>, addr: Option<&str>| {
        let (mailbox, host) = match addr.and_then(|a| a.rsplit_once('@')) {
            Some((m, h)) => (Some(m), Some(h)),
            None => (addr, None),
        };
        ImapAddress {
            name: nstring(name),
            adl: NString(None),
            mailbox: nstring(mailbox),
            host: nstring(host),
        }
    };
    match a {
        None => vec![],
        Some(Address::List(l)) => l
            .iter()
            .map(|x| one(x.name.as_deref(), x.address.as_deref()))
            .collect(),
        Some(Address::Group(groups)) => {
            let mut out = Vec::new();
            for g in groups {
                if let Some(name) = &g.name {
                    out.push(ImapAddress {
                        name: NString(None),
                        adl: NString(None),
                        mailbox: nstring(Some(name)),
                        host: NString(None),
                    });
                }
                out.extend(
                    g.addresses
                        .iter()
                        .map(|x| one(x.name.as_deref(), x.address.as_deref())),
                );
                if g.name.is_some() {
                    out.push(ImapAddress {
                        name: NString(None),
                        adl: NString(None),
                        mailbox: NString(None),
                        host: NString(None),
                    });
                }
            }
            out
        }
    }
}

/// The ENVELOPE of a message (RFC 9051 7.5.2).
pub(crate) fn envelope(raw: &[u8]) -> Envelope<'static> {
    let Some(m) = MessageParser::default().parse_headers(raw) else {
        return Envelope {
            date: NString(None),
            subject: NString(None),
            from: vec![],
            sender: vec![],
            reply_to: vec![],
            to: vec![],
            cc: vec![],
            bcc: vec![],
            in_reply_to: NString(None),
            message_id: NString(None),
        };
    };
    let raw_field = |name: &str| m.header_raw(name).map(|v| v.trim().to_owned());
    let from = addresses(m.from());
    let sender = match m.sender() {
        Some(s) => addresses(Some(s)),
        None => from.clone(),
    };
    let reply_to = match m.reply_to() {
        Some(s) => addresses(Some(s)),
        None => from.clone(),
    };
    Envelope {
        date: nstring(raw_field("Date").as_deref()),
        subject: nstring(raw_field("Subject").as_deref()),
        from,
        sender,
        reply_to,
        to: addresses(m.to()),
        cc: addresses(m.cc()),
        bcc: addresses(m.bcc()),
        in_reply_to: nstring(raw_field("In-Reply-To").as_deref()),
        message_id: nstring(raw_field("Message-ID").as_deref()),
    }
}

/// Case-insensitive (ASCII) substring test, as SEARCH uses.
pub(crate) fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Search helpers over one message's content.
pub(crate) struct SearchView<'a> {
    msg: Option<Message<'a>>,
    raw: &'a [u8],
}

impl<'a> SearchView<'a> {
    pub fn new(raw: &'a [u8]) -> SearchView<'a> {
        SearchView {
            msg: MessageParser::default().parse(raw),
            raw,
        }
    }

    /// Whether any field `name` contains `value` (raw and decoded forms are both tried).
    pub fn header_contains(&self, name: &str, value: &[u8]) -> bool {
        let Some(m) = &self.msg else { return false };
        m.headers().iter().any(|h| {
            if !h.name.as_str().eq_ignore_ascii_case(name) {
                return false;
            }
            let raw = self
                .raw
                .get(h.offset_start as usize..h.offset_end as usize)
                .unwrap_or(b"");
            if contains_ci(raw, value) {
                return true;
            }
            match &h.value {
                HeaderValue::Text(t) => contains_ci(t.as_bytes(), value),
                HeaderValue::TextList(l) => l.iter().any(|t| contains_ci(t.as_bytes(), value)),
                HeaderValue::Address(a) => {
                    let addrs: Vec<String> = match a {
                        Address::List(l) => l
                            .iter()
                            .map(|x| {
                                format!(
                                    "{} <{}>",
                                    x.name.as_deref().unwrap_or(""),
                                    x.address.as_deref().unwrap_or("")
                                )
                            })
                            .collect(),
                        Address::Group(g) => g
                            .iter()
                            .flat_map(|g| g.addresses.iter())
                            .map(|x| {
                                format!(
                                    "{} <{}>",
                                    x.name.as_deref().unwrap_or(""),
                                    x.address.as_deref().unwrap_or("")
                                )
                            })
                            .collect(),
                    };
                    addrs.iter().any(|s| contains_ci(s.as_bytes(), value))
                }
                _ => false,
            }
        })
    }

    /// BODY: the decoded text parts, or the raw body.
    pub fn body_contains(&self, value: &[u8]) -> bool {
        if let Some(m) = &self.msg {
            let body = &self.raw[(m.root_part().offset_body as usize).min(self.raw.len())..];
            if contains_ci(body, value) {
                return true;
            }
            for i in 0..m.text_body_count() {
                if let Some(t) = m.body_text(i)
                    && contains_ci(t.as_bytes(), value)
                {
                    return true;
                }
            }
            false
        } else {
            contains_ci(self.raw, value)
        }
    }

    pub fn text_contains(&self, value: &[u8]) -> bool {
        contains_ci(self.raw, value) || self.body_contains(value)
    }

    /// The date of the Date: header, disregarding time and zone.
    pub fn sent_date(&self) -> Option<chrono::NaiveDate> {
        let d = self.msg.as_ref()?.date()?;
        chrono::NaiveDate::from_ymd_opt(i32::from(d.year), u32::from(d.month), u32::from(d.day))
    }
}

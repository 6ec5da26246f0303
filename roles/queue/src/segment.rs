//! Segments: small messages, content and envelope together, appended to shared files.
//!
//! A message that fits in the write buffer never gets files of its own. At commit its record
//! (header, content, envelope) goes into the committer's current round, and the round is
//! appended to the current segment with one `pwrite` and made durable with the round's one
//! flush: no file creation, no rename and no directory fsync per message. When the message is
//! delivered, a small *done* record is appended (no flush: like an `unlink`, it survives
//! `kill -9` at once); a message that is deferred, held or rescheduled first moves to a file
//! pair in `msg/` (content and envelope, committed like any envelope replacement) and then gets
//! its done record. A segment whose messages are all done or moved is deleted, with one
//! `unlink` for thousands of messages.
//!
//! ```text
//! record = magic "RMq1" | kind u8 | id [19] | data_len u32le | env_len u32le | crc32 u32le
//!          | content [data_len] | envelope JSON [env_len]
//! ```
//!
//! `crc32` covers everything after the magic except itself. Records are only ever appended,
//! and a round is acknowledged only after its flush, so after a crash a segment is a run of
//! intact records followed, at most, by the torn remains of a round that was never
//! acknowledged: recovery reads records up to the first one that does not check out. A
//! segment is never appended to again after a restart (a new one is started), so a torn tail
//! stays at the end.
//!
//! A done record may live in a later segment than its message. Deleting that later segment
//! first would bring the message back at the next start, so a segment whose done records
//! refer to older segments still present is kept until those are gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::id::ID_LEN;
use crate::{QueueError, QueueId};

const MAGIC: &[u8; 4] = b"RMq1";
/// Bytes before a record's content.
pub(crate) const HEADER: usize = 4 + 1 + ID_LEN + 4 + 4 + 4;
const KIND_MESSAGE: u8 = 1;
const KIND_DONE: u8 = 2;
const CRC_AT: usize = HEADER - 4;
/// Size of a segment: written with zeros before use, so that appending a round changes no
/// metadata and its flush is one `fdatasync` of data blocks (no journal commit). A round that
/// does not fit goes to the next segment (a round bigger than a segment grows a fresh one).
pub(crate) const SEGMENT_SIZE: u64 = 8 << 20;

/// Where a message's record lies in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegLoc {
    /// The segment's number.
    pub seg: u64,
    /// Offset of the content.
    pub data_off: u64,
    /// Offset and length of the envelope.
    pub env_off: u64,
    pub env_len: u32,
}

/// A message record under construction: the header's room, then the content as it arrives.
pub(crate) fn start_record(capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(capacity.max(HEADER));
    buf.resize(HEADER, 0);
    buf
}

/// Completes a record started with [`start_record`] and filled with content: appends the
/// envelope and writes the header. Returns the content's length.
pub(crate) fn finish_message(buf: &mut Vec<u8>, id: &QueueId, env: &[u8]) -> u32 {
    let data_len = (buf.len() - HEADER) as u32;
    buf.extend_from_slice(env);
    write_header(buf, KIND_MESSAGE, id, data_len, env.len() as u32);
    data_len
}

/// Appends a done record for `id` to `out`.
pub(crate) fn push_done(out: &mut Vec<u8>, id: &QueueId) {
    let start = out.len();
    out.resize(start + HEADER, 0);
    write_header(&mut out[start..], KIND_DONE, id, 0, 0);
}

fn write_header(rec: &mut [u8], kind: u8, id: &QueueId, data_len: u32, env_len: u32) {
    rec[..4].copy_from_slice(MAGIC);
    rec[4] = kind;
    rec[5..5 + ID_LEN].copy_from_slice(id.as_str().as_bytes());
    rec[5 + ID_LEN..9 + ID_LEN].copy_from_slice(&data_len.to_le_bytes());
    rec[9 + ID_LEN..CRC_AT].copy_from_slice(&env_len.to_le_bytes());
    let crc = checksum(rec);
    rec[CRC_AT..HEADER].copy_from_slice(&crc.to_le_bytes());
}

fn checksum(rec: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&rec[4..CRC_AT]);
    h.update(&rec[HEADER..]);
    h.finalize()
}

/// One record read back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// A message: content at `data` (offset in the buffer parsed, length), then its envelope.
    Message {
        id: QueueId,
        data: (usize, u32),
        env: (usize, &'a [u8]),
    },
    /// The message `id` was delivered, removed or moved to a file pair.
    Done { id: QueueId },
}

/// Reads the record at the start of `buf`: the record and its length, `Ok(None)` at the end
/// of the buffer, or why the bytes here are not a record.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Record<'_>, usize)>, &'static str> {
    // The end: nothing more, or the zeros a segment is prepared with.
    if buf.first().is_none_or(|&b| b == 0) && buf.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if buf.len() < HEADER {
        return Err("truncated record header");
    }
    if &buf[..4] != MAGIC {
        return Err("no record magic");
    }
    let id = std::str::from_utf8(&buf[5..5 + ID_LEN])
        .ok()
        .and_then(|s| QueueId::parse(s).ok())
        .ok_or("invalid queue id")?;
    let u32_at = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let data_len = u32_at(5 + ID_LEN);
    let env_len = u32_at(9 + ID_LEN);
    let total = HEADER + data_len as usize + env_len as usize;
    if buf.len() < total {
        return Err("truncated record");
    }
    if checksum(&buf[..total]) != u32_at(CRC_AT) {
        return Err("checksum mismatch");
    }
    let rec = match buf[4] {
        KIND_MESSAGE if env_len > 0 => {
            let env_at = HEADER + data_len as usize;
            Record::Message {
                id,
                data: (HEADER, data_len),
                env: (env_at, &buf[env_at..total]),
            }
        }
        KIND_DONE if data_len == 0 && env_len == 0 => Record::Done { id },
        _ => return Err("unknown record kind"),
    };
    Ok(Some((rec, total)))
}

/// A segment's file name: its number in 16 hex digits, so names sort like numbers.
pub(crate) fn seg_name(no: u64) -> String {
    format!("{no:016x}.seg")
}

fn seg_number(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// A message found in a segment.
#[derive(Debug)]
pub(crate) struct Found {
    pub id: QueueId,
    pub loc: SegLoc,
    pub data_len: u32,
    pub env: Vec<u8>,
}

/// What the segments of a spool hold: every message record not followed by a done record.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Segment numbers, ascending.
    pub segments: Vec<u64>,
    /// Messages without a done record, in order.
    pub messages: Vec<Found>,
    /// Per segment, the older segments its done records refer to.
    pub done_for: HashMap<u64, BTreeSet<u64>>,
    /// Segments whose records end before their file does: (segment, offset, why).
    pub torn: Vec<(u64, u64, &'static str)>,
}

/// Reads every segment in `dir` (missing: none).
pub(crate) fn scan(dir: &Path) -> Result<Scan, QueueError> {
    let mut scan = Scan::default();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(QueueError::io("read directory", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| QueueError::io("read directory", dir, e))?;
        let name = entry.file_name();
        match name.to_str().and_then(seg_number) {
            Some(no) => scan.segments.push(no),
            None if name == SPARE => {}
            None => tracing::warn!("spool: ignoring unexpected file {}", entry.path().display()),
        }
    }
    scan.segments.sort_unstable();
    // id -> (segment, index in `messages`)
    let mut at: HashMap<QueueId, (u64, usize)> = HashMap::new();
    let mut done: Vec<usize> = Vec::new();
    for &no in &scan.segments {
        let path = dir.join(seg_name(no));
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            // Deleted while a reader (`inspect`) was listing: its messages are all done.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(QueueError::io("read", &path, e)),
        };
        let mut off = 0usize;
        loop {
            match parse(&bytes[off..]) {
                Ok(None) => break,
                Ok(Some((rec, len))) => {
                    match rec {
                        Record::Message { id, data, env } => {
                            at.insert(id.clone(), (no, scan.messages.len()));
                            scan.messages.push(Found {
                                id,
                                loc: SegLoc {
                                    seg: no,
                                    data_off: (off + data.0) as u64,
                                    env_off: (off + env.0) as u64,
                                    env_len: env.1.len() as u32,
                                },
                                data_len: data.1,
                                env: env.1.to_vec(),
                            });
                        }
                        Record::Done { id } => {
                            if let Some((seg, i)) = at.remove(&id) {
                                done.push(i);
                                if seg != no {
                                    scan.done_for.entry(no).or_default().insert(seg);
                                }
                            }
                        }
                    }
                    off += len;
                }
                Err(why) => {
                    scan.torn.push((no, off as u64, why));
                    break;
                }
            }
        }
    }
    done.sort_unstable();
    for i in done.into_iter().rev() {
        scan.messages.swap_remove(i);
    }
    scan.messages.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(scan)
}

/// Reads `len` bytes at `off` of a segment.
pub(crate) fn read_at(file: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

struct Seg {
    file: Arc<File>,
    len: u64,
    /// Messages in this segment neither done nor moved.
    live: usize,
    /// Older segments that this one's done records refer to.
    done_for: BTreeSet<u64>,
}

/// The name a segment is prepared under; it gets its number when it is taken into use, so
/// that numbers follow the order segments are written in (done records only ever refer to
/// the same or an older segment).
const SPARE: &str = "next.spare";

/// A segment prepared (zeroed and flushed) before it is needed.
type Spare = Arc<Mutex<Option<File>>>;

/// The segments of an open spool: the one being appended to and the older ones still holding
/// messages.
pub(crate) struct Segments {
    dir: PathBuf,
    segs: BTreeMap<u64, Seg>,
    /// The segment rounds and done records go to; `None` until the first append after open.
    current: Option<u64>,
    next_no: u64,
    /// The next segment, prepared by a thread of its own while the current one fills.
    spare: Spare,
    preparing: Option<JoinHandle<()>>,
}

impl Drop for Segments {
    fn drop(&mut self) {
        if let Some(h) = self.preparing.take() {
            let _ = h.join();
        }
    }
}

/// Creates the spare segment filled with zeros and flushed.
fn prepare(dir: &Path) -> Result<File, QueueError> {
    let path = dir.join(SPARE);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(QueueError::io("unlink", &path, e)),
    }
    let file = create(&path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < SEGMENT_SIZE {
        file.write_all_at(&zeros, off)
            .map_err(|e| QueueError::io("write", &path, e))?;
        off += zeros.len() as u64;
    }
    file.sync_data()
        .map_err(|e| QueueError::io("fdatasync", &path, e))?;
    Ok(file)
}

/// Creates a segment file that must not exist yet.
fn create(path: &Path) -> Result<File, QueueError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| QueueError::io("create", path, e))
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| QueueError::io("fsync directory", dir, e))
}

impl Segments {
    /// Opens the segments of a recovered spool: `live` messages per segment, `done_for` from
    /// the scan. Deletes those that hold nothing any more.
    pub(crate) fn open(
        dir: PathBuf,
        scan: &Scan,
        live: &HashMap<u64, usize>,
    ) -> Result<Segments, QueueError> {
        let mut segs = BTreeMap::new();
        for &no in &scan.segments {
            let path = dir.join(seg_name(no));
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(QueueError::io("open", &path, e)),
            };
            segs.insert(
                no,
                Seg {
                    file: Arc::new(file),
                    len: 0,
                    live: live.get(&no).copied().unwrap_or(0),
                    done_for: scan.done_for.get(&no).cloned().unwrap_or_default(),
                },
            );
        }
        let next_no = scan.segments.last().map_or(1, |n| n + 1);
        let mut s = Segments {
            dir,
            segs,
            current: None,
            next_no,
            spare: Spare::default(),
            preparing: None,
        };
        s.collect();
        // Ready for the first round, which usually comes well after the start.
        s.prepare_spare();
        Ok(s)
    }

    /// Segments on disk.
    pub(crate) fn count(&self) -> usize {
        self.segs.len()
    }

    /// The file of segment `no`, for reading.
    pub(crate) fn file(&self, no: u64) -> Option<Arc<File>> {
        self.segs.get(&no).map(|s| Arc::clone(&s.file))
    }

    /// Starts a new current segment: the spare if it is ready, else one made now (not zeroed:
    /// its rounds then cost a metadata commit each). Then starts preparing the next spare.
    fn roll(&mut self) -> Result<u64, QueueError> {
        let no = self.next_no;
        let path = self.dir.join(seg_name(no));
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        let file = match spare {
            Some(file) => {
                let from = self.dir.join(SPARE);
                fs::rename(&from, &path).map_err(|e| QueueError::io("rename", &from, e))?;
                file
            }
            // Not ready (or failed): a new segment now beats waiting for the spare, which
            // serves the next roll.
            None => create(&path)?,
        };
        sync_dir(&self.dir)?;
        self.next_no += 1;
        self.segs.insert(
            no,
            Seg {
                file: Arc::new(file),
                len: 0,
                live: 0,
                done_for: BTreeSet::new(),
            },
        );
        self.current = Some(no);
        self.collect();
        self.prepare_spare();
        Ok(no)
    }

    /// Prepares the next segment on a thread of its own, unless one is ready or under way.
    fn prepare_spare(&mut self) {
        if self.preparing.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if let Some(h) = self.preparing.take() {
            let _ = h.join();
        }
        if self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return;
        }
        let dir = self.dir.clone();
        let slot = Arc::clone(&self.spare);
        let spawned = std::thread::Builder::new()
            .name("queue-segment".into())
            .spawn(move || match prepare(&dir) {
                Ok(file) => *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(file),
                Err(e) => {
                    tracing::warn!("spool: cannot prepare the next segment: {e}");
                    let _ = fs::remove_file(dir.join(SPARE));
                }
            });
        match spawned {
            Ok(h) => self.preparing = Some(h),
            Err(e) => tracing::warn!("spool: cannot start the segment preparer: {e}"),
        }
    }

    /// Appends `bytes` (whole records) to the current segment, starting a new one first if
    /// there is none or it is full. Returns the segment and the offset of the first byte. On
    /// a failed write the segment is cut back, so a later append is not stranded behind a
    /// torn record. Not flushed.
    fn append(&mut self, bytes: &[u8]) -> Result<(u64, u64), QueueError> {
        let fits = |s: &Seg| s.len == 0 || s.len + bytes.len() as u64 <= SEGMENT_SIZE;
        let no = match self.current {
            Some(no) if self.segs.get(&no).is_some_and(fits) => no,
            _ => self.roll()?,
        };
        let seg = self.segs.get_mut(&no).expect("current segment is open");
        let off = seg.len;
        if let Err(e) = seg.file.write_all_at(bytes, off) {
            let path = self.dir.join(seg_name(no));
            if let Err(e2) = seg.file.set_len(off) {
                // The tail cannot be cut: nothing may follow it in this segment.
                tracing::error!(
                    "spool: cannot truncate {} after a failed write: {e2}",
                    path.display()
                );
                self.current = None;
            }
            return Err(QueueError::io("write", path, e));
        }
        seg.len += bytes.len() as u64;
        Ok((no, off))
    }

    /// Appends the message records of a round: `live` new messages. Returns the segment, the
    /// offset, and a file handle to flush with its path.
    pub(crate) fn append_round(
        &mut self,
        bytes: &[u8],
        live: usize,
    ) -> Result<(u64, u64, File, PathBuf), QueueError> {
        let (no, off) = self.append(bytes)?;
        let path = self.dir.join(seg_name(no));
        let seg = self.segs.get_mut(&no).expect("appended segment is open");
        seg.live += live;
        let file = seg
            .file
            .try_clone()
            .map_err(|e| QueueError::io("dup", &path, e))?;
        Ok((no, off, file, path))
    }

    /// Records that a message of segment `seg` is delivered, removed or moved: appends its
    /// done record (not flushed) and deletes the segments that hold nothing any more. A done
    /// record that cannot be written is logged: the message may then come back after a
    /// restart and be delivered twice (at least once, never lost).
    pub(crate) fn release(&mut self, seg: u64, id: &QueueId) {
        let mut rec = Vec::with_capacity(HEADER);
        push_done(&mut rec, id);
        match self.append(&rec) {
            Ok((at, _)) if at != seg => {
                if let Some(s) = self.segs.get_mut(&at) {
                    s.done_for.insert(seg);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("spool: {id}: cannot record its removal: {e}"),
        }
        if let Some(s) = self.segs.get_mut(&seg) {
            s.live = s.live.saturating_sub(1);
        }
        self.collect();
    }

    /// Deletes every segment, but the current one, that holds no message and whose done
    /// records refer to no older segment still present. Oldest first, so one pass frees a
    /// chain. A failed unlink leaves the segment for the next pass (its records stay valid).
    fn collect(&mut self) {
        let candidates: Vec<u64> = self.segs.keys().copied().collect();
        for no in candidates {
            let Some(s) = self.segs.get(&no) else {
                continue;
            };
            if Some(no) == self.current
                || s.live > 0
                || s.done_for.iter().any(|o| self.segs.contains_key(o))
            {
                continue;
            }
            let path = self.dir.join(seg_name(no));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("spool: cannot remove {}: {e}", path.display());
                    continue;
                }
            }
            self.segs.remove(&no);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &QueueId, data: &[u8], env: &[u8]) -> Vec<u8> {
        let mut rec = start_record(0);
        rec.extend_from_slice(data);
        assert_eq!(finish_message(&mut rec, id, env), data.len() as u32);
        rec
    }

    #[test]
    fn records_round_trip() {
        let id = QueueId::generate();
        let mut buf = message(&id, b"Subject: x\r\n\r\nhi\r\n", b"{\"v\":1}");
        let first = buf.len();
        push_done(&mut buf, &id);
        let (rec, len) = parse(&buf).unwrap().unwrap();
        assert_eq!(len, first);
        assert_eq!(
            rec,
            Record::Message {
                id: id.clone(),
                data: (HEADER, 18),
                env: (HEADER + 18, &b"{\"v\":1}"[..]),
            }
        );
        assert_eq!(&buf[HEADER..HEADER + 18], b"Subject: x\r\n\r\nhi\r\n");
        let (rec, len) = parse(&buf[first..]).unwrap().unwrap();
        assert_eq!((rec, len), (Record::Done { id }, HEADER));
        assert_eq!(parse(&buf[first + HEADER..]), Ok(None));
    }

    #[test]
    fn every_torn_or_damaged_record_is_refused() {
        let id = QueueId::generate();
        let rec = message(&id, b"content", b"{}");
        // Cut at every length: never a record, never a panic.
        for cut in 1..rec.len() {
            assert!(parse(&rec[..cut]).is_err(), "cut at {cut}");
        }
        // Flip every bit of every byte.
        for i in 0..rec.len() {
            for bit in 0..8 {
                let mut bad = rec.clone();
                bad[i] ^= 1 << bit;
                assert!(parse(&bad).is_err(), "byte {i} bit {bit}");
            }
        }
        // Lengths pointing past the end, zeros (a preallocated or torn tail), garbage.
        let mut huge = rec.clone();
        huge[5 + ID_LEN..9 + ID_LEN].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
        // Zeros are how a prepared segment ends; anything after them is not.
        assert_eq!(parse(&[0u8; 100]), Ok(None));
        let mut after = [0u8; 100];
        after[77] = 1;
        assert!(parse(&after).is_err());
        assert!(parse(b"RMq1\x01../../../../etc/passwd-xxxxxxxxxxxxxxxx").is_err());
    }

    #[test]
    fn segment_names() {
        assert_eq!(seg_name(26), "000000000000001a.seg");
        assert_eq!(seg_number("000000000000001a.seg"), Some(26));
        assert_eq!(seg_number("1a.seg"), None);
        assert_eq!(seg_number("000000000000001a.env"), None);
        assert_eq!(seg_number("00000000000000zz.seg"), None);
    }
}

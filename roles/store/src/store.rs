//! [`Store`] and [`UserStore`]: users, the mailbox list, delivery and quota.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::StoreError;
use crate::index::{self, FileLock, Record};
use crate::mailbox::Mailbox;
use crate::maildir::{self, Flag, VsizeCounter};
use crate::names::{MailboxName, SpecialUse, UserAddress};
use crate::shared::Indexes;
use crate::sync::{MboxDir, SyncMode};

const SUBSCRIPTIONS: &str = "subscriptions";
const UIDVALIDITY_FILE: &str = "ringmail-uidvalidity";
const USER_LOCK: &str = "ringmail-user.lock";

/// Options of a [`Store`].
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Per-user limit on the bytes of all messages in all mailboxes.
    pub quota_bytes: Option<u64>,
    /// Per-user limit on the number of messages in all mailboxes.
    pub quota_messages: Option<u64>,
    /// Host name written into new message file names (escaped as Dovecot does).
    pub hostname: String,
}

/// The root of all users' homes (`<root>/<domain>/<localpart>/Maildir`). Cheap to clone; share
/// one per process so that [`ChangeSignal`]s reach every session of the process.
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    options: StoreOptions,
    host: String,
    signals: Arc<Signals>,
    indexes: Arc<Indexes>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        fs::create_dir_all(root).map_err(|e| StoreError::io("create directory", root, e))?;
        let host = maildir::escape_host(&options.hostname);
        Ok(Store {
            root: root.to_owned(),
            options,
            host,
            signals: Arc::new(Signals::default()),
            indexes: Arc::new(Indexes::default()),
        })
    }

    /// The home directory of a user (`<root>/<domain>/<localpart>`).
    pub fn home(&self, user: &UserAddress) -> PathBuf {
        self.root.join(user.domain()).join(user.local())
    }

    /// A user's mail, creating the home and INBOX if needed.
    pub fn user(&self, address: &str) -> Result<UserStore, StoreError> {
        let user = UserAddress::parse(address)?;
        let home = self.home(&user);
        let maildir = home.join("Maildir");
        if !maildir.join("tmp").is_dir() {
            for p in [
                self.root.join(user.domain()),
                home,
                maildir.clone(),
                maildir.join("cur"),
                maildir.join("new"),
                maildir.join("tmp"),
            ] {
                index::ensure_dir(&p)?;
            }
        }
        Ok(UserStore {
            ctx: Arc::new(UserCtx {
                user,
                maildir,
                host: self.host.clone(),
                options: self.options.clone(),
                signals: self.signals.clone(),
                indexes: self.indexes.clone(),
            }),
        })
    }
}

pub(crate) struct UserCtx {
    pub user: UserAddress,
    pub maildir: PathBuf,
    pub host: String,
    pub options: StoreOptions,
    pub signals: Arc<Signals>,
    pub indexes: Arc<Indexes>,
}

impl UserCtx {
    /// A UIDVALIDITY never handed out before in this Maildir: `max(now, last + 1)`, recorded
    /// in `ringmail-uidvalidity` (Dovecot keeps `dovecot-uidvalidity` for the same purpose).
    pub fn next_uidvalidity(&self) -> Result<u32, StoreError> {
        let _lock = FileLock::acquire(&self.maildir.join(USER_LOCK))?;
        let path = self.maildir.join(UIDVALIDITY_FILE);
        let last: u32 = index::read_optional(&path)?
            .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
            .unwrap_or(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        let v = now.max(last.saturating_add(1)).max(1);
        index::replace_file(&self.maildir, UIDVALIDITY_FILE, format!("{v}\n").as_bytes())?;
        Ok(v)
    }

    pub fn mbox(self: &Arc<Self>, name: MailboxName) -> MboxDir {
        MboxDir::new(self.clone(), name)
    }
}

/// A mailbox as LIST shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxInfo {
    /// The IMAP name (`/` delimited).
    pub name: String,
    /// By conventional name (top level only).
    pub special_use: Option<SpecialUse>,
    /// In the `subscriptions` file.
    pub subscribed: bool,
    /// Some other mailbox is below this one.
    pub has_children: bool,
    /// False for a hierarchy level that has children but no directory of its own
    /// (`\NoSelect` / `\NonExistent`).
    pub selectable: bool,
}

/// What STATUS reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Number of messages.
    pub messages: u32,
    /// Messages no session has seen yet (`\Recent`).
    pub recent: u32,
    /// The next UID.
    pub uidnext: u32,
    /// The UIDVALIDITY.
    pub uidvalidity: u32,
    /// Messages without `\Seen`.
    pub unseen: u32,
    /// Messages with `\Deleted`.
    pub deleted: u32,
    /// The highest MODSEQ (CONDSTORE).
    pub highestmodseq: u64,
    /// Sum of the message sizes in bytes, as stored.
    pub size: u64,
    /// Sum of the messages' sizes with CRLF line ends (their RFC822.SIZE): what IMAP's
    /// STATUS SIZE reports.
    pub vsize: u64,
}

/// The result of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Where the message went (the folder asked for, or INBOX).
    pub mailbox: String,
    /// Its UID there.
    pub uid: u32,
    /// The UIDVALIDITY of that mailbox.
    pub uidvalidity: u32,
}

/// One user's mailboxes. Cheap to clone; all operations are synchronous and safe to run from
/// several threads and processes at once.
#[derive(Clone)]
pub struct UserStore {
    pub(crate) ctx: Arc<UserCtx>,
}

impl UserStore {
    /// The user's address.
    pub fn address(&self) -> &UserAddress {
        &self.ctx.user
    }

    /// The user's `Maildir` directory.
    pub fn maildir(&self) -> &Path {
        &self.ctx.maildir
    }

    fn existing(&self, name: &str) -> Result<MboxDir, StoreError> {
        let m = self.ctx.mbox(MailboxName::parse(name)?);
        if m.exists() {
            Ok(m)
        } else {
            Err(StoreError::NoSuchMailbox(m.name.to_string()))
        }
    }

    /// The mailbox a delivery to `folder` goes to. Mailbox names are case-sensitive (as in
    /// IMAP), so `folder` itself is taken when it exists; otherwise the one existing mailbox
    /// whose name equals it ignoring ASCII case (Dovecot's `lmtp_save_to_detail_mailbox` has
    /// no such fallback; it keeps `bob+lists@` reaching `Lists` when a relay lowercased the
    /// address); otherwise (none, several, or an invalid name) INBOX, as Dovecot does with
    /// `lda_mailbox_autocreate = no`.
    pub fn delivery_mailbox(&self, folder: Option<&str>) -> Result<MailboxName, StoreError> {
        Ok(self.delivery_target(folder)?.name.clone())
    }

    fn delivery_target(&self, folder: Option<&str>) -> Result<MboxDir, StoreError> {
        let Some(folder) = folder else {
            return Ok(self.ctx.mbox(MailboxName::inbox()));
        };
        let name = match MailboxName::parse(folder) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(user = %self.ctx.user, error = %e, "delivering to INBOX");
                return Ok(self.ctx.mbox(MailboxName::inbox()));
            }
        };
        let exact = self.ctx.mbox(name.clone());
        if exact.exists() {
            return Ok(exact);
        }
        let mut folded = self
            .mailbox_names()?
            .into_iter()
            .filter(|n| n.as_str().eq_ignore_ascii_case(name.as_str()));
        match (folded.next(), folded.next()) {
            (Some(n), None) => Ok(self.ctx.mbox(n)),
            _ => Ok(self.ctx.mbox(MailboxName::inbox())),
        }
    }

    /// Delivers a message (LMTP) to [`UserStore::delivery_mailbox`] of `folder`. Durable
    /// before `Ok`: the file is fsynced in `tmp/`, renamed into `cur/`, `cur/` is fsynced,
    /// and the index naming its UID is written atomically. `size_hint` lets an over-quota
    /// message be refused before it is read.
    pub fn deliver(
        &self,
        folder: Option<&str>,
        message: &mut dyn Read,
        size_hint: Option<u64>,
    ) -> Result<Delivered, StoreError> {
        let target = self.delivery_target(folder)?;
        if let Some(size) = size_hint {
            self.check_quota(size, 1)?;
        }
        let (uidvalidity, uid) = add_message(&target, message, &[], None, Some(self))?;
        tracing::debug!(user = %self.ctx.user, mailbox = %target.name, uid, "delivered");
        Ok(Delivered {
            mailbox: target.name.to_string(),
            uid,
            uidvalidity,
        })
    }

    /// Refuses adding `bytes` in `messages` messages if that would exceed the quota.
    pub(crate) fn check_quota(&self, bytes: u64, messages: u64) -> Result<(), StoreError> {
        let opts = &self.ctx.options;
        if opts.quota_bytes.is_none() && opts.quota_messages.is_none() {
            return Ok(());
        }
        let (used, count) = self.quota()?;
        let over_bytes = opts
            .quota_bytes
            .is_some_and(|q| used.saturating_add(bytes) > q);
        let over_count = opts
            .quota_messages
            .is_some_and(|q| count.saturating_add(messages) > q);
        if over_bytes || over_count {
            return Err(StoreError::QuotaExceeded {
                used,
                adding: bytes,
                messages: count,
                adding_messages: messages,
            });
        }
        Ok(())
    }

    /// Bytes and messages in all mailboxes.
    pub fn quota(&self) -> Result<(u64, u64), StoreError> {
        let mut bytes = 0;
        let mut count = 0;
        for name in self.mailbox_names()? {
            let st = self.ctx.mbox(name).snapshot(false)?;
            bytes += st.records.iter().map(|r| r.size).sum::<u64>();
            count += st.records.len() as u64;
        }
        Ok((bytes, count))
    }

    /// INBOX and every folder directory, sorted.
    fn mailbox_names(&self) -> Result<Vec<MailboxName>, StoreError> {
        let md = &self.ctx.maildir;
        let mut out = vec![MailboxName::inbox()];
        let rd = fs::read_dir(md).map_err(|e| StoreError::io("read directory", md, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| StoreError::io("read directory", md, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if let Some(n) = MailboxName::from_dir_name(&name)
                && entry.path().join("cur").is_dir()
            {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    }

    /// All mailboxes with their LIST attributes. Parents that only exist as a hierarchy level
    /// are listed as not selectable.
    pub fn list(&self) -> Result<Vec<MailboxInfo>, StoreError> {
        let subs = self.subscriptions()?;
        let mut all: BTreeMap<String, bool> = BTreeMap::new();
        for n in self.mailbox_names()? {
            let mut p = n.parent();
            while let Some(parent) = p {
                all.entry(parent.to_string()).or_insert(false);
                p = parent.parent();
            }
            all.insert(n.to_string(), true);
        }
        let names: Vec<String> = all.keys().cloned().collect();
        Ok(all
            .into_iter()
            .map(|(name, selectable)| {
                let prefix = format!("{name}/");
                MailboxInfo {
                    special_use: MailboxName::parse(&name)
                        .ok()
                        .and_then(|n| SpecialUse::by_name(&n)),
                    subscribed: subs.contains(&name),
                    has_children: names.iter().any(|o| o.starts_with(&prefix)),
                    selectable,
                    name,
                }
            })
            .collect())
    }

    /// Creates a mailbox (and missing parents), Dovecot style: `.A.B/{cur,new,tmp}` and an
    /// empty `maildirfolder` file.
    pub fn create(&self, name: &str) -> Result<(), StoreError> {
        let name = MailboxName::parse(name)?;
        if name.is_inbox() {
            return Err(StoreError::MailboxExists(name.to_string()));
        }
        let mut chain = vec![name.clone()];
        let mut p = name.parent();
        while let Some(parent) = p {
            p = parent.parent();
            if !parent.is_inbox() {
                chain.push(parent);
            }
        }
        for (i, n) in chain.iter().rev().enumerate() {
            let last = i == chain.len() - 1;
            let dir = self.ctx.maildir.join(n.dir_name());
            if !index::ensure_dir(&dir)? && last && dir.join("cur").is_dir() {
                return Err(StoreError::MailboxExists(n.to_string()));
            }
            // cur/ last: a mailbox exists once its cur/ does.
            for sub in ["tmp", "new", "cur"] {
                index::ensure_dir(&dir.join(sub))?;
            }
            let mf = dir.join("maildirfolder");
            File::create(&mf).map_err(|e| StoreError::io("create", mf, e))?;
            index::fsync_dir(&dir)?;
        }
        index::fsync_dir(&self.ctx.maildir)?;
        tracing::info!(user = %self.ctx.user, mailbox = %name, "mailbox created");
        Ok(())
    }

    /// Deletes a mailbox and its messages (children stay). The directory is first renamed to
    /// `..ringmail-deleted-*` (never a valid mailbox), so the name disappears atomically.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let name = MailboxName::parse(name)?;
        if name.is_inbox() {
            return Err(StoreError::InboxProtected);
        }
        let m = self.existing(name.as_str())?;
        let trash = self
            .ctx
            .maildir
            .join(format!("..ringmail-deleted-{}", crate::sync::random_guid()));
        index::rename(&m.dir, &trash)?;
        index::fsync_dir(&self.ctx.maildir)?;
        fs::remove_dir_all(&trash).map_err(|e| StoreError::io("remove", &trash, e))?;
        self.ctx.signals.get(&m.dir).bump();
        tracing::info!(user = %self.ctx.user, mailbox = %name, "mailbox deleted");
        Ok(())
    }

    /// Renames a mailbox and its children; UIDVALIDITY and UIDs are kept. Renaming INBOX
    /// moves its messages into a new mailbox (see [`UserStore::rename_inbox`]); INBOX itself
    /// always exists, so nothing can be renamed to it ([`StoreError::MailboxExists`]).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let from = MailboxName::parse(from)?;
        let to = MailboxName::parse(to)?;
        if to.is_inbox() {
            return Err(StoreError::MailboxExists(to.to_string()));
        }
        if from.is_inbox() {
            return self.rename_inbox(&to);
        }
        self.existing(from.as_str())?;
        if self.ctx.mbox(to.clone()).exists() {
            return Err(StoreError::MailboxExists(to.to_string()));
        }
        if to.as_str().starts_with(&format!("{}/", from.as_str())) {
            return Err(StoreError::InvalidName(
                to.to_string(),
                "cannot move a mailbox below itself",
            ));
        }
        let _lock = FileLock::acquire(&self.ctx.maildir.join(USER_LOCK))?;
        if let Some(parent) = to.parent()
            && !parent.is_inbox()
            && !self.ctx.mbox(parent.clone()).exists()
        {
            self.create(parent.as_str())?;
        }
        let from_dir = from.dir_name();
        let to_dir = to.dir_name();
        let children: Vec<String> = self
            .mailbox_names()?
            .into_iter()
            .map(|n| n.dir_name())
            .filter(|d| d.starts_with(&format!("{from_dir}.")))
            .collect();
        let md = &self.ctx.maildir;
        index::rename(&md.join(&from_dir), &md.join(&to_dir))?;
        for child in children {
            let new = format!("{to_dir}{}", &child[from_dir.len()..]);
            index::rename(&md.join(&child), &md.join(new))?;
        }
        index::fsync_dir(md)?;
        tracing::info!(user = %self.ctx.user, %from, %to, "mailbox renamed");
        Ok(())
    }

    /// RENAME INBOX (RFC 3501 6.3.5, RFC 9051 6.3.6): creates `to` (with its parents; it
    /// must not exist) and moves every message of INBOX into it, flags, sizes and internal
    /// dates kept, UIDs given in the same order under the new mailbox's UIDVALIDITY. INBOX
    /// stays, empty, with its UIDVALIDITY and UIDNEXT (no UID is used twice); its folders
    /// (`INBOX/...`) stay where they are.
    ///
    /// Both mailboxes are locked (INBOX first; nothing else holds two mailbox locks). The
    /// keywords are entered in `to`'s `dovecot-keywords` first, then the files are renamed
    /// into `to`'s `cur/`, then both indexes are committed: a crash in between leaves every
    /// message in exactly one of the two directories, found by the next scan.
    pub fn rename_inbox(&self, to: &MailboxName) -> Result<(), StoreError> {
        if to.is_inbox() {
            return Err(StoreError::MailboxExists(to.to_string()));
        }
        let dest = self.ctx.mbox(to.clone());
        {
            let _lock = FileLock::acquire(&self.ctx.maildir.join(USER_LOCK))?;
            if dest.exists() {
                return Err(StoreError::MailboxExists(to.to_string()));
            }
            self.create(to.as_str())?;
        }
        let inbox = self.ctx.mbox(MailboxName::inbox());
        let _inbox_lock = inbox.lock()?;
        let mut ist = inbox.locked_state(SyncMode::Scan)?;
        // (A new index takes the user lock for its UIDVALIDITY: not held here.)
        let _dest_lock = dest.lock()?;
        let mut dst = dest.locked_state(SyncMode::LoadOnly)?;
        let flags: Vec<Vec<Flag>> = ist
            .records
            .iter()
            .map(|r| r.name().flags(&ist.keywords))
            .collect();
        let mut keywords: Vec<Flag> = Vec::new();
        for f in flags.iter().flatten() {
            if matches!(f, Flag::Keyword(_)) && !keywords.contains(f) {
                keywords.push(f.clone());
            }
        }
        if assign_keywords(&mut dst.keywords, &keywords)? {
            dest.commit(&dst, true)?;
        }
        let _writing = (inbox.begin_write(), dest.begin_write());
        let (inbox_before, dest_before) = (inbox.dir_mtimes()?, dest.dir_mtimes()?);
        let mut moved: HashSet<u32> = HashSet::new();
        let mut first_recent = None;
        let mut result = Ok(());
        for (r, f) in ist.records.iter().zip(&flags) {
            let uid = dst.uidnext;
            if uid == u32::MAX {
                result = Err(StoreError::UidsExhausted);
                break;
            }
            let name = r.name();
            let foreign = maildir::foreign_letters(name.info.as_deref().unwrap_or(""));
            let file = maildir::FileName {
                base: name.base.clone(),
                info: Some(info_for(f, &dst.keywords, &foreign)),
            }
            .to_name();
            let src = inbox.sub(r.subdir()).join(&*r.file);
            match fs::rename(&src, dest.sub("cur").join(&file)) {
                Ok(()) => {}
                // Expunged meanwhile (the next scan of INBOX drops it).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    result = Err(StoreError::io("rename", src, e));
                    break;
                }
            }
            dst.uidnext += 1;
            if r.uid >= ist.first_recent && first_recent.is_none() {
                first_recent = Some(uid);
            }
            dst.push_copy(uid, r, file);
            moved.insert(r.uid);
        }
        if !moved.is_empty() {
            // Messages no session had seen stay \Recent in their new mailbox.
            dst.first_recent = dst.first_recent.max(first_recent.unwrap_or(dst.uidnext));
            index::fsync_dir(&dest.sub("cur"))?;
            index::fsync_dir(&inbox.sub("cur"))?;
            index::fsync_dir(&inbox.sub("new"))?;
            dest.note_own_change(&mut dst, dest_before)?;
            dest.commit(&dst, false)?;
            ist.records.retain(|r| !moved.contains(&r.uid));
            ist.next_modseq();
            inbox.note_own_change(&mut ist, inbox_before)?;
            inbox.commit(&ist, false)?;
        }
        tracing::info!(user = %self.ctx.user, %to, messages = moved.len(), "INBOX renamed");
        result
    }

    /// Names in the `subscriptions` file (Dovecot version 2 format, version 1 read too).
    pub fn subscriptions(&self) -> Result<Vec<String>, StoreError> {
        let Some(bytes) = index::read_optional(&self.ctx.maildir.join(SUBSCRIPTIONS))? else {
            return Ok(Vec::new());
        };
        let text = String::from_utf8_lossy(&bytes);
        let (v2, body) = match text.strip_prefix("V\t2\n\n") {
            Some(rest) => (true, rest),
            None => (false, &*text),
        };
        Ok(body
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                if v2 {
                    l.replace('\t', "/")
                } else {
                    l.replace('.', "/")
                }
            })
            .filter_map(|n| MailboxName::parse(&n).ok().map(|n| n.to_string()))
            .collect())
    }

    /// Adds (`on`) or removes a subscription. The mailbox need not exist (RFC 3501).
    pub fn subscribe(&self, name: &str, on: bool) -> Result<(), StoreError> {
        let name = MailboxName::parse(name)?.to_string();
        let _lock = FileLock::acquire(&self.ctx.maildir.join(USER_LOCK))?;
        let mut subs = self.subscriptions()?;
        let had = subs.contains(&name);
        if had == on {
            return Ok(());
        }
        if on {
            subs.push(name);
        } else {
            subs.retain(|s| *s != name);
        }
        let mut out = String::from("V\t2\n\n");
        for s in subs {
            out.push_str(&s.replace('/', "\t"));
            out.push('\n');
        }
        index::replace_file(&self.ctx.maildir, SUBSCRIPTIONS, out.as_bytes())
    }

    /// STATUS of a mailbox (does not claim `\Recent`).
    pub fn status(&self, name: &str) -> Result<Status, StoreError> {
        let m = self.existing(name)?;
        let st = m.snapshot(false)?;
        Ok(Status {
            messages: st.records.len() as u32,
            recent: st
                .records
                .iter()
                .filter(|r| r.uid >= st.first_recent)
                .count() as u32,
            uidnext: st.uidnext,
            uidvalidity: st.uidvalidity,
            unseen: st
                .records
                .iter()
                .filter(|r| !r.name().info.unwrap_or_default().contains('S'))
                .count() as u32,
            deleted: st
                .records
                .iter()
                .filter(|r| r.name().info.unwrap_or_default().contains('T'))
                .count() as u32,
            highestmodseq: st.highestmodseq,
            size: st.records.iter().map(|r| r.size).sum(),
            vsize: st.records.iter().map(|r| r.vsize).sum(),
        })
    }

    /// Opens a session view of a mailbox (SELECT): rescans the directory (unless a session of
    /// this process did within the last second) and claims the messages no session has seen
    /// as `\Recent` for this view.
    pub fn open(&self, name: &str) -> Result<Mailbox, StoreError> {
        let m = self.existing(name)?;
        Mailbox::open(self.clone(), m)
    }

    /// The change signal of a mailbox in this process.
    pub fn signal(&self, name: &str) -> Result<ChangeSignal, StoreError> {
        let m = self.ctx.mbox(MailboxName::parse(name)?);
        Ok(self.ctx.signals.get(&m.dir))
    }
}

/// Writes a message into `target`: tmp file, fsync, quota check on the real size, then under
/// the mailbox lock a rename into `cur/`, fsync of `cur/`, and the index commit.
/// Turns bare LF line ends into CRLF, across chunk boundaries. Messages are stored with
/// CRLF lines (as Dovecot does with `mail_save_crlf = yes`), so a message's stored size,
/// its RFC822.SIZE (the CRLF size) and the bytes FETCH BODY[] returns all agree, however the
/// client (APPEND) or the LMTP client ended its lines. A lone CR is kept as it is.
#[derive(Debug, Default)]
pub(crate) struct CrlfWriter {
    last_cr: bool,
}

impl CrlfWriter {
    pub(crate) fn convert(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut start = 0;
        for (i, &b) in chunk.iter().enumerate() {
            if b == b'\n' {
                let prev_cr = if i == 0 {
                    self.last_cr
                } else {
                    chunk[i - 1] == b'\r'
                };
                if !prev_cr {
                    out.extend_from_slice(&chunk[start..i]);
                    out.push(b'\r');
                    start = i;
                }
            }
        }
        out.extend_from_slice(&chunk[start..]);
        if let Some(&b) = chunk.last() {
            self.last_cr = b == b'\r';
        }
    }
}

pub(crate) fn add_message(
    target: &MboxDir,
    message: &mut dyn Read,
    flags: &[Flag],
    date: Option<SystemTime>,
    quota: Option<&UserStore>,
) -> Result<(u32, u32), StoreError> {
    let host = &target.user.host;
    let unique = maildir::new_base(host, 0, 0);
    let unique = unique.split(',').next().unwrap_or(&unique).to_owned();
    let tmp = target.sub("tmp").join(&unique);
    let result = (|| {
        let file = OpenOptions::new()
            .mode(0o600)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| StoreError::io("create", &tmp, e))?;
        let mut w = BufWriter::with_capacity(64 * 1024, file);
        let mut counter = VsizeCounter::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut crlf = CrlfWriter::default();
        let mut out = Vec::with_capacity(2 * buf.len());
        loop {
            let n = match message.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StoreError::io("read message for", &tmp, e)),
            };
            out.clear();
            crlf.convert(&buf[..n], &mut out);
            counter.update(&out);
            w.write_all(&out)
                .map_err(|e| StoreError::io("write", &tmp, e))?;
        }
        let file = w
            .into_inner()
            .map_err(|e| StoreError::io("write", &tmp, e.into_error()))?;
        if let Some(d) = date {
            file.set_modified(d)
                .map_err(|e| StoreError::io("set mtime", &tmp, e))?;
        }
        file.sync_all()
            .map_err(|e| StoreError::io("fsync", &tmp, e))?;
        if let Some(user) = quota {
            user.check_quota(counter.size, 1)?;
        }
        let _lock = target.lock()?;
        let mut st = target.locked_state(SyncMode::LoadOnly)?;
        let kw_changed = assign_keywords(&mut st.keywords, flags)?;
        let info = info_for(flags, &st.keywords, "");
        let base = format!("{unique},S={},W={}", counter.size, counter.vsize);
        let file_name = format!("{base}:2,{info}");
        let dest = target.sub("cur").join(&file_name);
        let _writing = target.begin_write();
        let before = target.dir_mtimes()?;
        index::rename(&tmp, &dest)?;
        index::fsync_dir(&target.sub("cur"))?;
        target.note_own_change(&mut st, before)?;
        let uid = st.take_uid()?;
        let modseq = st.next_modseq();
        let mtime = fs::metadata(&dest)
            .map(|m| std::os::unix::fs::MetadataExt::mtime(&m))
            .map_err(|e| StoreError::io("stat", &dest, e))?;
        st.records.push(Record {
            uid,
            modseq,
            size: counter.size,
            vsize: counter.vsize,
            date: mtime,
            in_new: false,
            file: file_name.into(),
        });
        target.commit(&st, kw_changed)?;
        Ok((st.uidvalidity, uid))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Gives every keyword of `flags` a letter; true if the table changed.
pub(crate) fn assign_keywords(table: &mut Vec<String>, flags: &[Flag]) -> Result<bool, StoreError> {
    let mut changed = false;
    for f in flags {
        let Flag::Keyword(k) = f else { continue };
        if !maildir::valid_keyword(k) {
            return Err(StoreError::InvalidKeyword(k.clone(), "not an IMAP atom"));
        }
        if table.iter().any(|t| t == k) {
            continue;
        }
        if let Some(slot) = table.iter_mut().find(|t| t.is_empty()) {
            *slot = k.clone();
        } else if table.len() < 26 {
            table.push(k.clone());
        } else {
            return Err(StoreError::InvalidKeyword(
                k.clone(),
                "all 26 Maildir keyword letters are in use",
            ));
        }
        changed = true;
    }
    Ok(changed)
}

/// The info letters for `flags` (keywords must be in `table`), plus `foreign` letters kept
/// from the old name, sorted.
pub(crate) fn info_for(flags: &[Flag], table: &[String], foreign: &str) -> String {
    let mut s = String::from(foreign);
    for f in flags {
        match f.letter() {
            Some(c) => s.push(c),
            None => {
                if let Flag::Keyword(k) = f
                    && let Some(i) = table.iter().position(|t| t == k)
                {
                    s.push((b'a' + i as u8) as char);
                }
            }
        }
    }
    maildir::sort_letters(&s)
}

/// Per-mailbox change counters of this process, for IDLE.
#[derive(Default)]
pub(crate) struct Signals {
    map: Mutex<HashMap<PathBuf, ChangeSignal>>,
}

impl Signals {
    pub fn get(&self, dir: &Path) -> ChangeSignal {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(dir.to_owned()).or_default().clone()
    }
}

/// A per-mailbox generation counter, bumped by every change made through any [`Store`] clone
/// of this process. An IMAP session in IDLE waits on it, then calls
/// [`Mailbox::refresh`]. Changes by other processes are not signalled: poll `refresh` (it is
/// cheap when nothing changed: three stats) every few hundred milliseconds as well.
#[derive(Clone, Default)]
pub struct ChangeSignal(Arc<(Mutex<u64>, Condvar)>);

impl std::fmt::Debug for ChangeSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChangeSignal({})", self.generation())
    }
}

impl ChangeSignal {
    /// The current generation.
    pub fn generation(&self) -> u64 {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the generation differs from `seen` or `timeout` passes; returns the
    /// generation then.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .0
            .1
            .wait_timeout_while(guard, timeout, |g| *g == seen)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    pub(crate) fn bump(&self) {
        let mut g = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
        self.0.1.notify_all();
    }
}

//! [`MemoryStore`]: an in-memory [`MailStore`] for tests, fuzzing and examples.
//!
//! One [`MemoryStore`] holds one user's mailboxes behind a mutex; [`MemoryStore::session`]
//! gives each IMAP session its own handle with its own snapshot of the selected mailbox, so
//! two sessions see each other's changes through `refresh` like on a real store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::store::{
    Changes, Flag, FlagOp, MailStore, MailboxInfo, MessageMeta, Selected, SpecialUse, Status,
    StoreError,
};

#[derive(Clone, Debug)]
struct Msg {
    data: Arc<Vec<u8>>,
    flags: Vec<Flag>,
    modseq: u64,
    internal_date: SystemTime,
}

#[derive(Debug)]
struct Mailbox {
    uidvalidity: u32,
    uidnext: u32,
    highestmodseq: u64,
    special_use: Option<SpecialUse>,
    messages: BTreeMap<u32, Msg>,
}

#[derive(Debug, Default)]
struct Account {
    mailboxes: BTreeMap<String, Mailbox>,
    subscribed: BTreeSet<String>,
    next_uidvalidity: u32,
}

impl Account {
    fn new_mailbox(&mut self, special_use: Option<SpecialUse>) -> Mailbox {
        self.next_uidvalidity += 1;
        Mailbox {
            uidvalidity: self.next_uidvalidity,
            uidnext: 1,
            highestmodseq: 1,
            special_use,
            messages: BTreeMap::new(),
        }
    }

    fn get(&mut self, name: &str) -> Result<&mut Mailbox, StoreError> {
        self.mailboxes.get_mut(name).ok_or(StoreError::NotFound)
    }
}

/// One user's mailboxes in memory, shared by any number of sessions.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    account: Arc<Mutex<Account>>,
}

/// Longest mailbox name the in-memory store accepts, in bytes.
pub const MAX_NAME: usize = 512;

fn check_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name.starts_with('/')
        || name.ends_with('/')
        || name
            .split('/')
            .any(|level| level.is_empty() || level == "." || level == "..")
        || name.chars().any(|c| c.is_control())
    {
        return Err(StoreError::InvalidName);
    }
    Ok(())
}

impl MemoryStore {
    /// A store with `INBOX` and the usual special-use mailboxes (Drafts, Sent, Trash, Junk).
    pub fn new() -> MemoryStore {
        let store = MemoryStore::default();
        {
            let mut a = store.lock();
            for (name, su) in [
                ("INBOX", None),
                ("Drafts", Some(SpecialUse::Drafts)),
                ("Sent", Some(SpecialUse::Sent)),
                ("Trash", Some(SpecialUse::Trash)),
                ("Junk", Some(SpecialUse::Junk)),
            ] {
                let mb = a.new_mailbox(su);
                a.mailboxes.insert(name.to_owned(), mb);
                a.subscribed.insert(name.to_owned());
            }
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Account> {
        // A panic while holding the lock leaves consistent data (every change is a single
        // map operation), so a poisoned lock is still usable.
        self.account.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle for one session.
    pub fn session(&self) -> MemorySession {
        MemorySession {
            store: self.clone(),
            selected: None,
        }
    }

    /// Delivers a message to a mailbox (as an MDA would); returns its UID.
    pub fn deliver(&self, mailbox: &str, message: &[u8]) -> Result<u32, StoreError> {
        self.session()
            .append(mailbox, message, &[], None)
            .map(|(_, uid)| uid)
    }
}

#[derive(Debug)]
struct Snapshot {
    name: String,
    uidvalidity: u32,
    /// What the session last saw of each message (metadata of expunged messages is
    /// reported with the expunge).
    known: BTreeMap<u32, MessageMeta>,
}

/// A [`MemoryStore`] handle owned by one session.
#[derive(Debug)]
pub struct MemorySession {
    store: MemoryStore,
    selected: Option<Snapshot>,
}

fn meta(uid: u32, m: &Msg) -> MessageMeta {
    MessageMeta {
        uid,
        flags: m.flags.clone(),
        modseq: m.modseq,
        size: u32::try_from(m.data.len()).unwrap_or(u32::MAX),
        internal_date: m.internal_date,
    }
}

impl MemorySession {
    fn selected_name(&self) -> Result<String, StoreError> {
        self.selected
            .as_ref()
            .map(|s| s.name.clone())
            .ok_or(StoreError::NotSelected)
    }

    fn copy_inner(
        &mut self,
        uids: &[u32],
        dest: &str,
        remove: bool,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        let src = self.selected_name()?;
        let mut a = self.store.lock();
        if !a.mailboxes.contains_key(dest) {
            return Err(StoreError::NotFound);
        }
        let msgs: Vec<(u32, Msg)> = {
            let s = a.get(&src)?;
            uids.iter()
                .filter_map(|u| s.messages.get(u).map(|m| (*u, m.clone())))
                .collect()
        };
        let d = a.get(dest)?;
        let mut map = Vec::new();
        for (uid, mut m) in msgs.iter().cloned() {
            d.highestmodseq += 1;
            m.modseq = d.highestmodseq;
            let new = d.uidnext;
            d.uidnext += 1;
            d.messages.insert(new, m);
            map.push((uid, new));
        }
        let validity = d.uidvalidity;
        if remove {
            let s = a.get(&src)?;
            for (uid, _) in &msgs {
                s.messages.remove(uid);
            }
            s.highestmodseq += 1;
        }
        Ok((validity, map))
    }
}

fn apply(flags: &mut Vec<Flag>, op: FlagOp, given: &[Flag]) {
    match op {
        FlagOp::Replace => {
            flags.clear();
            for f in given {
                if !flags.contains(f) {
                    flags.push(f.clone());
                }
            }
        }
        FlagOp::Add => {
            for f in given {
                if !flags.contains(f) {
                    flags.push(f.clone());
                }
            }
        }
        FlagOp::Remove => flags.retain(|f| !given.contains(f)),
    }
    flags.sort();
}

impl MailStore for MemorySession {
    fn list(&self) -> Result<Vec<MailboxInfo>, StoreError> {
        let a = self.store.lock();
        Ok(a.mailboxes
            .iter()
            .map(|(name, mb)| MailboxInfo {
                name: name.clone(),
                delimiter: Some('/'),
                special_use: mb.special_use,
                subscribed: a.subscribed.contains(name),
                noselect: false,
            })
            .collect())
    }

    fn create(&mut self, name: &str) -> Result<(), StoreError> {
        check_name(name)?;
        let mut a = self.store.lock();
        if a.mailboxes.contains_key(name) {
            return Err(StoreError::AlreadyExists);
        }
        let mut prefix = String::new();
        for level in name.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(level);
            if !a.mailboxes.contains_key(&prefix) {
                let mb = a.new_mailbox(None);
                a.mailboxes.insert(prefix.clone(), mb);
            }
        }
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<(), StoreError> {
        if name == "INBOX" {
            return Err(StoreError::NotAllowed("INBOX cannot be deleted"));
        }
        let mut a = self.store.lock();
        a.mailboxes.remove(name).ok_or(StoreError::NotFound)?;
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), StoreError> {
        check_name(to)?;
        let mut a = self.store.lock();
        if !a.mailboxes.contains_key(from) {
            return Err(StoreError::NotFound);
        }
        if a.mailboxes.contains_key(to) {
            return Err(StoreError::AlreadyExists);
        }
        if from == "INBOX" {
            let mut mb = a.new_mailbox(None);
            let inbox = a.get("INBOX")?;
            mb.messages = std::mem::take(&mut inbox.messages);
            mb.uidnext = inbox.uidnext;
            mb.highestmodseq = inbox.highestmodseq;
            inbox.highestmodseq += 1;
            a.mailboxes.insert(to.to_owned(), mb);
            return Ok(());
        }
        let child_prefix = format!("{from}/");
        let names: Vec<String> = a
            .mailboxes
            .keys()
            .filter(|n| *n == from || n.starts_with(&child_prefix))
            .cloned()
            .collect();
        for old in names {
            let new = format!("{to}{}", &old[from.len()..]);
            if let Some(mb) = a.mailboxes.remove(&old) {
                a.mailboxes.insert(new, mb);
            }
        }
        Ok(())
    }

    fn subscribe(&mut self, name: &str, on: bool) -> Result<(), StoreError> {
        check_name(name)?;
        let mut a = self.store.lock();
        if on {
            a.subscribed.insert(name.to_owned());
        } else {
            a.subscribed.remove(name);
        }
        Ok(())
    }

    fn subscriptions(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.store.lock().subscribed.iter().cloned().collect())
    }

    fn status(&self, name: &str) -> Result<Status, StoreError> {
        let a = self.store.lock();
        let mb = a.mailboxes.get(name).ok_or(StoreError::NotFound)?;
        let count = |f: &Flag| {
            u32::try_from(mb.messages.values().filter(|m| m.flags.contains(f)).count())
                .unwrap_or(u32::MAX)
        };
        let messages = u32::try_from(mb.messages.len()).unwrap_or(u32::MAX);
        Ok(Status {
            messages,
            recent: 0,
            uidnext: mb.uidnext,
            uidvalidity: mb.uidvalidity,
            unseen: messages - count(&Flag::Seen),
            deleted: count(&Flag::Deleted),
            highestmodseq: mb.highestmodseq,
            size: mb.messages.values().map(|m| m.data.len() as u64).sum(),
        })
    }

    fn select(&mut self, name: &str) -> Result<Selected, StoreError> {
        self.selected = None;
        let a = self.store.lock();
        let mb = a.mailboxes.get(name).ok_or(StoreError::NotFound)?;
        self.selected = Some(Snapshot {
            name: name.to_owned(),
            uidvalidity: mb.uidvalidity,
            known: mb.messages.iter().map(|(u, m)| (*u, meta(*u, m))).collect(),
        });
        let mut keywords: Vec<String> = Vec::new();
        for m in mb.messages.values() {
            for f in &m.flags {
                if let Flag::Keyword(k) = f
                    && !keywords.iter().any(|x| x.eq_ignore_ascii_case(k))
                {
                    keywords.push(k.clone());
                }
            }
        }
        Ok(Selected {
            uidvalidity: mb.uidvalidity,
            uidnext: mb.uidnext,
            highestmodseq: mb.highestmodseq,
            uids: mb.messages.keys().copied().collect(),
            writable: true,
            keywords,
        })
    }

    fn unselect(&mut self) {
        self.selected = None;
    }

    fn refresh(&mut self) -> Result<Changes, StoreError> {
        let snap = self.selected.as_mut().ok_or(StoreError::NotSelected)?;
        let a = self.store.lock();
        let Some(mb) = a
            .mailboxes
            .get(&snap.name)
            .filter(|mb| mb.uidvalidity == snap.uidvalidity)
        else {
            // Deleted (or deleted and recreated): everything we knew is gone.
            let expunged = snap.known.keys().copied().collect();
            let gone = std::mem::take(&mut snap.known).into_values().collect();
            return Ok(Changes {
                expunged,
                gone,
                ..Changes::default()
            });
        };
        let mut ch = Changes {
            highestmodseq: mb.highestmodseq,
            uidnext: mb.uidnext,
            ..Changes::default()
        };
        for (uid, known) in &snap.known {
            match mb.messages.get(uid) {
                None => {
                    ch.expunged.push(*uid);
                    ch.gone.push(known.clone());
                }
                Some(m) if m.modseq != known.modseq => {
                    ch.flags.push((*uid, m.flags.clone(), m.modseq))
                }
                Some(_) => {}
            }
        }
        for uid in mb.messages.keys() {
            if !snap.known.contains_key(uid) {
                ch.new.push(*uid);
            }
        }
        snap.known = mb.messages.iter().map(|(u, m)| (*u, meta(*u, m))).collect();
        Ok(ch)
    }

    fn meta(&self, uid: u32) -> Option<MessageMeta> {
        let snap = self.selected.as_ref()?;
        let a = self.store.lock();
        // Live where the message still exists, else as this session last saw it.
        a.mailboxes
            .get(&snap.name)
            .filter(|mb| mb.uidvalidity == snap.uidvalidity)
            .and_then(|mb| mb.messages.get(&uid))
            .map(|m| meta(uid, m))
            .or_else(|| snap.known.get(&uid).cloned())
    }

    fn read(&mut self, uid: u32) -> Result<Vec<u8>, StoreError> {
        let name = self.selected_name()?;
        let mut a = self.store.lock();
        let mb = a.get(&name)?;
        mb.messages
            .get(&uid)
            .map(|m| m.data.as_ref().clone())
            .ok_or(StoreError::NotFound)
    }

    fn store_flags(
        &mut self,
        uids: &[u32],
        op: FlagOp,
        flags: &[Flag],
        unchanged_since: Option<u64>,
    ) -> Result<Vec<(u32, Vec<Flag>, u64)>, StoreError> {
        let name = self.selected_name()?;
        let mut a = self.store.lock();
        let mb = a.get(&name)?;
        let mut out = Vec::new();
        for uid in uids {
            let next = mb.highestmodseq + 1;
            let Some(m) = mb.messages.get_mut(uid) else {
                continue;
            };
            if unchanged_since.is_some_and(|u| m.modseq > u) {
                continue;
            }
            let before = m.flags.clone();
            apply(&mut m.flags, op, flags);
            if m.flags != before {
                m.modseq = next;
                mb.highestmodseq = next;
            }
            out.push((*uid, m.flags.clone(), m.modseq));
        }
        Ok(out)
    }

    fn append(
        &mut self,
        mailbox: &str,
        message: &[u8],
        flags: &[Flag],
        date: Option<SystemTime>,
    ) -> Result<(u32, u32), StoreError> {
        let mut a = self.store.lock();
        let mb = a.get(mailbox)?;
        let mut fl = Vec::new();
        apply(&mut fl, FlagOp::Replace, flags);
        mb.highestmodseq += 1;
        let uid = mb.uidnext;
        mb.uidnext += 1;
        mb.messages.insert(
            uid,
            Msg {
                data: Arc::new(message.to_vec()),
                flags: fl,
                modseq: mb.highestmodseq,
                internal_date: date.unwrap_or_else(SystemTime::now),
            },
        );
        Ok((mb.uidvalidity, uid))
    }

    fn copy(&mut self, uids: &[u32], dest: &str) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        self.copy_inner(uids, dest, false)
    }

    fn move_to(&mut self, uids: &[u32], dest: &str) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        self.copy_inner(uids, dest, true)
    }

    fn expunge(&mut self, uids: Option<&[u32]>) -> Result<Vec<u32>, StoreError> {
        let name = self.selected_name()?;
        let mut a = self.store.lock();
        let mb = a.get(&name)?;
        let gone: Vec<u32> = mb
            .messages
            .iter()
            .filter(|(u, m)| m.flags.contains(&Flag::Deleted) && uids.is_none_or(|l| l.contains(u)))
            .map(|(u, _)| *u)
            .collect();
        for u in &gone {
            mb.messages.remove(u);
        }
        if !gone.is_empty() {
            mb.highestmodseq += 1;
        }
        Ok(gone)
    }
}

//! The UIDs of the selected mailbox as one session sees them, stored as runs of consecutive
//! UIDs: a mailbox whose UIDs have no gaps costs one run whatever its size. Sequence number
//! = index + 1.

/// `len` consecutive UIDs from `start`, after `before` UIDs of the earlier runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    start: u32,
    len: u32,
    before: u32,
}

impl Run {
    fn end(&self) -> u32 {
        self.start + (self.len - 1)
    }
}

/// UIDs in ascending order (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct UidList {
    runs: Vec<Run>,
}

impl UidList {
    /// From UIDs in ascending order (anything else is skipped: 0, repeats, smaller UIDs).
    pub fn from_sorted(uids: &[u32]) -> UidList {
        let mut l = UidList::default();
        for &u in uids {
            l.push(u);
        }
        l.runs.shrink_to_fit();
        l
    }

    pub fn len(&self) -> usize {
        self.runs.last().map_or(0, |r| (r.before + r.len) as usize)
    }

    pub fn last(&self) -> Option<u32> {
        self.runs.last().map(Run::end)
    }

    /// The UID at `index` (sequence number - 1).
    pub fn get(&self, index: usize) -> Option<u32> {
        let i = u32::try_from(index).ok()?;
        let k = self.runs.partition_point(|r| r.before + r.len <= i);
        let r = self.runs.get(k)?;
        Some(r.start + (i - r.before))
    }

    /// The index (sequence number - 1) of `uid`.
    pub fn index_of(&self, uid: u32) -> Option<usize> {
        let k = self.runs.partition_point(|r| r.end() < uid);
        let r = self.runs.get(k)?;
        (uid >= r.start).then(|| (r.before + (uid - r.start)) as usize)
    }

    /// Appends `uid` if it is above the last one (and not 0).
    pub fn push(&mut self, uid: u32) {
        match self.runs.last_mut() {
            Some(r) if uid <= r.end() => {}
            Some(r) if uid == r.end() + 1 => r.len += 1,
            _ if uid == 0 => {}
            last => {
                let before = last.map_or(0, |r| r.before + r.len);
                self.runs.push(Run {
                    start: uid,
                    len: 1,
                    before,
                });
            }
        }
    }

    /// Removes the UID at `index`.
    pub fn remove(&mut self, index: usize) {
        let Ok(i) = u32::try_from(index) else { return };
        let k = self.runs.partition_point(|r| r.before + r.len <= i);
        let Some(r) = self.runs.get(k).copied() else {
            return;
        };
        let off = i - r.before;
        if r.len == 1 {
            self.runs.remove(k);
        } else if off == 0 {
            self.runs[k].start += 1;
            self.runs[k].len -= 1;
        } else if off == r.len - 1 {
            self.runs[k].len -= 1;
        } else {
            self.runs[k].len = off;
            self.runs.insert(
                k + 1,
                Run {
                    start: r.start + off + 1,
                    len: r.len - off - 1,
                    before: r.before + off + 1,
                },
            );
        }
        let from = if r.len == 1 { k } else { k + 1 };
        for x in &mut self.runs[from..] {
            x.before -= 1;
        }
    }

    /// The UIDs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.runs.iter().flat_map(|r| r.start..=r.end())
    }
}

#[cfg(test)]
mod tests {
    use super::UidList;

    #[test]
    fn runs() {
        let mut l = UidList::from_sorted(&[1, 2, 3, 5, 6, 9]);
        assert_eq!(l.runs.len(), 3);
        assert_eq!(l.len(), 6);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![1, 2, 3, 5, 6, 9]);
        assert_eq!(l.get(3), Some(5));
        assert_eq!(l.get(5), Some(9));
        assert_eq!(l.get(6), None);
        assert_eq!(l.index_of(6), Some(4));
        assert_eq!(l.index_of(4), None);
        assert_eq!(l.index_of(10), None);
        l.remove(1);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![1, 3, 5, 6, 9]);
        assert_eq!(l.index_of(9), Some(4));
        l.remove(0);
        l.remove(0);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![5, 6, 9]);
        assert_eq!(l.get(0), Some(5));
        l.push(9);
        l.push(10);
        l.push(12);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![5, 6, 9, 10, 12]);
        assert_eq!(l.last(), Some(12));
        l.remove(4);
        l.remove(1);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![5, 9, 10]);
        for u in [5, 9, 10] {
            assert_eq!(l.get(l.index_of(u).unwrap()), Some(u));
        }
        l.remove(0);
        l.remove(0);
        l.remove(0);
        assert_eq!(l.len(), 0);
        assert_eq!(l.last(), None);
        assert_eq!(UidList::from_sorted(&[1, 2000]).len(), 2);
    }
}

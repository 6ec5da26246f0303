//! The UIDs of a mailbox view, stored as runs of consecutive UIDs: a mailbox whose UIDs have
//! no gaps costs one run whatever its size (a `Vec<u32>` costs 4 bytes per message for every
//! open view, idle sessions included). Sequence number = index + 1.

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
    pub fn from_sorted(uids: impl IntoIterator<Item = u32>) -> UidList {
        let mut l = UidList::default();
        for u in uids {
            l.push(u);
        }
        l.runs.shrink_to_fit();
        l
    }

    pub fn len(&self) -> usize {
        self.runs.last().map_or(0, |r| (r.before + r.len) as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The index (sequence number - 1) of `uid`.
    pub fn index_of(&self, uid: u32) -> Option<usize> {
        let k = self.runs.partition_point(|r| r.end() < uid);
        let r = self.runs.get(k)?;
        (uid >= r.start).then(|| (r.before + (uid - r.start)) as usize)
    }

    /// Appends `uid` if it is above the last one (and not 0).
    fn push(&mut self, uid: u32) {
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

    /// Removes every UID.
    pub fn clear(&mut self) {
        self.runs = Vec::new();
    }

    /// Keeps the UIDs `keep` is true for.
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        let old = std::mem::take(&mut self.runs);
        for r in &old {
            for u in r.start..=r.end() {
                if keep(u) {
                    self.push(u);
                }
            }
        }
        self.runs.shrink_to_fit();
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
        let mut l = UidList::from_sorted([1, 2, 3, 5, 6, 9, 9, 4, 0]);
        assert_eq!(l.runs.len(), 3);
        assert_eq!(l.len(), 6);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![1, 2, 3, 5, 6, 9]);
        assert_eq!(l.index_of(6), Some(4));
        assert_eq!(l.index_of(9), Some(5));
        assert_eq!(l.index_of(4), None);
        assert_eq!(l.index_of(10), None);
        l.retain(|u| u != 2);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![1, 3, 5, 6, 9]);
        assert_eq!(l.index_of(9), Some(4));
        assert_eq!(l.index_of(3), Some(1));
        assert_eq!(UidList::from_sorted(1..=2000).runs.len(), 1);
        let mut l = UidList::from_sorted(1..=10);
        l.retain(|u| u % 3 != 0);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![1, 2, 4, 5, 7, 8, 10]);
        assert_eq!(l.runs.len(), 4);
        for (i, u) in l.iter().enumerate() {
            assert_eq!(l.index_of(u), Some(i));
        }
        l.clear();
        assert!(l.is_empty());
        assert_eq!(l.len(), 0);
        assert_eq!(l.index_of(1), None);
    }
}

//! Pieces of the relay both engines share: the per-direction segment queue for buffered mode
//! and the splice pump.

use std::io;
use std::os::fd::RawFd;

use crate::sys;

/// A received chunk waiting to be sent on: buffer id (io_uring provided buffer), offset, length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seg {
    pub bid: u16,
    pub off: u32,
    pub len: u32,
}

const INLINE: usize = 6;

/// FIFO of segments with a small inline ring and a heap overflow that is only touched when a
/// multishot receive delivers more completions than the back-pressure threshold allows.
#[derive(Debug, Default)]
pub struct SegQueue {
    inline: [Seg; INLINE],
    head: u8,
    len: u8,
    overflow: Vec<Seg>,
}

impl SegQueue {
    pub fn len(&self) -> usize {
        self.len as usize + self.overflow.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn push(&mut self, seg: Seg) {
        if self.overflow.is_empty() && (self.len as usize) < INLINE {
            let idx = (self.head as usize + self.len as usize) % INLINE;
            self.inline[idx] = seg;
            self.len += 1;
        } else {
            self.overflow.push(seg);
        }
    }
    pub fn front_mut(&mut self) -> Option<&mut Seg> {
        if self.len > 0 {
            Some(&mut self.inline[self.head as usize])
        } else {
            self.overflow.first_mut()
        }
    }
    pub fn pop(&mut self) -> Option<Seg> {
        if self.len > 0 {
            let seg = self.inline[self.head as usize];
            self.head = ((self.head as usize + 1) % INLINE) as u8;
            self.len -= 1;
            // Refill the inline ring from the overflow, keeping order.
            if self.len == 0 && !self.overflow.is_empty() {
                self.head = 0;
                let n = self.overflow.len().min(INLINE);
                for (i, s) in self.overflow.drain(..n).enumerate() {
                    self.inline[i] = s;
                }
                self.len = n as u8;
                if self.overflow.is_empty() {
                    self.overflow = Vec::new();
                }
            }
            Some(seg)
        } else if !self.overflow.is_empty() {
            Some(self.overflow.remove(0))
        } else {
            None
        }
    }
    /// The queued segments, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Seg> {
        (0..self.len as usize)
            .map(move |i| &self.inline[(self.head as usize + i) % INLINE])
            .chain(self.overflow.iter())
    }
    /// Marks `n` bytes from the front as sent; hands each fully sent buffer id to `f`.
    pub fn consume(&mut self, mut n: u32, mut f: impl FnMut(u16)) {
        while n > 0 {
            let Some(seg) = self.front_mut() else { return };
            let take = n.min(seg.len);
            seg.off += take;
            seg.len -= take;
            n -= take;
            if seg.len == 0
                && let Some(s) = self.pop()
            {
                f(s.bid);
            }
        }
    }
    /// Empties the queue, handing every buffer id to `f` (to return it to the ring).
    pub fn drain(&mut self, mut f: impl FnMut(u16)) {
        while let Some(s) = self.pop() {
            f(s.bid);
        }
        self.overflow = Vec::new();
    }
}

/// The two pipes of a spliced connection: `[client→backend, backend→client]`, each `(read, write)`,
/// plus how many bytes sit in each pipe.
#[derive(Debug)]
pub struct Pipes {
    pub fds: [(RawFd, RawFd); 2],
    pub pending: [usize; 2],
}

/// Pipe size for splice mode.
pub const PIPE_SIZE: i32 = 1 << 20;

impl Pipes {
    pub fn new() -> io::Result<Pipes> {
        use std::os::fd::IntoRawFd;
        let (r0, w0) = sys::pipe(PIPE_SIZE)?;
        let (r1, w1) = sys::pipe(PIPE_SIZE)?;
        Ok(Pipes {
            fds: [
                (r0.into_raw_fd(), w0.into_raw_fd()),
                (r1.into_raw_fd(), w1.into_raw_fd()),
            ],
            pending: [0, 0],
        })
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        for (r, w) in self.fds {
            sys::close(r);
            sys::close(w);
        }
    }
}

/// What one pump of a spliced direction achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pump {
    /// Source has nothing more right now; pipe is empty. Wait for the source to be readable.
    WaitSource,
    /// Destination cannot take more; bytes are left in the pipe. Wait for it to be writable.
    WaitDest,
    /// Source reached end of stream and the pipe is empty.
    Eof,
    /// A socket error.
    Error(i32),
    /// Still flowing, stopped to let other connections run: call again soon.
    Yield,
}

/// Moves bytes `src → pipe → dst` until something would block. Returns the outcome and the
/// number of bytes delivered to `dst`.
pub fn pump(src: RawFd, dst: RawFd, pipe: (RawFd, RawFd), pending: &mut usize) -> (Pump, u64) {
    let mut moved = 0u64;
    // Bounded: a fast pair of sockets must not starve the rest of the worker.
    for _ in 0..64 {
        if *pending > 0 {
            match sys::splice(pipe.0, dst, *pending) {
                Ok(n) => {
                    *pending -= n;
                    moved += n as u64;
                    if *pending > 0 {
                        continue;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return (Pump::WaitDest, moved),
                Err(e) => return (Pump::Error(e.raw_os_error().unwrap_or(libc::EIO)), moved),
            }
        }
        match sys::splice(src, pipe.1, PIPE_SIZE as usize) {
            Ok(0) => return (Pump::Eof, moved),
            Ok(n) => *pending += n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return (Pump::WaitSource, moved),
            Err(e) => return (Pump::Error(e.raw_os_error().unwrap_or(libc::EIO)), moved),
        }
    }
    (Pump::Yield, moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seg_queue_keeps_order_through_overflow() {
        let mut q = SegQueue::default();
        for i in 0..20u16 {
            q.push(Seg {
                bid: i,
                off: 0,
                len: 1,
            });
        }
        assert_eq!(q.len(), 20);
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(q.pop().unwrap().bid);
        }
        for i in 20..25u16 {
            q.push(Seg {
                bid: i,
                off: 0,
                len: 1,
            });
        }
        while let Some(s) = q.pop() {
            got.push(s.bid);
        }
        assert_eq!(got, (0..25).collect::<Vec<_>>());
        assert!(q.is_empty());
    }

    #[test]
    fn seg_queue_consume_spans_segments() {
        let mut q = SegQueue::default();
        for i in 0..10u16 {
            q.push(Seg {
                bid: i,
                off: 0,
                len: 100,
            });
        }
        assert_eq!(
            q.iter().map(|s| s.bid).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        let mut freed = Vec::new();
        q.consume(250, |b| freed.push(b));
        assert_eq!(freed, vec![0, 1]);
        assert_eq!(
            q.front_mut().map(|s| (s.bid, s.off, s.len)),
            Some((2, 50, 50))
        );
        q.consume(750, |b| freed.push(b));
        assert_eq!(freed, (0..10).collect::<Vec<_>>());
        assert!(q.is_empty());
    }

    #[test]
    fn seg_queue_front_mut_edits_head() {
        let mut q = SegQueue::default();
        q.push(Seg {
            bid: 1,
            off: 0,
            len: 10,
        });
        q.front_mut().unwrap().off = 4;
        assert_eq!(q.pop().unwrap().off, 4);
        assert!(q.front_mut().is_none());
    }
}

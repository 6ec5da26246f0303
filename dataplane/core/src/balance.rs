//! Backend selection. (API skeleton: filled in by the balancing work.)
use std::net::IpAddr;

/// How a pool spreads new connections over its eligible backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Fewest active connections relative to weight; ties broken round-robin.
    #[default]
    LeastConn,
    RoundRobin,
    /// Smooth weighted round-robin (nginx's algorithm).
    Weighted,
    /// Maglev consistent hashing on the client's source address (affinity).
    SourceHash,
}

/// What the balancer knows about one backend at the moment of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub weight: u32,
    pub active: u32,
    /// Up, not draining, and under its maxconn.
    pub eligible: bool,
}

/// Per-worker balancing state for one pool (no sharing, no locks).
#[derive(Debug)]
pub struct Balancer {
    _algorithm: Algorithm,
}

impl Balancer {
    pub fn new(algorithm: Algorithm, seed: u64) -> Self {
        let _ = seed;
        Balancer { _algorithm: algorithm }
    }

    /// Picks a backend index among `candidates`, skipping those in `tried`. `generation` changes
    /// whenever eligibility or weights change, so tables can be rebuilt only then.
    pub fn pick(
        &mut self,
        candidates: &[Candidate],
        generation: u64,
        source: IpAddr,
        tried: &[usize],
    ) -> Option<usize> {
        let _ = (generation, source);
        candidates
            .iter()
            .enumerate()
            .filter(|(i, c)| c.eligible && !tried.contains(i))
            .min_by_key(|(_, c)| c.active)
            .map(|(i, _)| i)
    }
}

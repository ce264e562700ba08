//! Load and inference times learned from requests that ended ([`crate::router::Router::observe`]).

/// Longest latency [`crate::router::Router::observe`] takes as a sample (longer ones are clamped).
pub(crate) const MAX_SAMPLE_US: u64 = 600_000_000;

/// An exponentially weighted mean (weight 1/8 for a new sample).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ewma {
    us: u64,
    n: u32,
}

impl Ewma {
    pub(crate) fn add(&mut self, x: u64) {
        let x = x.min(MAX_SAMPLE_US);
        self.us = if self.n == 0 { x } else { (self.us * 7 + x) / 8 };
        self.n = self.n.saturating_add(1);
    }

    pub(crate) fn get(&self) -> Option<u64> {
        (self.n > 0).then_some(self.us)
    }
}

/// Learned load and inference times (of one runner, or of the fleet).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Times {
    pub(crate) load: Ewma,
    pub(crate) infer: Ewma,
}

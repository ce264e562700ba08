//! The routing policies the simulator and the real benchmark compare.

use hint_router_core::router::WhenHoldersBusy;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A routing policy under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Policy {
    /// The hint-router filter with `when_holders_busy: "any_available"`.
    Hint,
    /// The hint-router filter with `when_holders_busy: "fastest"`.
    HintFastest,
    /// Envoy `round_robin`.
    RoundRobin,
    /// Envoy `least_request` (two random choices).
    LeastRequest,
    /// Envoy `ring_hash` on the hint header.
    RingHash,
    /// Envoy `ring_hash` on the hint header with `hash_balance_factor: 150`.
    RingHashBounded,
}

impl Policy {
    /// Every policy, the filter first.
    pub const ALL: [Policy; 6] = [
        Policy::Hint,
        Policy::HintFastest,
        Policy::RoundRobin,
        Policy::LeastRequest,
        Policy::RingHash,
        Policy::RingHashBounded,
    ];

    /// The hint-router policies.
    pub fn is_hint(self) -> bool {
        matches!(self, Policy::Hint | Policy::HintFastest)
    }

    /// The filter's `when_holders_busy` for a hint-router policy.
    pub fn when_holders_busy(self) -> WhenHoldersBusy {
        match self {
            Policy::HintFastest => WhenHoldersBusy::Fastest,
            _ => WhenHoldersBusy::AnyAvailable,
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Hint => "hint",
            Policy::HintFastest => "hint_fastest",
            Policy::RoundRobin => "round_robin",
            Policy::LeastRequest => "least_request",
            Policy::RingHash => "ring_hash",
            Policy::RingHashBounded => "ring_hash_bounded",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Policy, String> {
        Policy::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            format!(
                "unknown policy {s:?} (one of {})",
                Policy::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

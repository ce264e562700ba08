//! Queueing each model's requests have accepted at busy holders, for `fastest`'s replication
//! rule (see [`crate::router::WhenHoldersBusy::Fastest`]).
//!
//! Sending a request to wait at a busy holder is renting; loading the model on another runner
//! is buying: it costs once (the load, and the eviction it causes) and then serves the model's
//! next requests without that wait. Comparing one request's wait with the load, as the plain
//! rule does, never buys while each wait stays a little under a load, however many requests
//! pay it. The ski-rental rule buys once the waits paid since the queue last cleared reach the
//! price of the load, which costs at most twice what the best choice in hindsight would have.
//!
//! The table is fixed-size and direct-mapped by the model's hash (a model that shares a slot
//! with another starts from nothing again), so it does not grow with the number of models.

/// Slots of the table (16 bytes each).
const SLOTS: usize = 256;

/// Waits paid per model since its queue last cleared, in microseconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rent {
    /// (tag: the hash's high bits, microseconds); empty until the first wait.
    slots: Vec<(u32, u64)>,
}

/// The slot of `hash` and its tag.
#[inline]
fn place(hash: u64) -> (usize, u32) {
    ((hash as usize) % SLOTS, (hash >> 32) as u32)
}

impl Rent {
    /// Waits paid for the model with `hash`.
    #[inline]
    pub(crate) fn paid(&self, hash: u64) -> u64 {
        let (i, tag) = place(hash);
        match self.slots.get(i) {
            Some(&(t, us)) if t == tag => us,
            _ => 0,
        }
    }

    /// A request for the model waits about `us` at a holder.
    pub(crate) fn pay(&mut self, hash: u64, us: u64) {
        if self.slots.is_empty() {
            self.slots = vec![(0, 0); SLOTS];
        }
        let (i, tag) = place(hash);
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = match *slot {
                (t, paid) if t == tag => (t, paid.saturating_add(us)),
                _ => (tag, us),
            };
        }
    }

    /// The model's queue cleared, or it was bought (loaded elsewhere): start again.
    #[inline]
    pub(crate) fn clear(&mut self, hash: u64) {
        let (i, tag) = place(hash);
        if let Some(slot) = self.slots.get_mut(i) {
            if slot.0 == tag {
                slot.1 = 0;
            }
        }
    }

    /// Bytes held (fixed once used).
    pub(crate) fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<(u32, u64)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn pays_clears_and_forgets_a_model_that_shares_its_slot() {
        let mut r = Rent::default();
        assert_eq!((r.paid(7), r.bytes()), (0, 0));
        r.pay(7, 10);
        r.pay(7, 15);
        assert_eq!(r.paid(7), 25);
        // Same slot, other tag: the newcomer starts from nothing and takes the slot.
        let other = 7 + (1 << 32);
        assert_eq!(r.paid(other), 0);
        r.pay(other, 3);
        assert_eq!((r.paid(other), r.paid(7)), (3, 0));
        r.clear(7); // not there any more: nothing happens
        assert_eq!(r.paid(other), 3);
        r.clear(other);
        assert_eq!(r.paid(other), 0);
        r.pay(9, u64::MAX);
        r.pay(9, 1);
        assert_eq!(r.paid(9), u64::MAX);
        assert_eq!(r.bytes(), SLOTS * 16);
    }
}

//! The simulated runners: `runner-example`'s cache and inference slots (see the module
//! docs of [`super`]).

use super::{Entry, Event, ReqState, Sim};

impl Sim<'_> {
    pub(super) fn set_state(&mut self, i: u32, s: ReqState) {
        if let Some(st) = self.states.get_mut(i as usize) {
            if let ReqState::WaitingLoad(r, _) = *st {
                if let Some(w) = self.waiting_load.get_mut(r as usize) {
                    *w = w.saturating_sub(1);
                }
            }
            if let ReqState::WaitingLoad(r, _) = s {
                if let Some(w) = self.waiting_load.get_mut(r as usize) {
                    *w += 1;
                }
            }
            *st = s;
        }
    }

    pub(super) fn acquire(&mut self, r: u32, i: u32, model: u32, evict: Option<u32>) {
        let Some(run) = self.runners.get_mut(r as usize) else { return };
        run.clock += 1;
        let clock = run.clock;
        if let Some(e) = run.entries.iter_mut().find(|e| e.model == model) {
            e.pins += 1;
            e.last_used = clock;
            if e.ready {
                run.ready_q.push_back(i);
                if let Some(h) = self.hit.get_mut(i as usize) {
                    *h = true;
                }
                self.set_state(i, ReqState::ReadyQ(r));
                self.queue_from(i, true);
                self.try_start(r);
            } else {
                e.waiters.push(i);
                self.set_state(i, ReqState::WaitingLoad(r, model));
            }
            return;
        }
        if let Some((_, w, _)) = run.queue.iter_mut().find(|(m, _, _)| *m == model) {
            w.push(i);
        } else {
            run.queue.push_back((model, vec![i], evict));
        }
        self.set_state(i, ReqState::WaitingLoad(r, model));
        // Waiting for a cache slot (admit ends it at once when one is free).
        self.queue_from(i, false);
        self.admit(r);
    }

    pub(super) fn admit(&mut self, r: u32) {
        let cap = self.p.capacity.max(1);
        let now = self.now;
        let Some(run) = self.runners.get_mut(r as usize) else { return };
        let (mut started, mut admitted) = (Vec::new(), Vec::new());
        loop {
            if run.queue.is_empty() {
                break;
            }
            if run.entries.len() + 1 > cap {
                // The model the router asked to evict, if it can go; else the least recently
                // used one not in use (as `runner-example` does).
                let evictable = |e: &Entry| e.pins == 0 && e.ready;
                let asked = run.queue.front().and_then(|q| q.2);
                let victim = asked
                    .and_then(|m| run.entries.iter().position(|e| e.model == m && evictable(e)))
                    .or_else(|| {
                        let lru = run.entries.iter().enumerate().filter(|(_, e)| evictable(e));
                        lru.min_by_key(|(_, e)| e.last_used).map(|(k, _)| k)
                    });
                match victim {
                    Some(k) => {
                        run.entries.swap_remove(k);
                        continue;
                    }
                    None => break,
                }
            }
            let Some((model, waiters, _)) = run.queue.pop_front() else { break };
            run.clock += 1;
            let from_host = self.p.host_cache > 0 && run.host.iter().any(|&(_, m)| m == model);
            if self.p.host_cache > 0 {
                // Kept (or refreshed) in the tier; the least recently loaded copy goes.
                run.host.retain(|&(_, m)| m != model);
                if run.host.len() >= self.p.host_cache {
                    if let Some(k) = run.host.iter().enumerate().min_by_key(|(_, e)| e.0).map(|(k, _)| k) {
                        run.host.swap_remove(k);
                    }
                }
                run.host.push((run.clock, model));
            }
            admitted.extend_from_slice(&waiters);
            run.entries.push(Entry {
                model,
                pins: waiters.len() as u32,
                last_used: run.clock,
                ready: false,
                waiters,
            });
            started.push((model, from_host));
        }
        for i in admitted {
            self.queue_until(i);
        }
        for (m, from_host) in started {
            self.loads.push(now);
            let took = if from_host { self.p.warm_load_us } else { self.p.load_us_of(m) };
            self.push(now + took, Event::LoadDone(r, m));
        }
    }

    pub(super) fn load_done(&mut self, r: u32, model: u32) {
        let Some(run) = self.runners.get_mut(r as usize) else { return };
        let Some(e) = run.entries.iter_mut().find(|e| e.model == model) else { return };
        e.ready = true;
        let waiters = std::mem::take(&mut e.waiters);
        for &i in &waiters {
            run.ready_q.push_back(i);
        }
        for i in waiters {
            self.set_state(i, ReqState::ReadyQ(r));
            self.queue_from(i, true);
        }
        self.admit(r);
        self.try_start(r);
    }

    pub(super) fn try_start(&mut self, r: u32) {
        let m = self.p.max_concurrency.max(1);
        let mut started = Vec::new();
        if let Some(run) = self.runners.get_mut(r as usize) {
            while run.running < m {
                let Some(i) = run.ready_q.pop_front() else { break };
                run.running += 1;
                started.push(i);
            }
        }
        for i in started {
            self.queue_until(i);
            self.set_state(i, ReqState::Running(r));
            self.push(self.now + self.p.infer_us, Event::InferDone(r, i));
        }
    }

    pub(super) fn unpin(&mut self, r: u32, model: u32) {
        let Some(run) = self.runners.get_mut(r as usize) else { return };
        run.clock += 1;
        let clock = run.clock;
        let mut admit = false;
        if let Some(e) = run.entries.iter_mut().find(|e| e.model == model) {
            e.pins = e.pins.saturating_sub(1);
            e.last_used = clock;
            admit = e.pins == 0 && e.ready;
        }
        if admit {
            self.admit(r);
        }
    }

    /// Request `i` starts waiting for an inference slot (`slot`) or a cache slot.
    pub(super) fn queue_from(&mut self, i: u32, slot: bool) {
        if let Some(q) = self.queued_since.get_mut(i as usize) {
            *q = Some((self.now, slot));
        }
    }

    /// Request `i` stops waiting for a slot: the wait counts towards its `queue_us` (and
    /// `slot_us`), as `runner-example` reports it.
    pub(super) fn queue_until(&mut self, i: u32) {
        let Some((since, slot)) = self.queued_since.get_mut(i as usize).and_then(Option::take) else {
            return;
        };
        if let Some(rec) = self.records.get_mut(i as usize) {
            let waited = self.now.saturating_sub(since);
            rec.queue_us += waited;
            if slot {
                rec.slot_us += waited;
            }
        }
    }
}

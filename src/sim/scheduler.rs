//! Admission (a fixed number of running slots behind a FIFO queue) and the
//! KV-cache model: block accounting for running requests plus an LRU prefix
//! cache of chained block hashes.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::generate::{Token, hash_tokens};
use super::metrics::{FinishedReason, Metrics};

#[derive(Debug, thiserror::Error)]
pub(crate) enum AdmitError {
    #[error("the waiting queue is full ({0} requests)")]
    QueueFull(usize),
    #[error("the engine is shutting down")]
    ShuttingDown,
}

pub(crate) struct Scheduler {
    /// tokio's semaphore is fair, which gives the FIFO waiting queue.
    slots: Arc<Semaphore>,
    max_waiting: usize,
    waiting: AtomicUsize,
    block_size: usize,
    total_blocks: u64,
    blocks_used: AtomicU64,
    prefix_cache: Mutex<LruCache<u64, ()>>,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    pub(crate) fn new(
        max_num_seqs: NonZeroUsize,
        max_waiting: usize,
        block_size: NonZeroUsize,
        kv_cache_blocks: NonZeroUsize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(
                max_num_seqs.get().min(Semaphore::MAX_PERMITS),
            )),
            max_waiting,
            waiting: AtomicUsize::new(0),
            block_size: block_size.get(),
            total_blocks: kv_cache_blocks.get() as u64,
            blocks_used: AtomicU64::new(0),
            prefix_cache: Mutex::new(LruCache::new(kv_cache_blocks)),
            metrics,
        }
    }

    /// Takes a free slot or a place in the queue; fails at once when the
    /// queue is bounded and full so the caller can answer 503.
    pub(crate) fn enqueue(self: &Arc<Self>) -> Result<Ticket, AdmitError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(Ticket {
                sched: self.clone(),
                permit: Some(permit),
                done: false,
            });
        }
        if self.slots.is_closed() {
            return Err(AdmitError::ShuttingDown);
        }
        if self.max_waiting == 0 {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        } else {
            self.waiting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                    (w < self.max_waiting).then_some(w + 1)
                })
                .map_err(|_| AdmitError::QueueFull(self.max_waiting))?;
        }
        self.metrics.waiting.inc();
        Ok(Ticket {
            sched: self.clone(),
            permit: None,
            done: false,
        })
    }

    /// Wakes every queued request with [`AdmitError::ShuttingDown`].
    pub(crate) fn close(&self) {
        self.slots.close();
    }

    fn leave_queue(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.waiting.dec();
    }

    fn take_blocks(&self, n: u64) {
        let used = self.blocks_used.fetch_add(n, Ordering::SeqCst) + n;
        self.publish_usage(used);
    }

    fn give_blocks(&self, n: u64) {
        let used = self.blocks_used.fetch_sub(n, Ordering::SeqCst) - n;
        self.publish_usage(used);
    }

    fn publish_usage(&self, used: u64) {
        // Running requests may oversubscribe the pool (no preemption is
        // modelled); report it as full rather than above 100 %.
        let ratio = used as f64 / self.total_blocks as f64;
        self.metrics.kv_usage.set(ratio.min(1.0));
    }

    /// Looks up and then records the prompt's full blocks; returns the number
    /// of prompt tokens served from the prefix cache.
    fn prefix_lookup(&self, prompt: &[Token]) -> usize {
        // Like vLLM, at least one prompt token is always computed, so a fully
        // cached prompt still misses on its last block.
        let max_hit_blocks = prompt.len().saturating_sub(1) / self.block_size;
        let mut cache = self
            .prefix_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut parent = 0u64;
        let mut matched = 0usize;
        let mut still_matching = true;
        for (i, block) in prompt.chunks_exact(self.block_size).enumerate() {
            // Chaining the parent hash makes a block match only after the
            // same prefix, as in vLLM's hash-based prefix caching.
            parent = hash_tokens(parent, block);
            if still_matching && i < max_hit_blocks && cache.get(&parent).is_some() {
                matched += 1;
            } else {
                still_matching = false;
                cache.put(parent, ());
            }
        }
        drop(cache);
        let hit = matched * self.block_size;
        self.metrics.prefix_queries.inc_by(prompt.len() as u64);
        self.metrics.prefix_hits.inc_by(hit as u64);
        hit
    }

    fn blocks_for(&self, tokens: usize) -> u64 {
        tokens.div_ceil(self.block_size) as u64
    }
}

/// A request that has been accepted but may not be running yet. Dropping it
/// before [`Ticket::admit`] completes means the client gave up.
pub(crate) struct Ticket {
    sched: Arc<Scheduler>,
    permit: Option<OwnedSemaphorePermit>,
    done: bool,
}

impl Ticket {
    /// Waits (FIFO) for a running slot, then does the prefill bookkeeping.
    pub(crate) async fn admit(mut self, prompt: &[Token]) -> Result<Slot, AdmitError> {
        let permit = match self.permit.take() {
            Some(p) => p,
            None => {
                let acquired = self.sched.slots.clone().acquire_owned().await;
                self.done = true;
                self.sched.leave_queue();
                acquired.map_err(|_| AdmitError::ShuttingDown)?
            }
        };
        self.done = true;
        let sched = self.sched.clone();
        sched.metrics.running.inc();
        sched.metrics.prompt_tokens.inc_by(prompt.len() as u64);
        let cached_tokens = sched.prefix_lookup(prompt);
        let blocks = sched.blocks_for(prompt.len());
        sched.take_blocks(blocks);
        Ok(Slot {
            sched,
            _permit: permit,
            prompt_len: prompt.len(),
            generated: 0,
            blocks,
            cached_tokens,
            outcome: None,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.permit.is_none() {
            self.sched.leave_queue();
        }
        self.sched.metrics.cancelled.inc();
        self.sched.metrics.finished(FinishedReason::Abort);
    }
}

/// How a running request ended; a [`Slot`] dropped without one was cancelled
/// by its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Finished(FinishedReason),
    /// Ended by the engine itself (injected fault, shutdown).
    Aborted,
}

/// A running request. Every exit path releases the slot and its KV blocks
/// through `Drop`.
pub(crate) struct Slot {
    sched: Arc<Scheduler>,
    _permit: OwnedSemaphorePermit,
    prompt_len: usize,
    generated: usize,
    blocks: u64,
    pub(crate) cached_tokens: usize,
    outcome: Option<Outcome>,
}

impl Slot {
    /// Accounts one generated token (metrics and KV growth).
    pub(crate) fn on_token(&mut self) {
        self.generated += 1;
        self.sched.metrics.generation_tokens.inc();
        let need = self.sched.blocks_for(self.prompt_len + self.generated);
        if need > self.blocks {
            self.sched.take_blocks(need - self.blocks);
            self.blocks = need;
        }
    }

    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let sched = &self.sched;
        sched.give_blocks(self.blocks);
        sched.metrics.running.dec();
        match self.outcome {
            Some(Outcome::Finished(reason)) => sched.metrics.finished(reason),
            Some(Outcome::Aborted) => sched.metrics.finished(FinishedReason::Abort),
            None => {
                sched.metrics.cancelled.inc();
                sched.metrics.finished(FinishedReason::Abort);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(slots: usize, max_waiting: usize) -> Arc<Scheduler> {
        let nz = |n| NonZeroUsize::new(n).unwrap();
        Arc::new(Scheduler::new(
            nz(slots),
            max_waiting,
            nz(4),
            nz(100),
            Arc::new(Metrics::new("m")),
        ))
    }

    #[tokio::test]
    async fn prefix_blocks_chain_and_keep_last_token_uncached() {
        let s = sched(4, 0);
        let prompt: Vec<Token> = (0..12).collect();
        let first = s.enqueue().unwrap().admit(&prompt).await.unwrap();
        assert_eq!(first.cached_tokens, 0);
        // 12 tokens = 3 full blocks, but the last token must be computed.
        let again = s.enqueue().unwrap().admit(&prompt).await.unwrap();
        assert_eq!(again.cached_tokens, 8);
        let mut other: Vec<Token> = prompt.clone();
        other[0] = 99;
        let other = s.enqueue().unwrap().admit(&other).await.unwrap();
        assert_eq!(other.cached_tokens, 0);
        assert!((s.metrics.kv_usage.get() - 0.09).abs() < 1e-9);
        drop((first, again, other));
        assert_eq!(s.metrics.kv_usage.get(), 0.0);
        assert_eq!(s.metrics.running.get(), 0);
        assert_eq!(s.metrics.cancelled.get(), 3);
    }

    #[tokio::test]
    async fn bounded_queue_rejects() {
        let s = sched(1, 1);
        let running = s.enqueue().unwrap().admit(&[1]).await.unwrap();
        let queued = s.enqueue().unwrap();
        assert_eq!(s.metrics.waiting.get(), 1);
        assert!(matches!(s.enqueue(), Err(AdmitError::QueueFull(1))));
        drop(queued);
        assert_eq!(s.metrics.waiting.get(), 0);
        running.finish(Outcome::Finished(FinishedReason::Stop));
        assert_eq!(s.metrics.snapshot().completed, 1);
    }
}

//! Continuous batching: which sequences run in the next forward step, and with how many tokens.
//!
//! Every step the scheduler first gives each running sequence its next chunk (one token when it is
//! decoding, up to the remaining token budget while it is still prefilling), then admits waiting
//! sequences while the token budget (`max_num_batched_tokens`) and `max_num_seqs` allow. Prefill is
//! thus chunked and mixed with decode. When the KV pools run out, the most recently admitted running
//! sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
//! recomputed from its prompt and the tokens it already produced (which gives the same numbers:
//! the kernels are batch-invariant and a prefill equals the decode steps it replaces).

use std::collections::VecDeque;

use super::block_pool::{BlockId, BlockPool, block_hash};
use super::paged_kv::Group;
use super::sequence::Sequence;

/// Marks a sliding-window block table entry whose block was freed.
pub const FREED: BlockId = BlockId::MAX;

#[derive(Clone, Copy, Debug)]
pub struct SchedulerLimits {
    pub block_size: usize,
    pub sliding_window: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub prefix_caching: bool,
}

/// One running sequence's share of the next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// Index into `running`.
    pub seq: usize,
    pub tokens: usize,
}

pub struct Scheduler {
    pub limits: SchedulerLimits,
    /// Sequences not yet running. Invariant: a waiting sequence holds no blocks (admission that fails
    /// and preemption both free them before a sequence goes back here).
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    /// Indexed by [`Group`]; a pool with no blocks belongs to a group the model does not have.
    pub pools: [BlockPool; 2],
    pub preemptions: u64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

impl Scheduler {
    pub fn new(limits: SchedulerLimits, pools: [BlockPool; 2]) -> Scheduler {
        Scheduler { limits, waiting: VecDeque::new(), running: Vec::new(), pools, preemptions: 0, prefix_queries: 0, prefix_hits: 0 }
    }

    fn groups(&self) -> Vec<Group> {
        groups(&self.pools)
    }

    /// Plans the next step. Sequences may move between `waiting` and `running`; indices in the plan
    /// refer to `running` as it is after this call.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.limits.max_num_batched_tokens;
        let mut plan = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = self.running[i].chunk_len(self.running[i].remaining().min(budget));
            if n == 0 {
                i += 1;
                continue;
            }
            if self.grow_or_preempt(i, n) {
                plan.push(Scheduled { seq: i, tokens: n });
                budget = budget.saturating_sub(n);
                i += 1;
            }
        }
        while budget > 0 && self.running.len() < self.limits.max_num_seqs && !self.waiting.is_empty() {
            let mut seq = self.waiting.pop_front().expect("not empty");
            if seq.computed == 0 {
                self.reuse_cached_prefix(&mut seq);
            }
            let n = seq.chunk_len(seq.remaining().min(budget));
            if n == 0 {
                self.waiting.push_front(seq);
                break;
            }
            if !grow(&mut self.pools, self.limits.block_size, &mut seq.tables, seq.computed + n) {
                self.free_blocks(&mut seq);
                seq.computed = 0;
                seq.cached_tokens = 0;
                seq.hashes.clear();
                self.waiting.push_front(seq);
                break;
            }
            plan.push(Scheduled { seq: self.running.len(), tokens: n });
            self.running.push(seq);
            budget = budget.saturating_sub(n);
        }
        plan
    }

    /// Grows running sequence `i` by `n` positions, preempting later sequences (then `i` itself) until
    /// the blocks fit. Returns false when `i` itself was preempted.
    fn grow_or_preempt(&mut self, i: usize, n: usize) -> bool {
        loop {
            let seq = &mut self.running[i];
            if grow(&mut self.pools, self.limits.block_size, &mut seq.tables, seq.computed + n) {
                return true;
            }
            let victim = self.running.len() - 1;
            self.preempt(victim);
            if victim == i {
                return false;
            }
        }
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.free_blocks(&mut seq);
        seq.computed = 0;
        seq.hashes.clear();
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    fn free_blocks(&mut self, seq: &mut Sequence) {
        for g in [Group::Sliding, Group::Global] {
            for id in seq.tables[g as usize].drain(..) {
                if id != FREED {
                    self.pools[g as usize].release(id);
                }
            }
        }
    }

    /// The first sliding block a sequence of length `len` still needs (earlier ones are out of the window).
    fn first_sliding_block(&self, len: usize) -> usize {
        (len + 1).saturating_sub(self.limits.sliding_window) / self.limits.block_size
    }

    /// Starts a fresh sequence on the longest run of cached full blocks of its tokens that every group
    /// has (the sliding group only needs the blocks still inside the window at that point), leaving at
    /// least one token to compute so the step yields logits.
    fn reuse_cached_prefix(&mut self, seq: &mut Sequence) {
        if !self.limits.prefix_caching || seq.params.prompt_logprobs.is_some() {
            return;
        }
        let bs = self.limits.block_size;
        let max_blocks = (seq.tokens.len() - 1) / bs;
        let mut hashes = Vec::with_capacity(max_blocks);
        let mut parent = 0;
        for b in 0..max_blocks {
            parent = block_hash(parent ^ seq.block_salt(b, bs), &seq.tokens[b * bs..(b + 1) * bs]);
            hashes.push(parent);
        }
        self.prefix_queries += seq.tokens.len() as u64;
        let has = |g: Group, pools: &[BlockPool; 2]| pools[g as usize].num_blocks() > 0;
        let mut k = hashes.len();
        if has(Group::Global, &self.pools) {
            k = hashes.iter().take_while(|h| self.pools[Group::Global as usize].lookup(**h).is_some()).count();
        }
        if has(Group::Sliding, &self.pools) {
            while k > 0 && !(self.first_sliding_block(k * bs)..k).all(|b| self.pools[0].lookup(hashes[b]).is_some()) {
                k -= 1;
            }
        }
        if k == 0 {
            return;
        }
        for g in self.groups() {
            let first = if g == Group::Sliding { self.first_sliding_block(k * bs) } else { 0 };
            let table = &mut seq.tables[g as usize];
            for (b, h) in hashes.iter().enumerate().take(k) {
                if b < first {
                    table.push(FREED);
                } else {
                    let id = self.pools[g as usize].lookup(*h).expect("checked above");
                    self.pools[g as usize].acquire(id);
                    table.push(id);
                }
            }
        }
        hashes.truncate(k);
        seq.hashes = hashes;
        seq.computed = k * bs;
        seq.cached_tokens = k * bs;
        self.prefix_hits += (k * bs) as u64;
    }

    /// After a step computed `n` more positions of running sequence `i`: registers the blocks it
    /// filled for prefix caching and frees sliding blocks that fell out of the window.
    pub fn advance(&mut self, i: usize, n: usize) {
        let bs = self.limits.block_size;
        let first_needed = self.first_sliding_block(self.running[i].computed + n);
        let seq = &mut self.running[i];
        seq.computed += n;
        while (seq.hashes.len() + 1) * bs <= seq.computed {
            let b = seq.hashes.len();
            let h = block_hash(seq.hashes.last().copied().unwrap_or(0) ^ seq.block_salt(b, bs), &seq.tokens[b * bs..(b + 1) * bs]);
            seq.hashes.push(h);
            if self.limits.prefix_caching {
                for g in [Group::Sliding, Group::Global] {
                    if let Some(&id) = seq.tables[g as usize].get(b).filter(|&&id| id != FREED) {
                        self.pools[g as usize].register(id, h);
                    }
                }
            }
        }
        // Blocks leave the window in order, so the ones still held below `first_needed` are the few just
        // before it: walk back until the first freed one rather than over the whole table every step.
        let sliding = &mut seq.tables[Group::Sliding as usize];
        let end = first_needed.min(sliding.len());
        for id in sliding[..end].iter_mut().rev().take_while(|id| **id != FREED) {
            self.pools[0].release(*id);
            *id = FREED;
        }
    }

    /// Removes a running sequence, freeing its blocks.
    pub fn finish(&mut self, i: usize) -> Sequence {
        let mut seq = self.running.remove(i);
        self.free_blocks(&mut seq);
        seq
    }

    /// Fraction of global (or, without global layers, sliding) blocks in use.
    pub fn usage(&self) -> f64 {
        self.pools.iter().filter(|p| p.num_blocks() > 0).map(|p| p.usage()).fold(0.0, f64::max)
    }
}

/// The groups the model has (a pool with no blocks belongs to a group it does not have).
fn groups(pools: &[BlockPool; 2]) -> Vec<Group> {
    [Group::Sliding, Group::Global].into_iter().filter(|g| pools[*g as usize].num_blocks() > 0).collect()
}

/// Allocates blocks so that `tables` cover `end` positions in every group, or allocates nothing.
fn grow(pools: &mut [BlockPool; 2], block_size: usize, tables: &mut [Vec<BlockId>; 2], end: usize) -> bool {
    let blocks = end.div_ceil(block_size);
    let mut taken: Vec<(Group, Vec<BlockId>)> = Vec::new();
    for g in groups(pools) {
        let need = blocks.saturating_sub(tables[g as usize].len());
        match pools[g as usize].allocate_n(need) {
            Some(ids) => taken.push((g, ids)),
            None => {
                for (g, ids) in taken {
                    ids.into_iter().for_each(|id| pools[g as usize].release(id));
                }
                return false;
            }
        }
    }
    for (g, ids) in taken {
        tables[g as usize].extend(ids);
    }
    true
}

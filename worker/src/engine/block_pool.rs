//! A pool of fixed-size KV blocks with reference counts and content-hash prefix caching.
//!
//! A block that holds a full block of tokens gets the hash of its contents (chained over the sequence's
//! earlier blocks). When its last user frees it, it keeps its contents and its hash and joins the free
//! queue at the back; allocation takes from the front, so cached blocks are evicted least recently used
//! first, and a later request with the same prefix can take one back from the queue (a prefix-cache hit).

use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;

#[derive(Clone, Debug, Default)]
struct Block {
    refs: u32,
    hash: Option<u64>,
    /// Key in the free queue while `refs == 0`.
    free_stamp: Option<u64>,
}

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    /// Free blocks in the order they were freed (stamp → id): the front is evicted first.
    free: BTreeMap<u64, BlockId>,
    next_stamp: u64,
    cached: HashMap<u64, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> BlockPool {
        let mut pool =
            BlockPool { blocks: vec![Block::default(); num_blocks], free: BTreeMap::new(), next_stamp: 0, cached: HashMap::new() };
        for id in 0..num_blocks as BlockId {
            pool.push_free(id);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Fraction of blocks held by running sequences (cached-but-free blocks count as free).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() { 0.0 } else { 1.0 - self.free.len() as f64 / self.blocks.len() as f64 }
    }

    fn push_free(&mut self, id: BlockId) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.blocks[id as usize].free_stamp = Some(stamp);
        self.free.insert(stamp, id);
    }

    /// Takes the least recently freed block, evicting its cached contents. `None` when the pool is empty.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (_, id) = self.free.pop_first()?;
        let b = &mut self.blocks[id as usize];
        b.free_stamp = None;
        b.refs = 1;
        if let Some(h) = b.hash.take()
            && self.cached.get(&h) == Some(&id)
        {
            self.cached.remove(&h);
        }
        Some(id)
    }

    /// Takes `n` blocks, or none at all.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.free.len() < n {
            return None;
        }
        Some((0..n).map(|_| self.allocate().expect("counted")).collect())
    }

    /// Drops one reference; at zero the block joins the free queue, keeping its cached contents.
    pub fn release(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.refs > 0, "block {id} released twice");
        b.refs -= 1;
        if b.refs == 0 {
            self.push_free(id);
        }
    }

    /// The block caching `hash`, if any (without taking it).
    pub fn lookup(&self, hash: u64) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Takes a reference to a cached block found by [`lookup`](Self::lookup).
    pub fn acquire(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if let Some(stamp) = b.free_stamp.take() {
            self.free.remove(&stamp);
        }
        b.refs += 1;
    }

    /// Records that a held block now holds the full block with this content hash. The first block to
    /// register a hash keeps it; a duplicate stays uncached.
    pub fn register(&mut self, id: BlockId, hash: u64) {
        if self.blocks[id as usize].hash.is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.blocks[id as usize].hash = Some(hash);
        self.cached.insert(hash, id);
    }

    /// Forgets every cached hash (the free blocks stay free).
    pub fn reset_cache(&mut self) {
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
    }
}

/// The content hash of a block: its tokens chained onto the hash of the blocks before it.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: deterministic across runs and processes.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_blocks_stay_cached_until_evicted_lru() {
        let mut p = BlockPool::new(3);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, 11);
        p.register(b, 22);
        p.release(a);
        p.release(b);
        assert_eq!(p.num_free(), 3);
        assert_eq!(p.lookup(11), Some(a));
        // The never-used block goes first, then the older cached one (a), evicting its hash.
        let c = p.allocate().unwrap();
        assert!(c != a && c != b);
        assert_eq!(p.allocate(), Some(a));
        assert_eq!(p.lookup(11), None);
        assert_eq!(p.lookup(22), Some(b));
        p.acquire(b);
        assert_eq!(p.num_free(), 0);
        assert_eq!(p.allocate(), None);
        assert!(p.allocate_n(1).is_none());
    }

    #[test]
    fn shared_block_is_freed_by_its_last_user() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        p.register(a, 5);
        p.acquire(a);
        p.release(a);
        assert_eq!(p.num_free(), 1);
        p.release(a);
        assert_eq!(p.num_free(), 2);
        assert!((p.usage() - 0.0).abs() < 1e-12);
    }

    #[test]
    fn hash_depends_on_parent_and_tokens() {
        assert_eq!(block_hash(0, &[1, 2]), block_hash(0, &[1, 2]));
        assert_ne!(block_hash(0, &[1, 2]), block_hash(1, &[1, 2]));
        assert_ne!(block_hash(0, &[1, 2]), block_hash(0, &[2, 1]));
    }
}

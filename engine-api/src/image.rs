//! Images as the engine takes them: 16x16 patches of 8-bit RGB on a grid of 3x3 pooling blocks.
//! Preprocessing (decode, resize, patchify) is the front end's job; the vision tower is the engine's.

use std::sync::Arc;

/// Budgets transformers accepts (`max_soft_tokens`).
pub const SOFT_TOKEN_BUDGETS: [usize; 5] = [70, 140, 280, 560, 1120];
pub const PATCH: usize = 16;
pub const POOL: usize = 3;

/// An image after preprocessing. Pixels stay 8-bit: the model's input is `pixel / 255`, which the
/// vision tower computes itself, so a request's patches travel as bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Patches {
    /// Patch grid, in patches.
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` patches of `16 * 16 * 3` bytes, (dy, dx, c) order.
    pub pixels: Vec<u8>,
}

impl Patches {
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Soft tokens after 3x3 pooling.
    pub fn soft_tokens(&self) -> usize {
        self.len() / (POOL * POOL)
    }

    /// `(x, y)` = (column, row) of patch `i`.
    pub fn position(&self, i: usize) -> (usize, usize) {
        (i % self.cols, i / self.cols)
    }
}

/// One image of a request: its patches, and the prompt position of its first soft token.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageInput {
    pub start: usize,
    pub patches: Arc<Patches>,
}

impl ImageInput {
    /// A content hash (the encoded-image cache and prefix-cache keys).
    pub fn hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (self.patches.rows, self.patches.cols).hash(&mut h);
        self.patches.pixels.hash(&mut h);
        h.finish()
    }
}

//! The expert computation, behind [`ExpertBackend`] so that the experts can live in this process
//! ([`LocalExperts`]) or on expert workers reached over gRPC or NCCL, without the model code knowing.
//!
//! Numerics (transformers' eager `Gemma4TextExperts`): for each routed (row, expert),
//! `y = down(gelu_tanh(gate) * up)` in the compute dtype, times the f32 routing weight, rounded to the
//! compute dtype; a row's contributions are then summed in ascending expert id, rounding after every
//! add. Every backend must combine in exactly this order ([`combine`]) so outputs match bit for bit.

use switchyard_kernels::{DType, Product, Weight, linear_many_new, ops};

use crate::checkpoint::{Checkpoint, Tensor};
use crate::config::{ModelConfig, MoeConfig};
use crate::error::LoadError;

#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error("expert id {id} out of range for layer {layer} ({experts} experts)")]
    BadExpert { layer: usize, id: u32, experts: usize },
    #[error("layer {layer} has no MoE block")]
    NoMoe { layer: usize },
    #[error("expert workers for layer {layer} are unavailable: {reason}")]
    Unavailable { layer: usize, reason: String },
}

/// Runs one layer's routed experts.
///
/// Contract: `rows` is `[n, hidden]` (the `pre_feedforward_layernorm_2` output, exact in the compute
/// dtype); `ids` and `weights` are `[n, top_k]`. On success `out[n, hidden]` holds, per row, the
/// combined expert output described in the module docs. The call is stateless: a backend keeps nothing
/// per request, and the result for a row never depends on the other rows of the call.
pub trait ExpertBackend: Send + Sync {
    fn run(&self, layer: usize, rows: &[f32], n: usize, ids: &[u32], weights: &[f32], out: &mut [f32]) -> Result<(), ExpertError>;

    /// Called once at the start of every forward pass: a backend that follows a changing placement
    /// plan pins the plan here, so that a step that started on plan version v completes on v.
    fn begin_step(&self) {}

    /// Called when that forward pass ends (also when it fails).
    fn end_step(&self) {}
}

/// Combines per-slot contributions `contrib[n, k, hidden]` (already weighted and rounded) into
/// `out[n, hidden]`, in ascending expert id with a rounding after every add.
pub fn combine(contrib: &[f32], ids: &[u32], n: usize, k: usize, hidden: usize, dt: DType, out: &mut [f32]) {
    // Rows are independent: one task per row, each summing its slots serially.
    switchyard_kernels::pool::for_each_chunk_mut(&mut out[..n * hidden], hidden, &|r, o| {
        let mut slots: Vec<usize> = (0..k).collect();
        slots.sort_by_key(|&s| ids[r * k + s]);
        o.fill(0.0);
        for &s in &slots {
            let c = &contrib[(r * k + s) * hidden..(r * k + s + 1) * hidden];
            for (x, &y) in o.iter_mut().zip(c) {
                *x = dt.round(*x + y);
            }
        }
    });
}

/// One layer's stacked expert weights, `gate_up [E, 2I, H]` and `down [E, H, I]`, under the names
/// transformers writes (`experts.*`) or the older `moe.*`.
pub fn expert_tensors(
    ckpt: &Checkpoint,
    prefix: &str,
    c: &ModelConfig,
    moe: MoeConfig,
    layer: usize,
) -> Result<(Tensor, Tensor), LoadError> {
    let (h, e, i) = (c.hidden_size, moe.num_experts, moe.intermediate_size);
    let p = format!("{prefix}layers.{layer}.");
    let gate_up = ckpt.expect_any(&[format!("{p}experts.gate_up_proj"), format!("{p}moe.gate_up_proj")], &[e, 2 * i, h])?;
    let down = ckpt.expect_any(&[format!("{p}experts.down_proj"), format!("{p}moe.down_proj")], &[e, h, i])?;
    Ok((gate_up, down))
}

/// A model without an MoE block (not Gemma 4 26B, but a valid config).
pub struct NoExperts;

impl ExpertBackend for NoExperts {
    fn run(&self, layer: usize, _: &[f32], _: usize, _: &[u32], _: &[f32], _: &mut [f32]) -> Result<(), ExpertError> {
        Err(ExpertError::NoMoe { layer })
    }
}

/// All experts of all layers, computed in this process from the memory-mapped checkpoint.
pub struct LocalExperts {
    layers: Vec<LayerExperts>,
    hidden: usize,
    moe: MoeConfig,
}

struct LayerExperts {
    gate_up: Tensor, // [E, 2I, H]
    down: Tensor,    // [E, H, I]
}

impl LocalExperts {
    pub fn load(ckpt: &Checkpoint, prefix: &str, c: &ModelConfig, moe: MoeConfig) -> Result<LocalExperts, LoadError> {
        let layers = (0..c.num_layers)
            .map(|l| {
                let (gate_up, down) = expert_tensors(ckpt, prefix, c, moe, l)?;
                Ok(LayerExperts { gate_up: gate_up.packed(), down: down.packed() })
            })
            .collect::<Result<_, LoadError>>()?;
        Ok(LocalExperts { layers, hidden: c.hidden_size, moe })
    }

    pub fn dtype(&self) -> DType {
        self.layers.first().map(|l| l.gate_up.dtype).unwrap_or(DType::F32)
    }
}

/// The two weights of one expert, as linear layers.
pub struct ExpertWeights<'a> {
    /// `[2 * intermediate, hidden]`: gate rows then up rows.
    pub gate_up: Weight<'a>,
    /// `[hidden, intermediate]`.
    pub down: Weight<'a>,
}

/// Per-pair expert outputs `y = down(gelu_tanh(gate) * up)` (before the routing weight), grouped by
/// expert: pair `p`'s row is at [`ExpertOutputs::y`].
pub struct ExpertOutputs {
    ys: Vec<Vec<f32>>,
    place: Vec<(usize, usize)>,
    hidden: usize,
}

impl ExpertOutputs {
    pub fn y(&self, pair: usize) -> &[f32] {
        let (ai, j) = self.place[pair];
        &self.ys[ai][j * self.hidden..(j + 1) * self.hidden]
    }
}

/// Computes every pair's expert output: pair `p` applies expert `pair_expert[p]` to row
/// `pair_row[p]` of `rows` (`[_, hidden]`). Experts run in ascending id, all GEMMs of a stage in one
/// parallel region; each row's result depends only on that row (batch-invariant kernels).
pub fn expert_outputs<'w>(
    weights: &dyn Fn(usize) -> ExpertWeights<'w>,
    rows: &[f32],
    pair_row: &[usize],
    pair_expert: &[u32],
    num_experts: usize,
    dt: DType,
) -> ExpertOutputs {
    let Some(first) = pair_expert.first() else { return ExpertOutputs { ys: Vec::new(), place: Vec::new(), hidden: 0 } };
    let probe = weights(*first as usize);
    let (h, inter) = (probe.down.rows, probe.down.cols);
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); num_experts];
    for (pair, &id) in pair_expert.iter().enumerate() {
        by_expert[id as usize].push(pair);
    }
    let active: Vec<usize> = (0..num_experts).filter(|&x| !by_expert[x].is_empty()).collect();
    // Each active expert's rows of `rows`: the kernels' packing pass reads them in place (a prefill's
    // copy of them, four times the batch, was a pass of its own).
    let expert_rows: Vec<Vec<usize>> = active.iter().map(|&x| by_expert[x].iter().map(|&p| pair_row[p]).collect()).collect();
    let ws: Vec<ExpertWeights<'w>> = active.iter().map(|&x| weights(x)).collect();
    // gate_up for every active expert in one parallel region, then the activation, then down.
    let products: Vec<Product<'_>> = expert_rows.iter().zip(&ws).map(|(r, w)| Product::gathered(rows, r, w.gate_up)).collect();
    let gu: Vec<Vec<f32>> = linear_many_new(&products, dt);
    // The activation of every (expert, row) pair, in one parallel pass.
    let offsets: Vec<usize> = gu.iter().scan(0, |acc, g| Some(std::mem::replace(acc, *acc + g.len() / 2))).collect();
    let total: usize = gu.iter().map(|g| g.len() / 2).sum();
    let row_expert: Vec<usize> = gu.iter().enumerate().flat_map(|(ai, g)| std::iter::repeat_n(ai, g.len() / (2 * inter))).collect();
    let act = switchyard_kernels::pool::build_chunks(total, inter, 4096, &|r, arow| {
        let ai = row_expert[r];
        let j = r - offsets[ai] / inter;
        let grow = &gu[ai][j * 2 * inter..(j + 1) * 2 * inter];
        ops::gelu_gate_up(&grow[..inter], &grow[inter..], dt, arow);
    });
    let acts: Vec<&[f32]> = offsets.iter().zip(&gu).map(|(&o, g)| &act[o..o + g.len() / 2]).collect();
    let products: Vec<Product<'_>> =
        active.iter().zip(&acts).zip(&ws).map(|((&x, &a), w)| Product::new(a, by_expert[x].len(), w.down)).collect();
    let ys: Vec<Vec<f32>> = linear_many_new(&products, dt);
    // Where each pair's output is: (active expert index, row within that expert).
    let mut place = vec![(0usize, 0usize); pair_expert.len()];
    for (ai, &x) in active.iter().enumerate() {
        for (j, &pair) in by_expert[x].iter().enumerate() {
            place[pair] = (ai, j);
        }
    }
    ExpertOutputs { ys, place, hidden: h }
}

/// Each pair's weighted contribution `round(y * w)` into `out[pairs, hidden]` (what an expert worker
/// returns; [`combine`] then sums them exactly as the fused local path does).
pub fn weighted_contributions(y: &ExpertOutputs, weights: &[f32], dt: DType, out: &mut [f32]) {
    let h = y.hidden;
    if h == 0 {
        return;
    }
    switchyard_kernels::pool::for_each_chunk_mut(&mut out[..weights.len() * h], h, &|p, o| {
        let w = weights[p];
        for (x, &v) in o.iter_mut().zip(y.y(p)) {
            *x = dt.round(v * w);
        }
    });
}

impl ExpertBackend for LocalExperts {
    fn run(&self, layer: usize, rows: &[f32], n: usize, ids: &[u32], weights: &[f32], out: &mut [f32]) -> Result<(), ExpertError> {
        let (h, k, e) = (self.hidden, self.moe.top_k, self.moe.num_experts);
        let l = self.layers.get(layer).ok_or(ExpertError::NoMoe { layer })?;
        let dt = self.dtype();
        if let Some(&bad) = ids[..n * k].iter().find(|&&id| id as usize >= e) {
            return Err(ExpertError::BadExpert { layer, id: bad, experts: e });
        }
        let pair_row: Vec<usize> = (0..n * k).map(|p| p / k).collect();
        let w = |x: usize| ExpertWeights { gate_up: l.gate_up.weight_at(x), down: l.down.weight_at(x) };
        let y = expert_outputs(&w, rows, &pair_row, &ids[..n * k], e, dt);
        // The combine, fused with the routing weights: the same arithmetic as `combine` over
        // `round(y * w)` contributions, without materialising them.
        switchyard_kernels::pool::for_each_chunk_mut(&mut out[..n * h], h, &|r, o| {
            let mut slots: Vec<usize> = (0..k).collect();
            slots.sort_by_key(|&s| ids[r * k + s]);
            o.fill(0.0);
            for s in slots {
                let pair = r * k + s;
                let (w, y) = (weights[pair], &y.y(pair)[..o.len()]);
                // An index loop: LLVM compiled a `zip` of these apart from the AVX-512 body, and so scalar.
                switchyard_kernels::vectorized!({
                    switchyard_kernels::with_rounding!(dt, |round| {
                        for i in 0..o.len() {
                            o[i] = round(o[i] + round(y[i] * w));
                        }
                    })
                });
            }
        });
        Ok(())
    }
}

//! Self-attention of one layer: q/k/v projections, per-head q/k norms and weightless v norm, RoPE
//! (default on sliding layers, proportional on full ones), V = k_proj output on full layers with
//! `attention_k_eq_v`, scale 1.0, causal mask limited to `sliding_window` keys on sliding layers.

use switchyard_kernels::attention::{attend_group, attend_queries};
use switchyard_kernels::{DType, Product, linear_many_new, linear_new, ops};

use super::RowInfo;
use crate::checkpoint::{Checkpoint, Tensor};
use crate::config::{LayerKind, LayerSpec, ModelConfig};
use crate::error::LoadError;
use crate::kv_cache::KvStore;

/// Rows of a prompt per attention task: their queries share each key's load and widening (two rows
/// of a sliding layer's two-query groups fill the AVX-512 kernel's four).
const PREFILL_ROWS: usize = 4;

pub struct Attention {
    layer: usize,
    spec: LayerSpec,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Option<Tensor>,
    o_proj: Tensor,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
}

impl Attention {
    pub fn load(ckpt: &Checkpoint, p: &str, c: &ModelConfig, layer: usize) -> Result<Attention, LoadError> {
        let spec = c.layers[layer].clone();
        let (h, hd, nq, nkv) = (c.hidden_size, spec.head_dim, c.num_heads, spec.num_kv_heads);
        let v_proj = if spec.k_eq_v { None } else { Some(ckpt.expect(&format!("{p}self_attn.v_proj.weight"), &[nkv * hd, h])?.packed()) };
        Ok(Attention {
            layer,
            q_proj: ckpt.expect(&format!("{p}self_attn.q_proj.weight"), &[nq * hd, h])?.packed(),
            k_proj: ckpt.expect(&format!("{p}self_attn.k_proj.weight"), &[nkv * hd, h])?.packed(),
            v_proj,
            o_proj: ckpt.expect(&format!("{p}self_attn.o_proj.weight"), &[h, nq * hd])?.packed(),
            q_norm: ckpt.expect(&format!("{p}self_attn.q_norm.weight"), &[hd])?.to_f32(),
            k_norm: ckpt.expect(&format!("{p}self_attn.k_norm.weight"), &[hd])?.to_f32(),
            spec,
        })
    }

    /// `h` is the normed input `[T, hidden]`; returns the o_proj output `[T, hidden]`.
    pub(crate) fn forward(&self, h: &[f32], rows: &[RowInfo], kv: &mut dyn KvStore, c: &ModelConfig, dt: DType) -> Vec<f32> {
        let t = rows.len();
        let (hd, nq, nkv) = (self.spec.head_dim, c.num_heads, self.spec.num_kv_heads);
        let mut products = vec![Product::new(h, t, self.q_proj.weight()), Product::new(h, t, self.k_proj.weight())];
        if let Some(vp) = &self.v_proj {
            products.push(Product::new(h, t, vp.weight()));
        }
        let mut outs = linear_many_new(&products, dt).into_iter();
        let (mut q, mut k) = (outs.next().expect("q"), outs.next().expect("k"));
        // attention_k_eq_v: without v_proj, V is the raw k_proj output.
        let mut v = outs.next().unwrap_or_else(|| k.clone());
        let eps = c.rms_norm_eps;
        ops::rms_norm_chunks(&mut q, hd, Some(&self.q_norm), eps, dt);
        ops::rms_norm_chunks(&mut k, hd, Some(&self.k_norm), eps, dt);
        ops::rms_norm_chunks(&mut v, hd, None, eps, dt);
        // RoPE: each row's cos/sin once (in parallel for prefill-sized batches), then q and k by row.
        let rope = &self.spec.rope;
        let half = rope.cos_sin(0, dt).0.len();
        let mut table = vec![0f32; t * 2 * half];
        switchyard_kernels::pool::for_each_chunk_mut(&mut table, 2 * half, &|r, cs| {
            let (cos, sin) = rope.cos_sin(rows[r].pos, dt);
            cs[..half].copy_from_slice(&cos);
            cs[half..].copy_from_slice(&sin);
        });
        for (x, width) in [(&mut q, nq * hd), (&mut k, nkv * hd)] {
            switchyard_kernels::pool::for_each_chunk_mut(x, width, &|r, row| {
                let cs = &table[r * 2 * half..(r + 1) * 2 * half];
                rope.apply(row, &cs[..half], &cs[half..], dt);
            });
        }
        for (r, info) in rows.iter().enumerate() {
            let kv_range = r * nkv * hd..(r + 1) * nkv * hd;
            kv.write(info.chunk, self.layer, info.pos, &k[kv_range.clone()], &v[kv_range]);
        }
        let kv: &dyn KvStore = kv;
        let group = nq / nkv;
        let window = match self.spec.kind {
            LayerKind::Sliding => c.sliding_window,
            LayerKind::Full => usize::MAX,
        };
        let threads = switchyard_kernels::pool::global().threads();
        let attn = if t >= PREFILL_ROWS * 4 * threads {
            // A prompt's rows: one task per PREFILL_ROWS rows, their queries against each KV head
            // together (consecutive rows of one sequence read the same keys, each up to its own
            // position; every query gets the bits it would alone).
            let mut attn = switchyard_kernels::pool::parallel_rows(t.div_ceil(PREFILL_ROWS), PREFILL_ROWS * nq * hd, &|task, out| {
                let r0 = task * PREFILL_ROWS;
                let r1 = (r0 + PREFILL_ROWS).min(t);
                let mut a = r0;
                while a < r1 {
                    // Rows a..b: one sequence, one first key.
                    let (chunk, from) = (rows[a].chunk, (rows[a].pos + 1).saturating_sub(window));
                    let mut b = a + 1;
                    while b < r1 && rows[b].chunk == chunk && (rows[b].pos + 1).saturating_sub(window) == from {
                        b += 1;
                    }
                    let view = kv.view(chunk, self.layer);
                    let to = |r: usize| if window == usize::MAX { rows[r].pos + 1 } else { rows[r].sees_to };
                    let ns: Vec<usize> = (a..b).flat_map(|r| std::iter::repeat_n(to(r) - from, group)).collect();
                    let mut scores = Vec::new();
                    for kvh in 0..nkv {
                        let heads = kvh * group..(kvh + 1) * group;
                        let qs: Vec<&[f32]> =
                            (a..b).flat_map(|r| heads.clone().map(move |h| (r * nq + h) * hd)).map(|o| &q[o..o + hd]).collect();
                        let mut outs: Vec<&mut [f32]> = out
                            .chunks_exact_mut(hd)
                            .enumerate()
                            .filter(|(i, _)| (a - r0..b - r0).contains(&(i / nq)) && heads.contains(&(i % nq)))
                            .map(|(_, o)| o)
                            .collect();
                        let at = |j: usize| view.offset(from + j, kvh);
                        // The first KV head's pass hints the others' rows of each position into L2
                        // (a position's KV heads sit side by side), so their passes find them there.
                        let next = if kvh == 0 { (nkv - 1) * hd } else { 0 };
                        crate::with_kv_slices!(view.data, |ks, vs| attend_queries(
                            &qs,
                            &ns,
                            |j| &ks[at(j)..at(j) + hd],
                            |j| &vs[at(j)..at(j) + hd],
                            next,
                            1.0,
                            dt,
                            &mut scores,
                            &mut outs
                        ));
                    }
                    a = b;
                }
            });
            attn.truncate(t * nq * hd);
            attn
        } else {
            // One task per row when there are enough rows to keep the pool's threads busy: its KV
            // heads one after another on one core, so each head finds in that core's L2 the lines
            // the previous heads' reads brought in with theirs (a position's KV heads sit side by
            // side). Else one task per (row, KV head), or per (row, head) when even that leaves too
            // few tasks (a batch-1 decode on a layer with few KV heads). A head group's queries go
            // against their keys together, each with the bits it would get alone. Output is
            // [T, heads, head_dim] either way.
            let per_task = if t >= 2 * threads {
                nq
            } else if t * nkv >= 2 * threads {
                group
            } else {
                1
            };
            switchyard_kernels::pool::parallel_rows(t * nq / per_task, per_task * hd, &|task, out| {
                let (r, first) = (task * per_task / nq, task * per_task % nq);
                let info = rows[r];
                let view = kv.view(info.chunk, self.layer);
                // Sliding layers: causal, or within the row's own image; either way `kv > pos - window`.
                let from = (info.pos + 1).saturating_sub(window);
                let to = if window == usize::MAX { info.pos + 1 } else { info.sees_to };
                let mut scores = Vec::with_capacity(per_task.min(group) * (to - from));
                let mut head = first;
                let last_kvh = (first + per_task - 1) / group;
                while head < first + per_task {
                    // This task's heads of one KV head's group.
                    let kvh = head / group;
                    let heads = ((kvh + 1) * group).min(first + per_task) - head;
                    let qg = &q[(r * nq + head) * hd..(r * nq + head + heads) * hd];
                    let o = &mut out[(head - first) * hd..(head - first + heads) * hd];
                    let at = |j: usize| view.offset(from + j, kvh);
                    // The task's first KV head hints the rows of its others (as in prefill above).
                    let next = if head == first { (last_kvh - kvh) * hd } else { 0 };
                    crate::with_kv_slices!(view.data, |ks, vs| attend_group(
                        qg,
                        heads,
                        to - from,
                        |j| &ks[at(j)..at(j) + hd],
                        |j| &vs[at(j)..at(j) + hd],
                        next,
                        1.0,
                        dt,
                        &mut scores,
                        o
                    ));
                    head += heads;
                }
            })
        };
        linear_new(&attn, t, self.o_proj.weight(), dt)
    }
}

//! Gemma 4's vision tower and multimodal embedder (transformers' `Gemma4VisionModel` and
//! `Gemma4MultimodalEmbedder`): patches to soft-token embeddings in the text model's space.
//!
//! ```text
//! h = input_proj(2 * (pixels/255 - 0.5)) + pos_x[x] + pos_y[y]
//! layers: bidirectional attention over the image's patches (q/k norms, weightless v norm, 2-D RoPE:
//!         first half of each head rotated by x, second half by y), sandwich norms, gelu-tanh MLP
//! pool 3x3 (f32) * sqrt(hidden), standardise (f32), cast; RMSNorm without scale, project to text hidden
//! ```
//!
//! Only the image's own patches are computed (transformers pads to the budget and masks the padding;
//! masked keys and zeroed rows contribute nothing, so the result is the same).

use serde_json::Value;
use switchyard_kernels::{DType, LinearJob, attention::attend, linear, linear_many, ops};

use crate::checkpoint::{Checkpoint, Tensor};
use crate::error::LoadError;
use switchyard_engine_api::Patches;
use switchyard_engine_api::image::{PATCH, POOL};

/// `vision_config` of config.json.
#[derive(Clone, Debug)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub position_embedding_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub standardize: bool,
    /// The default budget (`default_output_length`).
    pub default_soft_tokens: usize,
}

impl VisionConfig {
    /// Reads `vision_config`; `None` when the checkpoint has no vision tower.
    pub fn from_config_json(config: &Value) -> Result<Option<VisionConfig>, LoadError> {
        let Some(v) = config.get("vision_config").filter(|v| v.is_object()) else { return Ok(None) };
        let bad = |k: &str| LoadError::Config(format!("vision_config.{k} is missing or not a number"));
        let n = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize).ok_or_else(|| bad(k));
        let patch = n("patch_size")?;
        let pool = v.get("pooling_kernel_size").and_then(Value::as_u64).unwrap_or(3) as usize;
        if patch != PATCH || pool != POOL {
            return Err(LoadError::Config(format!("vision patch {patch} / pooling {pool} (only 16 / 3 are supported)")));
        }
        let heads = n("num_attention_heads")?;
        let hidden = n("hidden_size")?;
        Ok(Some(VisionConfig {
            hidden_size: hidden,
            intermediate_size: n("intermediate_size")?,
            num_layers: n("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: v.get("num_key_value_heads").and_then(Value::as_u64).map_or(heads, |x| x as usize),
            head_dim: v.get("head_dim").and_then(Value::as_u64).map_or(hidden / heads, |x| x as usize),
            position_embedding_size: n("position_embedding_size")?,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            rope_theta: v.pointer("/rope_parameters/rope_theta").and_then(Value::as_f64).unwrap_or(100.0),
            standardize: v.get("standardize").and_then(Value::as_bool).unwrap_or(false),
            default_soft_tokens: v.get("default_output_length").and_then(Value::as_u64).unwrap_or(280) as usize,
        }))
    }
}

/// A linear layer with transformers' optional input/output clamps (`use_clipped_linears`).
struct Clipped {
    w: Tensor,
    clamp_in: Option<(f32, f32)>,
    clamp_out: Option<(f32, f32)>,
}

impl Clipped {
    fn load(ckpt: &Checkpoint, p: &str, out: usize, inp: usize) -> Result<Clipped, LoadError> {
        let w = ckpt.expect_any(&[format!("{p}.linear.weight"), format!("{p}.weight")], &[out, inp])?.packed();
        let scalar = |n: &str| ckpt.get(&format!("{p}.{n}")).map(|t| t.to_f32()[0]);
        let pair = |a: &str, b: &str| match (scalar(a), scalar(b)) {
            (Some(lo), Some(hi)) if lo.is_finite() || hi.is_finite() => Some((lo, hi)),
            _ => None,
        };
        Ok(Clipped { w, clamp_in: pair("input_min", "input_max"), clamp_out: pair("output_min", "output_max") })
    }

    fn clamp(x: &mut [f32], r: Option<(f32, f32)>) {
        if let Some((lo, hi)) = r {
            x.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
        }
    }
}

struct Layer {
    q: Clipped,
    k: Clipped,
    v: Clipped,
    o: Clipped,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    input_norm: Vec<f32>,
    post_attn_norm: Vec<f32>,
    pre_ff_norm: Vec<f32>,
    post_ff_norm: Vec<f32>,
    gate: Clipped,
    up: Clipped,
    down: Clipped,
}

pub struct VisionTower {
    pub config: VisionConfig,
    dt: DType,
    input_proj: Tensor,
    /// `[2, position_embedding_size, hidden]`: x table then y table.
    pos_table: Vec<f32>,
    layers: Vec<Layer>,
    std_bias: Vec<f32>,
    std_scale: Vec<f32>,
    projection: Tensor,
    text_hidden: usize,
    rope: ops::Rope,
}

impl VisionTower {
    /// Loads `model.vision_tower.*` and `model.embed_vision.*`.
    pub fn load(ckpt: &Checkpoint, config: VisionConfig, text_hidden: usize) -> Result<VisionTower, LoadError> {
        let c = &config;
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let p = "model.vision_tower.";
        let input_proj = ckpt.expect(&format!("{p}patch_embedder.input_proj.weight"), &[h, 3 * PATCH * PATCH])?;
        let dt = input_proj.dtype;
        let norm = |n: &str, d: usize| ckpt.expect(n, &[d]).map(|t| t.to_f32());
        let layers = (0..c.num_layers)
            .map(|l| {
                let q = format!("{p}encoder.layers.{l}.");
                Ok(Layer {
                    q: Clipped::load(ckpt, &format!("{q}self_attn.q_proj"), c.num_heads * hd, h)?,
                    k: Clipped::load(ckpt, &format!("{q}self_attn.k_proj"), c.num_kv_heads * hd, h)?,
                    v: Clipped::load(ckpt, &format!("{q}self_attn.v_proj"), c.num_kv_heads * hd, h)?,
                    o: Clipped::load(ckpt, &format!("{q}self_attn.o_proj"), h, c.num_heads * hd)?,
                    q_norm: norm(&format!("{q}self_attn.q_norm.weight"), hd)?,
                    k_norm: norm(&format!("{q}self_attn.k_norm.weight"), hd)?,
                    input_norm: norm(&format!("{q}input_layernorm.weight"), h)?,
                    post_attn_norm: norm(&format!("{q}post_attention_layernorm.weight"), h)?,
                    pre_ff_norm: norm(&format!("{q}pre_feedforward_layernorm.weight"), h)?,
                    post_ff_norm: norm(&format!("{q}post_feedforward_layernorm.weight"), h)?,
                    gate: Clipped::load(ckpt, &format!("{q}mlp.gate_proj"), i, h)?,
                    up: Clipped::load(ckpt, &format!("{q}mlp.up_proj"), i, h)?,
                    down: Clipped::load(ckpt, &format!("{q}mlp.down_proj"), h, i)?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let (std_bias, std_scale) =
            if c.standardize { (norm(&format!("{p}std_bias"), h)?, norm(&format!("{p}std_scale"), h)?) } else { (Vec::new(), Vec::new()) };
        Ok(VisionTower {
            pos_table: ckpt.expect(&format!("{p}patch_embedder.position_embedding_table"), &[2, c.position_embedding_size, h])?.to_f32(),
            input_proj: input_proj.packed(),
            layers,
            std_bias,
            std_scale,
            projection: ckpt.expect("model.embed_vision.embedding_projection.weight", &[text_hidden, h])?.packed(),
            text_hidden,
            rope: ops::Rope::default(c.rope_theta, hd / 2),
            dt,
            config,
        })
    }

    /// The soft-token embeddings of one image: `[soft_tokens, text_hidden]`, row-major over the pooled
    /// grid.
    pub fn encode(&self, img: &Patches) -> Result<Vec<f32>, String> {
        Ok(self.stages(img)?.pop().unwrap_or_default())
    }

    /// Every stage's output, for checking against transformers: patch embeddings, encoder output,
    /// pooled and scaled, standardised, projected.
    pub fn stages(&self, img: &Patches) -> Result<Vec<Vec<f32>>, String> {
        let mut stages = Vec::new();
        let c = &self.config;
        let (n, h, dt) = (img.len(), c.hidden_size, self.dt);
        if img.cols > c.position_embedding_size || img.rows > c.position_embedding_size {
            return Err(format!("a {}x{} patch grid is beyond the position table ({})", img.rows, img.cols, c.position_embedding_size));
        }
        let px: Vec<f32> = img.pixels.iter().map(|&b| dt.round(2.0 * (b as f32 / 255.0 - 0.5))).collect();
        let mut x = vec![0f32; n * h];
        linear(&px, n, self.input_proj.weight(), &mut x, dt);
        let pe = c.position_embedding_size * h;
        for (i, row) in x.chunks_exact_mut(h).enumerate() {
            let (px_, py) = img.position(i);
            let (ex, ey) = (&self.pos_table[px_ * h..(px_ + 1) * h], &self.pos_table[pe + py * h..pe + (py + 1) * h]);
            for ((v, a), b) in row.iter_mut().zip(ex).zip(ey) {
                *v = dt.round(*v + dt.round(a + b));
            }
        }
        stages.push(x.clone());
        // 2-D RoPE tables per patch: x angles for the first half of each head, y for the second.
        let half = self.rope.inv_freq.len();
        let cs: Vec<[Vec<f32>; 4]> = (0..n)
            .map(|i| {
                let (px_, py) = img.position(i);
                let (cx, sx) = self.rope.cos_sin(px_, dt);
                let (cy, sy) = self.rope.cos_sin(py, dt);
                [cx, sx, cy, sy]
            })
            .collect();
        for l in &self.layers {
            let mut a = x.clone();
            ops::rms_norm_chunks(&mut a, h, Some(&l.input_norm), c.rms_norm_eps, dt);
            let o = self.attention(l, &a, n, &cs, half);
            let mut o = o;
            ops::rms_norm_chunks(&mut o, h, Some(&l.post_attn_norm), c.rms_norm_eps, dt);
            ops::add_assign(&mut x, &o, dt);
            let mut m = x.clone();
            ops::rms_norm_chunks(&mut m, h, Some(&l.pre_ff_norm), c.rms_norm_eps, dt);
            let mut f = self.mlp(l, &m, n);
            ops::rms_norm_chunks(&mut f, h, Some(&l.post_ff_norm), c.rms_norm_eps, dt);
            ops::add_assign(&mut x, &f, dt);
        }
        stages.push(x.clone());
        // Pool 3x3 blocks in f32 (row-major over the pooled grid), scale by sqrt(hidden), standardise.
        let (pr, pc) = (img.rows / POOL, img.cols / POOL);
        let root = (h as f32).sqrt();
        let mut pooled = vec![0f32; pr * pc * h];
        for i in 0..n {
            let (px_, py) = img.position(i);
            let slot = (px_ / POOL) + pc * (py / POOL);
            let dst = &mut pooled[slot * h..(slot + 1) * h];
            for (d, v) in dst.iter_mut().zip(&x[i * h..(i + 1) * h]) {
                *d += v / (POOL * POOL) as f32;
            }
        }
        pooled.iter_mut().for_each(|v| *v *= root);
        stages.push(pooled.clone());
        for row in pooled.chunks_exact_mut(h) {
            for (j, v) in row.iter_mut().enumerate() {
                let mut s = *v;
                if c.standardize {
                    s = (s - self.std_bias[j]) * self.std_scale[j];
                }
                *v = dt.round(s);
            }
        }
        stages.push(pooled.clone());
        // The multimodal embedder: RMSNorm without scale, then the projection to the text width.
        ops::rms_norm_chunks(&mut pooled, h, None, c.rms_norm_eps, dt);
        let soft = pr * pc;
        let mut out = vec![0f32; soft * self.text_hidden];
        linear(&pooled, soft, self.projection.weight(), &mut out, dt);
        stages.push(out);
        Ok(stages)
    }

    fn attention(&self, l: &Layer, a: &[f32], n: usize, cs: &[[Vec<f32>; 4]], half: usize) -> Vec<f32> {
        let c = &self.config;
        let (hd, nq, nkv, dt) = (c.head_dim, c.num_heads, c.num_kv_heads, self.dt);
        let (qa, ka, va) = (clamped(a, l.q.clamp_in), clamped(a, l.k.clamp_in), clamped(a, l.v.clamp_in));
        let (mut q, mut k, mut v) = (vec![0f32; n * nq * hd], vec![0f32; n * nkv * hd], vec![0f32; n * nkv * hd]);
        linear_many(
            &mut [
                LinearJob { x: &qa, m: n, w: l.q.w.weight(), out: &mut q },
                LinearJob { x: &ka, m: n, w: l.k.w.weight(), out: &mut k },
                LinearJob { x: &va, m: n, w: l.v.w.weight(), out: &mut v },
            ],
            dt,
        );
        Clipped::clamp(&mut q, l.q.clamp_out);
        Clipped::clamp(&mut k, l.k.clamp_out);
        Clipped::clamp(&mut v, l.v.clamp_out);
        ops::rms_norm_chunks(&mut q, hd, Some(&l.q_norm), c.rms_norm_eps, dt);
        ops::rms_norm_chunks(&mut k, hd, Some(&l.k_norm), c.rms_norm_eps, dt);
        ops::rms_norm_chunks(&mut v, hd, None, c.rms_norm_eps, dt);
        for (x, heads) in [(&mut q, nq), (&mut k, nkv)] {
            for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
                let [cx, sx, cy, sy] = &cs[i];
                for head in row.chunks_exact_mut(hd) {
                    let (first, second) = head.split_at_mut(2 * half);
                    self.rope.apply(first, cx, sx, dt);
                    self.rope.apply(second, cy, sy, dt);
                }
            }
        }
        let group = nq / nkv;
        let attn = switchyard_kernels::pool::parallel_rows(n * nq, hd, &|task, out| {
            let (r, head) = (task / nq, task % nq);
            let kvh = head / group;
            let qh = &q[(r * nq + head) * hd..(r * nq + head + 1) * hd];
            let mut scores = Vec::with_capacity(n);
            attend(
                qh,
                n,
                |j| &k[(j * nkv + kvh) * hd..(j * nkv + kvh + 1) * hd],
                |j| &v[(j * nkv + kvh) * hd..(j * nkv + kvh + 1) * hd],
                1.0,
                dt,
                &mut scores,
                out,
            );
        });
        let attn = clamped(&attn, l.o.clamp_in);
        let mut o = vec![0f32; n * c.hidden_size];
        linear(&attn, n, l.o.w.weight(), &mut o, dt);
        Clipped::clamp(&mut o, l.o.clamp_out);
        o
    }

    fn mlp(&self, l: &Layer, m: &[f32], n: usize) -> Vec<f32> {
        let (i, dt) = (self.config.intermediate_size, self.dt);
        let (mut g, mut u) = (vec![0f32; n * i], vec![0f32; n * i]);
        let (mg, mu) = (clamped(m, l.gate.clamp_in), clamped(m, l.up.clamp_in));
        linear_many(
            &mut [
                LinearJob { x: &mg, m: n, w: l.gate.w.weight(), out: &mut g },
                LinearJob { x: &mu, m: n, w: l.up.w.weight(), out: &mut u },
            ],
            dt,
        );
        Clipped::clamp(&mut g, l.gate.clamp_out);
        Clipped::clamp(&mut u, l.up.clamp_out);
        let act = ops::gelu_mul_new(&g, &u, dt);
        let act = clamped(&act, l.down.clamp_in);
        let mut out = vec![0f32; n * self.config.hidden_size];
        linear(&act, n, l.down.w.weight(), &mut out, dt);
        Clipped::clamp(&mut out, l.down.clamp_out);
        out
    }
}

/// `x` clamped to `r` (borrowed when there is no clamp).
fn clamped(x: &[f32], r: Option<(f32, f32)>) -> std::borrow::Cow<'_, [f32]> {
    match r {
        None => std::borrow::Cow::Borrowed(x),
        Some(_) => {
            let mut y = x.to_vec();
            Clipped::clamp(&mut y, r);
            std::borrow::Cow::Owned(y)
        }
    }
}

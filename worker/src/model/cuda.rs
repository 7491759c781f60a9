//! The text model on a GPU: the same layers as [`super::Gemma4Model`], each step through the CUDA
//! kernels (`switchyard_kernels::cuda`), weights and the paged KV pools in device memory.
//!
//! This first runner serves `switchyard generate --device cuda` and `switchyard bench --device cuda`:
//! a fixed number of sequences, each with its own run of KV blocks (`max_len` positions). The engine
//! (continuous batching, the prefix cache, `serve`) does not run on it yet; docs/gpu.md says what is
//! built. The order of operations and the rounding points are those of the CPU model, layer by layer
//! (layer.rs, attention.rs, mlp.rs, router.rs, experts.rs, lm_head.rs), which stays the reference.

use cudarc::driver::CudaSlice;
use switchyard_kernels::DType;
use switchyard_kernels::cuda::{DevWeight, Device, KvKind, KvPool, StepRows};

use super::LogitsFor;
use crate::checkpoint::Checkpoint;
use crate::config::{LayerKind, LayerSpec, ModelConfig};
use crate::error::LoadError;

type Buf = CudaSlice<f32>;

/// A CUDA error, or a load error, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CudaModelError {
    #[error("CUDA: {0}")]
    Device(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Request(String),
}

impl From<String> for CudaModelError {
    fn from(s: String) -> Self {
        CudaModelError::Device(s)
    }
}

type Result<T> = std::result::Result<T, CudaModelError>;

struct Moe {
    router_proj: DevWeight,
    router_scale: Buf,
    per_expert_scale: Buf,
    pre_ff_ln_2: Buf,
    post_ff_ln_1: Buf,
    post_ff_ln_2: Buf,
    gate_up: DevWeight,
    down: DevWeight,
}

struct Layer {
    spec: LayerSpec,
    input_ln: Buf,
    post_attn_ln: Buf,
    pre_ff_ln: Buf,
    post_ff_ln: Buf,
    q_proj: DevWeight,
    k_proj: DevWeight,
    v_proj: Option<DevWeight>,
    o_proj: DevWeight,
    q_norm: Buf,
    k_norm: Buf,
    inv_freq: Buf,
    gate: DevWeight,
    up: DevWeight,
    down: DevWeight,
    moe: Option<Moe>,
    layer_scalar: f32,
}

/// One sequence's share of a step: `tokens` at positions `start..start + tokens.len()` of sequence
/// `seq` (`0..max_seqs`).
pub struct SeqChunk<'a> {
    pub seq: usize,
    pub start: usize,
    pub tokens: &'a [u32],
    pub logits: LogitsFor,
}

pub struct CudaModel {
    pub config: ModelConfig,
    pub dtype: DType,
    pub dev: Device,
    embed: DevWeight,
    embed_scale: f32,
    final_norm: Buf,
    layers: Vec<Layer>,
    /// One KV pool per layer (empty until allocated).
    pools: Vec<KvPool>,
    block_size: usize,
    /// For [`CudaModel::forward`]: how many sequences, and how many blocks each owns.
    per_seq: Option<(usize, usize)>,
    /// Bytes of weights on the device.
    pub weight_bytes: usize,
    /// Bytes of the KV pools.
    pub kv_bytes: usize,
}

const BLOCK: usize = 16;

impl CudaModel {
    /// Opens the GPU, copies the text model's weights to it and allocates KV pools for `max_seqs`
    /// sequences of up to `max_len` positions, stored as `kv` (for [`CudaModel::forward`]).
    pub fn load(config: ModelConfig, ckpt: &Checkpoint, max_seqs: usize, max_len: usize, kv: KvKind) -> Result<CudaModel> {
        let mut m = CudaModel::load_weights(config, ckpt)?;
        let blocks_per_seq = max_len.div_ceil(BLOCK).max(1);
        m.alloc_pools([max_seqs * blocks_per_seq; 2], BLOCK, kv)?;
        m.per_seq = Some((max_seqs, blocks_per_seq));
        Ok(m)
    }

    /// Allocates one KV pool per layer: `blocks[0]` blocks for sliding layers, `blocks[1]` for full
    /// ones, of `block_size` positions.
    pub fn alloc_pools(&mut self, blocks: [usize; 2], block_size: usize, kv: KvKind) -> Result<()> {
        self.pools.clear();
        self.kv_bytes = 0;
        for spec in &self.config.layers {
            let n = match spec.kind {
                LayerKind::Sliding => blocks[0],
                LayerKind::Full => blocks[1],
            };
            let pool = self.dev.kv_pool(kv, n, block_size, spec.num_kv_heads, spec.head_dim)?;
            self.kv_bytes += pool.bytes();
            self.pools.push(pool);
        }
        self.block_size = block_size;
        Ok(())
    }

    /// Opens the GPU and copies the text model's weights to it; no KV pools yet.
    pub fn load_weights(config: ModelConfig, ckpt: &Checkpoint) -> Result<CudaModel> {
        let dev = Device::open()?;
        let p = ckpt.text_prefix();
        let (h, nq) = (config.hidden_size, config.num_heads);
        let bytes = std::cell::Cell::new(0usize);
        let weight = |name: &str, rows: usize, cols: usize| -> Result<DevWeight> {
            let t = ckpt.expect(name, &[rows, cols])?;
            let w = dev.weight(t.dtype, t.bytes(), 1, rows, cols)?;
            bytes.set(bytes.get() + w.bytes());
            Ok(w)
        };
        let embed = weight(&format!("{p}embed_tokens.weight"), config.vocab_size, h)?;
        let dtype = embed.dtype;
        let vecf = |name: &str, n: usize| -> Result<Buf> { Ok(dev.upload(&ckpt.expect(name, &[n])?.to_f32())?) };
        let mut layers = Vec::with_capacity(config.num_layers);
        for (i, spec) in config.layers.iter().enumerate() {
            let l = format!("{p}layers.{i}.");
            let (hd, nkv) = (spec.head_dim, spec.num_kv_heads);
            let moe = match config.moe {
                Some(m) => {
                    let e = m.num_experts;
                    let first = |names: [String; 3], n: usize| -> Result<Buf> {
                        let t = ckpt.expect_any(&names, &[n])?;
                        Ok(dev.upload(&t.to_f32())?)
                    };
                    Some(Moe {
                        router_proj: weight(&format!("{l}router.proj.weight"), e, h)?,
                        router_scale: vecf(&format!("{l}router.scale"), h)?,
                        per_expert_scale: first(
                            [
                                format!("{l}router.per_expert_scale"),
                                format!("{l}router.per_expert_scale.weight"),
                                format!("{l}moe.per_expert_scale"),
                            ],
                            e,
                        )?,
                        pre_ff_ln_2: vecf(&format!("{l}pre_feedforward_layernorm_2.weight"), h)?,
                        post_ff_ln_1: vecf(&format!("{l}post_feedforward_layernorm_1.weight"), h)?,
                        post_ff_ln_2: vecf(&format!("{l}post_feedforward_layernorm_2.weight"), h)?,
                        gate_up: expert_weight(
                            &dev,
                            ckpt,
                            &[format!("{l}experts.gate_up_proj"), format!("{l}moe.gate_up_proj")],
                            e,
                            2 * m.intermediate_size,
                            h,
                            &bytes,
                        )?,
                        down: expert_weight(
                            &dev,
                            ckpt,
                            &[format!("{l}experts.down_proj"), format!("{l}moe.down_proj")],
                            e,
                            h,
                            m.intermediate_size,
                            &bytes,
                        )?,
                    })
                }
                None => None,
            };
            let v_proj = if spec.k_eq_v { None } else { Some(weight(&format!("{l}self_attn.v_proj.weight"), nkv * hd, h)?) };
            layers.push(Layer {
                spec: spec.clone(),
                input_ln: vecf(&format!("{l}input_layernorm.weight"), h)?,
                post_attn_ln: vecf(&format!("{l}post_attention_layernorm.weight"), h)?,
                pre_ff_ln: vecf(&format!("{l}pre_feedforward_layernorm.weight"), h)?,
                post_ff_ln: vecf(&format!("{l}post_feedforward_layernorm.weight"), h)?,
                q_proj: weight(&format!("{l}self_attn.q_proj.weight"), nq * hd, h)?,
                k_proj: weight(&format!("{l}self_attn.k_proj.weight"), nkv * hd, h)?,
                v_proj,
                o_proj: weight(&format!("{l}self_attn.o_proj.weight"), h, nq * hd)?,
                q_norm: vecf(&format!("{l}self_attn.q_norm.weight"), hd)?,
                k_norm: vecf(&format!("{l}self_attn.k_norm.weight"), hd)?,
                inv_freq: dev.upload(&spec.rope.inv_freq)?,
                gate: weight(&format!("{l}mlp.gate_proj.weight"), config.intermediate_size, h)?,
                up: weight(&format!("{l}mlp.up_proj.weight"), config.intermediate_size, h)?,
                down: weight(&format!("{l}mlp.down_proj.weight"), h, config.intermediate_size)?,
                moe,
                layer_scalar: ckpt.expect(&format!("{l}layer_scalar"), &[1])?.to_f32()[0],
            });
        }
        if ckpt.get("lm_head.weight").is_some() {
            return Err(CudaModelError::Request("an untied lm_head.weight is not supported on the GPU yet".into()));
        }
        let final_norm = vecf(&format!("{p}norm.weight"), h)?;
        let embed_scale = dtype.round((h as f64).sqrt() as f32);
        Ok(CudaModel {
            config,
            dtype,
            dev,
            embed,
            embed_scale,
            final_norm,
            layers,
            pools: Vec::new(),
            block_size: BLOCK,
            per_seq: None,
            weight_bytes: bytes.get(),
            kv_bytes: 0,
        })
    }

    /// Runs one step over sequences of [`CudaModel::load`]'s pools. Returns, per chunk, the logits of
    /// the rows it asked for (`[rows, vocab]`).
    pub fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        let Some((max_seqs, blocks_per_seq)) = self.per_seq else {
            return Err(CudaModelError::Request("this model's KV pools belong to an engine".into()));
        };
        let c = &self.config;
        let max_pos = blocks_per_seq * self.block_size;
        let (mut ids, mut seq, mut pos, mut sees_to) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ch in chunks {
            if ch.seq >= max_seqs || ch.start + ch.tokens.len() > max_pos {
                return Err(CudaModelError::Request(format!(
                    "sequence {} reaching {} positions: this runner holds {max_seqs} sequences of {max_pos}",
                    ch.seq,
                    ch.start + ch.tokens.len(),
                )));
            }
            for (i, &t) in ch.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(CudaModelError::Request(format!("token id {t} is out of the vocabulary (size {})", c.vocab_size)));
                }
                ids.push(t);
                seq.push(ch.seq as i32);
                pos.push((ch.start + i) as i32);
                sees_to.push((ch.start + i + 1) as i32);
            }
        }
        // Sequence s owns blocks s * blocks_per_seq .. (s + 1) * blocks_per_seq, in both kinds of pool.
        let tables: Vec<i32> = (0..max_seqs * blocks_per_seq).map(|b| b as i32).collect();
        let picks = super::logit_rows(chunks.iter().map(|ch| (ch.tokens.len(), ch.logits)));
        self.step(&ids, [&tables, &tables], blocks_per_seq, [&seq, &pos, &sees_to], &[], &picks)
    }

    /// One step: `ids` embedded (image rows replaced by `images`: batch row and its embedding), every
    /// layer over the pools with `tables` (`[sliding, full]`, each `[seqs, max_blocks]`), and the head
    /// over the rows in `picks`.
    fn step(
        &mut self,
        ids: &[u32],
        tables: [&[i32]; 2],
        max_blocks: usize,
        [seq, pos, sees_to]: [&[i32]; 3],
        images: &[(usize, &[f32])],
        picks: &[std::ops::Range<usize>],
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (h, dt, eps) = (c.hidden_size, self.dtype, c.rms_norm_eps);
        let t = ids.len();
        if t == 0 {
            return Ok(picks.iter().map(|_| Vec::new()).collect());
        }
        if self.pools.len() != self.layers.len() {
            return Err(CudaModelError::Request("the KV pools are not allocated".into()));
        }
        let bs = self.block_size;
        // Rows for each kind of layer the model has (a model may have only full layers).
        let has = |kind: LayerKind| self.layers.iter().any(|l| l.spec.kind == kind);
        let rows = [
            if has(LayerKind::Sliding) {
                Some(self.dev.step_rows(tables[0], max_blocks, bs, c.sliding_window, seq, pos, sees_to)?)
            } else {
                None
            },
            if has(LayerKind::Full) { Some(self.dev.step_rows(tables[1], max_blocks, bs, 0, seq, pos, sees_to)?) } else { None },
        ];
        let ids: Vec<i32> = ids.iter().map(|&t| if c.placeholder_ids.contains(&t) { c.pad_token_id } else { t } as i32).collect();
        let mut x = self.dev.zeros(t * h)?;
        self.dev.embed(&self.embed, &ids, &mut x, self.embed_scale, dt)?;
        if !images.is_empty() {
            let flat: Vec<f32> = images.iter().flat_map(|(_, r)| r.iter().copied()).collect();
            let up = self.dev.upload(&flat)?;
            for (k, &(row, _)) in images.iter().enumerate() {
                self.dev.copy_rows(&up, k, &mut x, row, 1, h)?;
            }
        }
        for (layer, pool) in self.layers.iter().zip(self.pools.iter_mut()) {
            let r = match layer.spec.kind {
                LayerKind::Sliding => rows[0].as_ref(),
                LayerKind::Full => rows[1].as_ref(),
            }
            .expect("rows for every kind of layer present");
            layer_forward(&self.dev, layer, pool, &mut x, r, c, dt)?;
        }
        let total: usize = picks.iter().map(|r| r.len()).sum();
        if total == 0 {
            self.dev.synchronize()?;
            return Ok(picks.iter().map(|_| Vec::new()).collect());
        }
        let mut hs = self.dev.zeros(total * h)?;
        let mut at = 0;
        for r in picks {
            self.dev.copy_rows(&x, r.start, &mut hs, at, r.len(), h)?;
            at += r.len();
        }
        self.dev.rms_norm_in_place(&mut hs, Some(&self.final_norm), total, h, eps, dt)?;
        let vocab = c.vocab_size;
        let mut logits = self.dev.zeros(total * vocab)?;
        self.dev.linear(&hs, total, &self.embed, &mut logits, dt)?;
        if let Some(cap) = c.final_logit_softcapping {
            self.dev.softcap(&mut logits, cap, total * vocab, dt)?;
        }
        let host = self.dev.download(&logits, total * vocab)?;
        self.dev.synchronize()?;
        let mut out = Vec::with_capacity(picks.len());
        let mut at = 0;
        for r in picks {
            out.push(host[at * vocab..(at + r.len()) * vocab].to_vec());
            at += r.len();
        }
        Ok(out)
    }
}

/// The model on a GPU behind the engine ([`super::TextModel`]): the engine's scheduler, block tables
/// and prefix cache, with keys and values in device pools of the engine's shape (its host pools are
/// never written). Steps are serialised (one engine thread calls it).
pub struct CudaEngineModel {
    config: ModelConfig,
    inner: std::sync::Mutex<CudaModel>,
}

impl CudaEngineModel {
    pub fn new(model: CudaModel) -> CudaEngineModel {
        CudaEngineModel { config: model.config.clone(), inner: std::sync::Mutex::new(model) }
    }
}

impl super::TextModel for CudaEngineModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn prepare_kv(&self, blocks: [usize; 2], block_size: usize, dtype: crate::kv_cache::KvDtype) -> std::result::Result<(), String> {
        use crate::kv_cache::KvDtype as D;
        let kind = match dtype {
            D::F32 => KvKind::F32,
            D::Bf16 => KvKind::Bf16,
            D::F16 => KvKind::F16,
            D::Fp8E4m3 => KvKind::Fp8E4m3,
            D::Fp8E5m2 => KvKind::Fp8E5m2,
        };
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.alloc_pools(blocks, block_size, kind).map_err(|e| e.to_string())?;
        tracing::info!("KV pools on the device: {:.2} GB ({} + {} blocks of {block_size})", m.kv_bytes as f64 / 1e9, blocks[0], blocks[1]);
        Ok(())
    }

    fn forward_batch(
        &self,
        chunks: &[super::BatchChunk<'_>],
        kv: &mut dyn crate::kv_cache::KvStore,
    ) -> std::result::Result<Vec<Vec<f32>>, super::ForwardError> {
        super::validate(&self.config, chunks)?;
        let h = host_step(&self.config, chunks, kv);
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.step(&h.ids, [&h.tables[0], &h.tables[1]], h.max_blocks, [&h.seq, &h.pos, &h.sees_to], &h.images, &h.picks)
            .map_err(|e| super::ForwardError::Device(e.to_string()))
    }
}

/// The host side of one engine step: the tokens, each row's sequence (the chunk), position and
/// sees_to, the image rows to put in place of their placeholders, the rows that want logits, and the
/// engine's block tables (`[sliding, full]`, each `[chunks, max_blocks]`, freed or missing blocks -1).
pub(crate) struct HostStep<'a> {
    pub ids: Vec<u32>,
    pub seq: Vec<i32>,
    pub pos: Vec<i32>,
    pub sees_to: Vec<i32>,
    pub images: Vec<(usize, &'a [f32])>,
    pub picks: Vec<std::ops::Range<usize>>,
    pub tables: [Vec<i32>; 2],
    pub max_blocks: usize,
}

pub(crate) fn host_step<'a>(c: &ModelConfig, chunks: &'a [super::BatchChunk<'a>], kv: &dyn crate::kv_cache::KvStore) -> HostStep<'a> {
    // The engine's block tables, one per kind of layer (the first layer of each kind stands for all).
    let first = |kind: LayerKind| c.layers.iter().position(|l| l.kind == kind);
    let groups = [first(LayerKind::Sliding), first(LayerKind::Full)];
    let max_blocks = (0..chunks.len())
        .flat_map(|ci| groups.iter().flatten().map(move |&l| (ci, l)))
        .map(|(ci, l)| kv.view(ci, l).blocks.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut tables = [vec![-1i32; chunks.len() * max_blocks], vec![-1i32; chunks.len() * max_blocks]];
    for (g, layer) in groups.iter().enumerate() {
        let Some(layer) = *layer else { continue };
        for ci in 0..chunks.len() {
            for (b, &id) in kv.view(ci, layer).blocks.iter().enumerate() {
                tables[g][ci * max_blocks + b] = if id == u32::MAX { -1 } else { id as i32 };
            }
        }
    }
    let mut h = HostStep {
        ids: Vec::new(),
        seq: Vec::new(),
        pos: Vec::new(),
        sees_to: Vec::new(),
        images: Vec::new(),
        picks: super::logit_rows(chunks.iter().map(|ch| (ch.tokens.len(), ch.logits))),
        tables,
        max_blocks,
    };
    for (ci, ch) in chunks.iter().enumerate() {
        for (i, &t) in ch.tokens.iter().enumerate() {
            let p = ch.start + i;
            if let Some(im) = ch.images.iter().find(|im| (im.start..im.end()).contains(&p)) {
                let k = p - im.start;
                h.images.push((h.ids.len(), &im.rows[k * c.hidden_size..(k + 1) * c.hidden_size]));
            }
            h.ids.push(t);
            h.seq.push(ci as i32);
            h.pos.push(p as i32);
            h.sees_to.push(super::sees_to(ch, p) as i32);
        }
    }
    h
}

fn expert_weight(
    dev: &Device,
    ckpt: &Checkpoint,
    names: &[String],
    e: usize,
    rows: usize,
    cols: usize,
    bytes: &std::cell::Cell<usize>,
) -> Result<DevWeight> {
    let t = ckpt.expect_any(names, &[e, rows, cols])?;
    let w = dev.weight(t.dtype, t.bytes(), e, rows, cols)?;
    bytes.set(bytes.get() + w.bytes());
    Ok(w)
}

/// One decoder layer, as layer.rs computes it.
fn layer_forward(dev: &Device, l: &Layer, pool: &mut KvPool, x: &mut Buf, rows: &StepRows, c: &ModelConfig, dt: DType) -> Result<()> {
    let (t, h, eps) = (rows.count, c.hidden_size, c.rms_norm_eps);
    let norm = |v: &Buf, w: Option<&Buf>| -> Result<Buf> {
        let mut o = dev.zeros(t * h)?;
        dev.rms_norm(v, w, &mut o, t, h, eps, dt)?;
        Ok(o)
    };
    // Attention block.
    let hn = norm(x, Some(&l.input_ln))?;
    let mut a = attention(dev, l, pool, &hn, rows, c, dt)?;
    dev.rms_norm_in_place(&mut a, Some(&l.post_attn_ln), t, h, eps, dt)?;
    dev.add_round(x, &a, t * h, dt)?;
    // Dense MLP and MoE, both from the post-attention residual.
    let hm = norm(x, Some(&l.pre_ff_ln))?;
    let inter = c.intermediate_size;
    let (mut g, mut u, mut act) = (dev.zeros(t * inter)?, dev.zeros(t * inter)?, dev.zeros(t * inter)?);
    dev.linear(&hm, t, &l.gate, &mut g, dt)?;
    dev.linear(&hm, t, &l.up, &mut u, dt)?;
    dev.gelu_mul(&g, &u, &mut act, t * inter, dt)?;
    let mut m = dev.zeros(t * h)?;
    dev.linear(&act, t, &l.down, &mut m, dt)?;
    if let (Some(moe), Some(mc)) = (&l.moe, c.moe) {
        let (e, k, i) = (mc.num_experts, mc.top_k, mc.intermediate_size);
        let m1 = norm(&m, Some(&moe.post_ff_ln_1))?;
        // Router: on the raw residual, RMSNorm without weight, times scale, times hidden^-0.5.
        let mut z = norm(x, None)?;
        dev.mul_cols_scale_round(&mut z, &moe.router_scale, (h as f64).powf(-0.5) as f32, h, t * h, dt)?;
        let mut logits = dev.zeros(t * e)?;
        dev.linear(&z, t, &moe.router_proj, &mut logits, dt)?;
        let (mut ids, mut weights) = (dev.zeros_i32(t * k)?, dev.zeros(t * k)?);
        dev.router_topk(&logits, &moe.per_expert_scale, &mut ids, &mut weights, t, e, k)?;
        // The routed experts: per (row, slot) pair, gate_up, GELU gating, down times the weight.
        let he = norm(x, Some(&moe.pre_ff_ln_2))?;
        let pairs = t * k;
        // Grouped by expert, so each expert's weights are read once per step (expert_linear gives the
        // same bits pair by pair).
        let groups = dev.group_pairs(&ids, pairs, e)?;
        let mut gu = dev.zeros(pairs * 2 * i)?;
        dev.expert_group_linear(&he, k, &groups, &moe.gate_up, None, &mut gu, dt)?;
        let mut ea = dev.zeros(pairs * i)?;
        dev.gelu_gate_up(&gu, &mut ea, i, pairs, dt)?;
        let mut contrib = dev.zeros(pairs * h)?;
        dev.expert_group_linear(&ea, 1, &groups, &moe.down, Some(&weights), &mut contrib, dt)?;
        let mut y = dev.zeros(t * h)?;
        dev.moe_combine(&contrib, &ids, &mut y, t, k, h, dt)?;
        dev.rms_norm_in_place(&mut y, Some(&moe.post_ff_ln_2), t, h, eps, dt)?;
        dev.add_round(&mut y, &m1, t * h, dt)?;
        m = y;
    }
    dev.rms_norm_in_place(&mut m, Some(&l.post_ff_ln), t, h, eps, dt)?;
    dev.add_round(x, &m, t * h, dt)?;
    dev.scale_round(x, l.layer_scalar, t * h, dt)?;
    Ok(())
}

/// Self-attention, as attention.rs computes it; returns the o_proj output `[T, hidden]`.
fn attention(dev: &Device, l: &Layer, pool: &mut KvPool, hn: &Buf, rows: &StepRows, c: &ModelConfig, dt: DType) -> Result<Buf> {
    let (t, nq, hd, nkv, eps) = (rows.count, c.num_heads, l.spec.head_dim, l.spec.num_kv_heads, c.rms_norm_eps);
    let (mut q, mut k) = (dev.zeros(t * nq * hd)?, dev.zeros(t * nkv * hd)?);
    dev.linear(hn, t, &l.q_proj, &mut q, dt)?;
    dev.linear(hn, t, &l.k_proj, &mut k, dt)?;
    let mut v = dev.zeros(t * nkv * hd)?;
    match &l.v_proj {
        Some(vp) => dev.linear(hn, t, vp, &mut v, dt)?,
        None => dev.copy_rows(&k, 0, &mut v, 0, t, nkv * hd)?, // attention_k_eq_v: V is the raw k_proj output
    }
    dev.rms_norm_in_place(&mut q, Some(&l.q_norm), t * nq, hd, eps, dt)?;
    dev.rms_norm_in_place(&mut k, Some(&l.k_norm), t * nkv, hd, eps, dt)?;
    dev.rms_norm_in_place(&mut v, None, t * nkv, hd, eps, dt)?;
    dev.rope(&mut q, rows.positions(), &l.inv_freq, t, nq, dt)?;
    dev.rope(&mut k, rows.positions(), &l.inv_freq, t, nkv, dt)?;
    dev.kv_write(pool, &k, &v, rows)?;
    let mut attn = dev.zeros(t * nq * hd)?;
    dev.attend(pool, &q, rows, nq, &mut attn, dt)?;
    let mut o = dev.zeros(t * c.hidden_size)?;
    dev.linear(&attn, t, &l.o_proj, &mut o, dt)?;
    Ok(o)
}

/// The KV element type for `--kv-cache-dtype` on the GPU.
pub fn kv_kind(flag: &str, model: DType) -> std::result::Result<KvKind, String> {
    Ok(match (flag, model) {
        ("auto", DType::BF16) | ("bfloat16", _) => KvKind::Bf16,
        ("auto", DType::F16) | ("float16", _) => KvKind::F16,
        ("auto", DType::F32) | ("float32", _) => KvKind::F32,
        ("fp8" | "fp8_e4m3", _) => KvKind::Fp8E4m3,
        ("fp8_e5m2", _) => KvKind::Fp8E5m2,
        (other, _) => {
            return Err(format!("--kv-cache-dtype {other} is not one of auto, bfloat16, float16, float32, fp8, fp8_e4m3, fp8_e5m2"));
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::paged_kv::{KvStorage, PoolSizes};
    use crate::kv_cache::KvDtype;
    use crate::model::{BatchChunk, ImageEmbeds};

    fn config() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-bf16/config.json");
        ModelConfig::from_file(&dir).unwrap()
    }

    /// A step as the engine hands it over: the block tables reach the device as the engine holds them
    /// (a freed sliding block as -1, shorter tables padded), image rows at their batch rows, and every
    /// row passes the device's checks for both kinds of layer.
    #[test]
    fn an_engine_step_becomes_the_device_step() {
        let c = config();
        let bs = 4;
        let mut storage = KvStorage::new(&c.layers, bs, KvDtype::Bf16, PoolSizes { sliding: 16, global: 16 });
        let h = c.hidden_size;
        // Sequence 0: 10 positions cached, 4 new ones (10..14) that include a 3-token image at 11..14.
        // Sliding window 16 in this fixture, so nothing is freed yet; sequence 1: a decode row at 40,
        // with its first sliding blocks freed (the window is 16 positions).
        let image = ImageEmbeds { start: 11, rows: Arc::new((0..3 * h).map(|i| i as f32).collect()), len: 3, hash: 1 };
        let (t0, t1) = ([2u32, 7, 8, 9], [5u32]);
        let images = [image];
        let chunks = [
            BatchChunk { tokens: &t0, start: 10, logits: LogitsFor::Last, images: &images },
            BatchChunk { tokens: &t1, start: 40, logits: LogitsFor::Last, images: &[] },
        ];
        let seq0_sliding = [0u32, 1, 2, 3];
        let seq0_global = [0u32, 1, 2, 3];
        let seq1_sliding = [u32::MAX, u32::MAX, u32::MAX, u32::MAX, u32::MAX, u32::MAX, 4, 5, 6, 7, 8];
        let seq1_global = [4u32, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
        let kv = storage.batch(vec![[&seq0_sliding, &seq0_global], [&seq1_sliding, &seq1_global]]);
        let step = host_step(&c, &chunks, &kv);
        assert_eq!(step.ids, [2, 7, 8, 9, 5]);
        assert_eq!(step.seq, [0, 0, 0, 0, 1]);
        assert_eq!(step.pos, [10, 11, 12, 13, 40]);
        assert_eq!(step.sees_to, [11, 14, 14, 14, 41]);
        assert_eq!(step.images.iter().map(|(r, v)| (*r, v[0])).collect::<Vec<_>>(), [(1, 0.0), (2, h as f32), (3, 2.0 * h as f32)]);
        assert_eq!(step.picks, [3..4, 4..5]);
        assert_eq!(step.max_blocks, 11);
        assert_eq!(&step.tables[0][..11], &[0, 1, 2, 3, -1, -1, -1, -1, -1, -1, -1]);
        assert_eq!(&step.tables[0][11..], &[-1, -1, -1, -1, -1, -1, 4, 5, 6, 7, 8]);
        assert_eq!(&step.tables[1][11..], &[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        for (g, window) in [(0, c.sliding_window), (1, 0)] {
            let (slots, used) =
                switchyard_kernels::cuda::ops::plan_rows(&step.tables[g], step.max_blocks, bs, window, &step.seq, &step.pos, &step.sees_to)
                    .unwrap_or_else(|e| panic!("group {g}: {e}"));
            assert_eq!(slots[0], [2, 2][g] * 4 + 2, "position 10 is in the third block");
            assert!(used <= 16);
        }
        // Had the window been shorter than what sequence 1 still holds, its row would be refused.
        assert!(
            switchyard_kernels::cuda::ops::plan_rows(&step.tables[0], step.max_blocks, bs, 30, &step.seq, &step.pos, &step.sees_to)
                .is_err()
        );
    }
}

//! The MoE router (gate): on the raw residual, `RMSNorm_noscale(x) * scale * hidden^-0.5`, a linear to
//! `num_experts` logits, softmax in f32, top-k, renormalised over the k, times `per_expert_scale`.

use switchyard_kernels::topk::topk_torch;
use switchyard_kernels::{DType, linear, ops};

use crate::checkpoint::{Checkpoint, Tensor};
use crate::config::{ModelConfig, MoeConfig};
use crate::error::LoadError;

pub struct Router {
    proj: Tensor,
    scale: Vec<f32>,
    per_expert_scale: Vec<f32>,
    moe: MoeConfig,
}

/// Routing decisions for `T` rows: `ids[T, k]` and `weights[T, k]`, slots in torch.topk's order.
pub struct Routing {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Router {
    pub fn load(ckpt: &Checkpoint, p: &str, c: &ModelConfig, moe: MoeConfig) -> Result<Router, LoadError> {
        let (h, e) = (c.hidden_size, moe.num_experts);
        let names = |suffix: &str| -> Vec<String> {
            [format!("{p}router.{suffix}"), format!("{p}router.{suffix}.weight"), format!("{p}moe.{suffix}")].to_vec()
        };
        Ok(Router {
            proj: ckpt.expect(&format!("{p}router.proj.weight"), &[e, h])?.packed(),
            scale: ckpt.expect(&format!("{p}router.scale"), &[h])?.to_f32(),
            per_expert_scale: ckpt.expect_any(&names("per_expert_scale"), &[e])?.to_f32(),
            moe,
        })
    }

    pub fn forward(&self, residual: &[f32], t: usize, c: &ModelConfig, dt: DType) -> Routing {
        let (h, e, k) = (c.hidden_size, self.moe.num_experts, self.moe.top_k);
        let root = (h as f64).powf(-0.5) as f32;
        let mut z = residual.to_vec();
        ops::rms_norm_chunks(&mut z, h, None, c.rms_norm_eps, dt);
        for row in z.chunks_exact_mut(h) {
            for (v, &s) in row.iter_mut().zip(&self.scale) {
                *v = dt.round(dt.round(*v * s) * root);
            }
        }
        let mut logits = vec![0f32; t * e];
        linear(&z, t, self.proj.weight(), &mut logits, dt);
        let mut ids = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        for row in logits.chunks_exact_mut(e) {
            ops::softmax(row);
            // Exact ties are common (probabilities of dtype-rounded logits); break them as torch.topk does.
            let top = topk_torch(row, k);
            let sum: f32 = top.iter().map(|&(_, p)| p).sum();
            for (i, p) in top {
                ids.push(i);
                weights.push(p / sum * self.per_expert_scale[i as usize]);
            }
        }
        Routing { ids, weights }
    }
}

//! One decoder layer: attention, then the dense MLP and the MoE block side by side, then `layer_scalar`.

use switchyard_kernels::{DType, ops};

use super::attention::Attention;
use super::experts::ExpertBackend;
use super::mlp::Mlp;
use super::router::Router;
use super::{ForwardError, RowInfo};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::LoadError;
use crate::kv_cache::KvStore;

struct MoeBlock {
    router: Router,
    pre_ff_ln_2: Vec<f32>,
    post_ff_ln_1: Vec<f32>,
    post_ff_ln_2: Vec<f32>,
}

pub struct DecoderLayer {
    index: usize,
    input_ln: Vec<f32>,
    post_attn_ln: Vec<f32>,
    pre_ff_ln: Vec<f32>,
    post_ff_ln: Vec<f32>,
    attn: Attention,
    mlp: Mlp,
    moe: Option<MoeBlock>,
    layer_scalar: f32,
}

impl DecoderLayer {
    pub fn load(ckpt: &Checkpoint, p: &str, c: &ModelConfig, index: usize) -> Result<DecoderLayer, LoadError> {
        let h = c.hidden_size;
        let norm = |name: &str| ckpt.expect(&format!("{p}{name}.weight"), &[h]).map(|t| t.to_f32());
        let moe = match c.moe {
            Some(m) => Some(MoeBlock {
                router: Router::load(ckpt, p, c, m)?,
                pre_ff_ln_2: norm("pre_feedforward_layernorm_2")?,
                post_ff_ln_1: norm("post_feedforward_layernorm_1")?,
                post_ff_ln_2: norm("post_feedforward_layernorm_2")?,
            }),
            None => None,
        };
        Ok(DecoderLayer {
            index,
            input_ln: norm("input_layernorm")?,
            post_attn_ln: norm("post_attention_layernorm")?,
            pre_ff_ln: norm("pre_feedforward_layernorm")?,
            post_ff_ln: norm("post_feedforward_layernorm")?,
            attn: Attention::load(ckpt, p, c, index)?,
            mlp: Mlp::load(ckpt, p, c)?,
            moe,
            layer_scalar: ckpt.expect(&format!("{p}layer_scalar"), &[1])?.to_f32()[0],
        })
    }

    pub(crate) fn forward(
        &self,
        mut x: Vec<f32>,
        rows: &[RowInfo],
        kv: &mut dyn KvStore,
        experts: &dyn ExpertBackend,
        c: &ModelConfig,
        dt: DType,
    ) -> Result<Vec<f32>, ForwardError> {
        let (t, h, eps) = (rows.len(), c.hidden_size, c.rms_norm_eps);
        let norm = |v: &[f32], w: Option<&[f32]>| ops::rms_norm_rows(v, h, w, eps, dt);
        // Attention block.
        let a = self.attn.forward(&norm(&x, Some(&self.input_ln)), rows, kv, c, dt);
        ops::add_assign(&mut x, &norm(&a, Some(&self.post_attn_ln)), dt);
        // Dense MLP and MoE, both from the post-attention residual `x`.
        let mut m = self.mlp.forward(&norm(&x, Some(&self.pre_ff_ln)), t, c, dt);
        if let Some(moe) = &self.moe {
            let m1 = norm(&m, Some(&moe.post_ff_ln_1));
            let routing = moe.router.forward(&x, t, c, dt);
            let he = norm(&x, Some(&moe.pre_ff_ln_2));
            let mut y = switchyard_kernels::pool::zeros(t * h);
            experts.run(self.index, &he, t, &routing.ids, &routing.weights, &mut y)?;
            let mut m2 = norm(&y, Some(&moe.post_ff_ln_2));
            ops::add_assign(&mut m2, &m1, dt);
            m = m2;
        }
        ops::add_assign(&mut x, &norm(&m, Some(&self.post_ff_ln)), dt);
        ops::scale_assign(&mut x, self.layer_scalar, dt);
        Ok(x)
    }
}

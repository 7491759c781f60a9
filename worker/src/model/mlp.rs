//! The dense MLP that runs beside the MoE block: `down(gelu_tanh(gate(x)) * up(x))`.

use switchyard_kernels::{DType, LinearJob, linear, linear_many, ops};

use crate::checkpoint::{Checkpoint, Tensor};
use crate::config::ModelConfig;
use crate::error::LoadError;

pub struct Mlp {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

impl Mlp {
    pub fn load(ckpt: &Checkpoint, p: &str, c: &ModelConfig) -> Result<Mlp, LoadError> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Mlp {
            gate: ckpt.expect(&format!("{p}mlp.gate_proj.weight"), &[i, h])?.packed(),
            up: ckpt.expect(&format!("{p}mlp.up_proj.weight"), &[i, h])?.packed(),
            down: ckpt.expect(&format!("{p}mlp.down_proj.weight"), &[h, i])?.packed(),
        })
    }

    pub fn forward(&self, x: &[f32], t: usize, c: &ModelConfig, dt: DType) -> Vec<f32> {
        let i = c.intermediate_size;
        let (mut g, mut u) = (switchyard_kernels::pool::zeros(t * i), switchyard_kernels::pool::zeros(t * i));
        linear_many(
            &mut [LinearJob { x, m: t, w: self.gate.weight(), out: &mut g }, LinearJob { x, m: t, w: self.up.weight(), out: &mut u }],
            dt,
        );
        let mut act = switchyard_kernels::pool::zeros(t * i);
        ops::gelu_mul(&g, &u, dt, &mut act);
        let mut out = switchyard_kernels::pool::zeros(t * c.hidden_size);
        linear(&act, t, self.down.weight(), &mut out, dt);
        out
    }
}

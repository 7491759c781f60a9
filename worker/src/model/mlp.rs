//! The dense MLP that runs beside the MoE block: `down(gelu_tanh(gate(x)) * up(x))`.

use switchyard_kernels::{DType, Product, linear_many_new, linear_new, ops};

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
        let gu = linear_many_new(&[Product::new(x, t, self.gate.weight()), Product::new(x, t, self.up.weight())], dt);
        debug_assert_eq!(gu[0].len(), t * i);
        let act = ops::gelu_mul_new(&gu[0], &gu[1], dt);
        linear_new(&act, t, self.down.weight(), dt)
    }
}

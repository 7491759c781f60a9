//! The expert slices this process holds: for each (layer, expert) the plan gives it, owned copies of
//! that expert's gate_up and down weights, read from the safetensors files by offset (the rest of the
//! file is never touched, so memory follows the share). Slices are loaded and dropped as plans change.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use switchyard_kernels::linear::Panels;
use switchyard_kernels::{DType, Weight};

use crate::checkpoint::{Checkpoint, Tensor, packing_enabled};
use crate::config::{ModelConfig, MoeConfig};
use crate::error::LoadError;
use crate::model::experts::{ExpertOutputs, ExpertWeights, expert_outputs, expert_tensors, weighted_contributions};

/// One weight matrix, owned, with the bf16 kernel's packed panels when they apply.
struct OwnedWeight {
    dtype: DType,
    bytes: Vec<u8>,
    rows: usize,
    cols: usize,
    panels: Option<Panels>,
}

impl OwnedWeight {
    fn copy_of(t: &Tensor, i: usize) -> OwnedWeight {
        let w = t.weight_at(i);
        let mut o = OwnedWeight { dtype: w.dtype, bytes: w.bytes.to_vec(), rows: w.rows, cols: w.cols, panels: None };
        if packing_enabled() {
            o.panels = switchyard_kernels::linear::pack_panels(&o.view());
        }
        o
    }

    fn view(&self) -> Weight<'_> {
        Weight::new(self.dtype, &self.bytes, self.rows, self.cols).with_panels(self.panels.as_deref())
    }

    fn bytes(&self) -> usize {
        self.bytes.len() + self.panels.as_ref().map_or(0, |p| p.len() * 4)
    }
}

struct Slice {
    gate_up: OwnedWeight,
    down: OwnedWeight,
}

/// Expert slices by (layer, expert), shared between the gRPC handlers and the compute thread.
pub struct ExpertStore {
    /// Per layer, the checkpoint's stacked `gate_up` and `down` tensors (memory-mapped, not copied).
    layers: Vec<(Tensor, Tensor)>,
    moe: MoeConfig,
    pub hidden: usize,
    pub num_layers: usize,
    pub dtype: DType,
    slices: RwLock<HashMap<(usize, usize), Arc<Slice>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("layer {layer} expert {expert} is not held here")]
    NotHeld { layer: usize, expert: u32 },
}

impl ExpertStore {
    /// Finds every layer's expert tensors (checked for shape now; nothing is copied until
    /// [`ExpertStore::hold`]).
    pub fn open(ckpt: &Checkpoint, config: &ModelConfig) -> Result<ExpertStore, LoadError> {
        let moe =
            config.moe.ok_or_else(|| LoadError::MissingTensor { name: "experts (config has no MoE block)".into(), expected: vec![] })?;
        let prefix = ckpt.text_prefix();
        let layers: Vec<(Tensor, Tensor)> =
            (0..config.num_layers).map(|l| expert_tensors(ckpt, prefix, config, moe, l)).collect::<Result<_, _>>()?;
        let dtype = layers.first().map_or(DType::F32, |(gu, _)| gu.dtype);
        Ok(ExpertStore {
            layers,
            moe,
            hidden: config.hidden_size,
            num_layers: config.num_layers,
            dtype,
            slices: RwLock::new(HashMap::new()),
        })
    }

    pub fn num_experts(&self) -> usize {
        self.moe.num_experts
    }

    /// Bytes of one (layer, expert) slice in the checkpoint dtype.
    pub fn slice_bytes(&self) -> u64 {
        self.moe.slice_bytes(self.hidden, self.dtype)
    }

    /// Makes the held set exactly `want`: copies in the missing slices, drops the others. Returns the
    /// bytes now held.
    pub fn hold(&self, want: &BTreeSet<(usize, usize)>) -> Result<usize, LoadError> {
        let missing: Vec<(usize, usize)> = {
            let held = self.slices.read().unwrap();
            want.iter().filter(|k| !held.contains_key(k)).copied().collect()
        };
        let mut loaded = Vec::with_capacity(missing.len());
        for (l, e) in missing {
            let (gu, down) = &self.layers[l];
            loaded.push(((l, e), Arc::new(Slice { gate_up: OwnedWeight::copy_of(gu, e), down: OwnedWeight::copy_of(down, e) })));
        }
        let mut held = self.slices.write().unwrap();
        held.extend(loaded);
        held.retain(|k, _| want.contains(k));
        Ok(held.values().map(|s| s.gate_up.bytes() + s.down.bytes()).sum())
    }

    pub fn held(&self) -> BTreeSet<(usize, usize)> {
        self.slices.read().unwrap().keys().copied().collect()
    }

    pub fn holds(&self, layer: usize, expert: u32) -> bool {
        self.slices.read().unwrap().contains_key(&(layer, expert as usize))
    }

    /// Every pair's weighted contribution `round(expert(row) * weight)` (`[pairs, hidden]`), as the
    /// combine sums them; fails if any expert is not held.
    pub fn contributions(
        &self,
        layer: usize,
        rows: &[f32],
        pair_row: &[usize],
        pair_expert: &[u32],
        pair_weight: &[f32],
    ) -> Result<Vec<f32>, StoreError> {
        let y = self.outputs(layer, rows, pair_row, pair_expert)?;
        let mut c = vec![0f32; pair_row.len() * self.hidden];
        weighted_contributions(&y, pair_weight, self.dtype, &mut c);
        Ok(c)
    }

    /// Every pair's expert output for one layer; fails if any expert is not held.
    fn outputs(&self, layer: usize, rows: &[f32], pair_row: &[usize], pair_expert: &[u32]) -> Result<ExpertOutputs, StoreError> {
        let mut slices: HashMap<usize, Arc<Slice>> = HashMap::new();
        {
            let held = self.slices.read().unwrap();
            for &e in pair_expert {
                if let std::collections::hash_map::Entry::Vacant(v) = slices.entry(e as usize) {
                    let s = held.get(&(layer, e as usize)).ok_or(StoreError::NotHeld { layer, expert: e })?;
                    v.insert(s.clone());
                }
            }
        }
        let w = |x: usize| {
            let s = &slices[&x];
            ExpertWeights { gate_up: s.gate_up.view(), down: s.down.view() }
        };
        Ok(expert_outputs(&w, rows, pair_row, pair_expert, self.moe.num_experts, self.dtype))
    }
}

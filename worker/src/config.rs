//! `config.json` of a Gemma 4 checkpoint, resolved into per-layer attention specs.
//!
//! Accepts the form Google publishes (`global_head_dim`, `num_global_key_value_heads` in `text_config`)
//! and the `per_layer_config` form that transformers 5.23 writes (a sparse map from layer index to
//! overrides such as `head_dim` and `num_key_value_heads`), and a bare `gemma4_text` config.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use switchyard_kernels::ops::Rope;

use crate::error::LoadError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Sliding,
    Full,
}

/// The attention shape of one decoder layer.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub kind: LayerKind,
    pub head_dim: usize,
    pub num_kv_heads: usize,
    /// Full layers with `attention_k_eq_v`: no `v_proj`, V is the `k_proj` output (before k_norm).
    pub k_eq_v: bool,
    pub rope: Rope,
}

/// The text model's configuration, validated.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub moe: Option<MoeConfig>,
    pub sliding_window: usize,
    pub rms_norm_eps: f32,
    pub final_logit_softcapping: Option<f32>,
    pub max_position_embeddings: usize,
    pub pad_token_id: u32,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Image, audio and video placeholder ids: embedded as `pad_token_id` (as transformers does).
    pub placeholder_ids: Vec<u32>,
    /// `image_token_id`, `boi_token_id`, `eoi_token_id`: an image's soft-token placeholder and the
    /// tokens around its span.
    pub image_token_id: Option<u32>,
    /// `video_token_id`: a video frame's soft-token placeholder (frames are images otherwise).
    pub video_token_id: Option<u32>,
    pub boi_token_id: Option<u32>,
    pub eoi_token_id: Option<u32>,
    pub layers: Vec<LayerSpec>,
    /// dtype named by the config (`dtype` / `torch_dtype`), if any.
    pub dtype: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
}

impl MoeConfig {
    /// Bytes of one (layer, expert) slice (gate_up plus down) stored in `dtype`.
    pub fn slice_bytes(&self, hidden: usize, dtype: switchyard_kernels::DType) -> u64 {
        (3 * self.intermediate_size * hidden * dtype.size()) as u64
    }
}

/// Parameter counts of the text model, from its shapes alone (the vision tower apart).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParameterCounts {
    /// Every text-model parameter, the tied embedding once.
    pub total: u64,
    /// The parameters one batch-1 decode token reads: everything but the experts, the embedding in
    /// full (it is the lm_head), and `top_k` of each layer's `num_experts` experts.
    pub per_decode_token: f64,
    /// The parameters every decode step reads whatever its batch: all but the experts.
    pub dense: u64,
    /// One expert of one layer (its gate, up and down projections).
    pub per_expert: u64,
}

impl ModelConfig {
    /// Counts the text model's parameters from the shapes the loader expects ([`crate::model`]).
    pub fn parameter_counts(&self) -> ParameterCounts {
        let (h, nq) = (self.hidden_size as u64, self.num_heads as u64);
        let embedding = self.vocab_size as u64 * h + h; // embed_tokens, final norm
        let mut dense = embedding;
        let mut experts = 0u64;
        let per_expert = self.moe.map_or(0, |m| 3 * m.intermediate_size as u64 * h);
        for l in &self.layers {
            let (hd, nkv) = (l.head_dim as u64, l.num_kv_heads as u64);
            let v = if l.k_eq_v { 0 } else { nkv * hd * h };
            let attention = nq * hd * h + nkv * hd * h + v + h * nq * hd + 2 * hd;
            let norms = 4 * h + 1; // four layer norms and layer_scalar
            let mlp = 3 * self.intermediate_size as u64 * h;
            dense += attention + norms + mlp;
            if let Some(m) = self.moe {
                let e = m.num_experts as u64;
                dense += e * h + h + e + 3 * h; // router proj, scale, per_expert_scale, three MoE norms
                experts += e * 3 * m.intermediate_size as u64 * h;
            }
        }
        let share = self.moe.map_or(0.0, |m| m.top_k as f64 / m.num_experts as f64);
        ParameterCounts { total: dense + experts, per_decode_token: dense as f64 + experts as f64 * share, dense, per_expert }
    }
}

#[derive(Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    factor: Option<f64>,
}

#[derive(Deserialize)]
struct RawText {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    global_head_dim: Option<usize>,
    num_global_key_value_heads: Option<usize>,
    per_layer_config: Option<Value>,
    intermediate_size: usize,
    #[serde(default)]
    enable_moe_block: bool,
    num_experts: Option<usize>,
    top_k_experts: Option<usize>,
    moe_intermediate_size: Option<usize>,
    hidden_activation: Option<String>,
    #[serde(default)]
    attention_k_eq_v: bool,
    sliding_window: usize,
    layer_types: Option<Vec<String>>,
    rope_parameters: Option<HashMap<String, RawRope>>,
    final_logit_softcapping: Option<f32>,
    rms_norm_eps: Option<f32>,
    max_position_embeddings: Option<usize>,
    hidden_size_per_layer_input: Option<usize>,
    #[serde(default)]
    num_kv_shared_layers: usize,
    #[serde(default)]
    attention_bias: bool,
    use_bidirectional_attention: Option<String>,
    pad_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
}

fn err(msg: impl Into<String>) -> LoadError {
    LoadError::Config(msg.into())
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io { path: path.into(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| LoadError::Json { path: path.into(), source })?;
        ModelConfig::from_value(&v)
    }

    pub fn from_value(root: &Value) -> Result<ModelConfig, LoadError> {
        let text_value = root.get("text_config").unwrap_or(root);
        let raw: RawText = serde_json::from_value(text_value.clone()).map_err(|e| err(format!("text_config: {e}")))?;
        let mut placeholder_ids = Vec::new();
        for key in ["image_token_id", "audio_token_id", "video_token_id"] {
            if let Some(id) = root.get(key).and_then(Value::as_u64) {
                placeholder_ids.push(id as u32);
            }
        }
        let mut eos = ids(root.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids(raw.eos_token_id.as_ref());
        }
        let mut c = Self::resolve(raw, placeholder_ids, eos)?;
        let id = |k: &str| root.get(k).and_then(Value::as_u64).map(|x| x as u32);
        (c.image_token_id, c.boi_token_id, c.eoi_token_id) = (id("image_token_id"), id("boi_token_id"), id("eoi_token_id"));
        c.video_token_id = id("video_token_id");
        Ok(c)
    }

    fn resolve(raw: RawText, placeholder_ids: Vec<u32>, eos_token_ids: Vec<u32>) -> Result<ModelConfig, LoadError> {
        if let Some(act) = &raw.hidden_activation
            && act != "gelu_pytorch_tanh"
        {
            return Err(err(format!("hidden_activation `{act}` is not supported (Gemma 4 uses gelu_pytorch_tanh)")));
        }
        if raw.hidden_size_per_layer_input.unwrap_or(0) != 0 {
            return Err(err(
                "per-layer input embeddings (hidden_size_per_layer_input > 0) are not supported; the 26B/31B models have none",
            ));
        }
        if raw.num_kv_shared_layers != 0 {
            return Err(err("num_kv_shared_layers > 0 (KV sharing) is not supported; the 26B/31B models have none"));
        }
        if raw.attention_bias {
            return Err(err("attention_bias = true is not supported"));
        }
        if raw.use_bidirectional_attention.as_deref() == Some("all") {
            return Err(err("use_bidirectional_attention = \"all\" is not supported (text generation is causal)"));
        }
        let n = raw.num_hidden_layers;
        let mut layer_types = raw.layer_types.clone().unwrap_or_else(|| {
            (0..n).map(|i| if (i + 1) % 6 != 0 { "sliding_attention".to_string() } else { "full_attention".to_string() }).collect()
        });
        if layer_types.len() != n {
            return Err(err(format!("layer_types has {} entries for {} layers", layer_types.len(), n)));
        }
        // transformers forces the last layer to full attention.
        if let Some(last) = layer_types.last_mut() {
            *last = "full_attention".into();
        }
        let overrides = parse_per_layer(raw.per_layer_config.as_ref(), n)?;
        let rope_for = |kind: &str, head_dim: usize| -> Result<Rope, LoadError> {
            let p = raw.rope_parameters.as_ref().and_then(|m| m.get(kind));
            let (default_type, default_theta, default_frac) =
                if kind == "full_attention" { ("proportional", 1e6, 0.25) } else { ("default", 1e4, 1.0) };
            let rope_type = p.and_then(|p| p.rope_type.clone()).unwrap_or_else(|| default_type.into());
            let theta = p.and_then(|p| p.rope_theta).unwrap_or(default_theta);
            if p.and_then(|p| p.factor).unwrap_or(1.0) != 1.0 {
                return Err(err(format!("rope_parameters.{kind}.factor != 1 is not supported")));
            }
            match rope_type.as_str() {
                "default" => Ok(Rope::default(theta, head_dim)),
                "proportional" => {
                    let frac = p.and_then(|p| p.partial_rotary_factor).unwrap_or(if p.is_some() { 1.0 } else { default_frac });
                    Ok(Rope::proportional(theta, head_dim, frac))
                }
                other => Err(err(format!("rope_type `{other}` for {kind} layers is not supported"))),
            }
        };
        let mut layers = Vec::with_capacity(n);
        for (i, t) in layer_types.iter().enumerate() {
            let kind = match t.as_str() {
                "sliding_attention" => LayerKind::Sliding,
                "full_attention" => LayerKind::Full,
                other => {
                    return Err(err(format!("layer_types[{i}] = `{other}` is not supported")));
                }
            };
            let (mut head_dim, mut num_kv_heads) = (raw.head_dim, raw.num_key_value_heads);
            match &overrides {
                Some(o) => {
                    if let Some(ov) = o.get(&i) {
                        head_dim = ov.head_dim.unwrap_or(head_dim);
                        num_kv_heads = ov.num_key_value_heads.unwrap_or(num_kv_heads);
                    }
                }
                None if kind == LayerKind::Full => {
                    head_dim = raw.global_head_dim.unwrap_or(512);
                    if raw.attention_k_eq_v
                        && let Some(g) = raw.num_global_key_value_heads
                    {
                        num_kv_heads = g;
                    }
                }
                None => {}
            }
            if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
                return Err(err(format!(
                    "layer {i}: {} attention heads are not a multiple of {num_kv_heads} KV heads",
                    raw.num_attention_heads
                )));
            }
            if head_dim % 2 != 0 {
                return Err(err(format!("layer {i}: head_dim {head_dim} must be even")));
            }
            layers.push(LayerSpec {
                kind,
                head_dim,
                num_kv_heads,
                k_eq_v: raw.attention_k_eq_v && kind == LayerKind::Full,
                rope: rope_for(t, head_dim)?,
            });
        }
        let moe = if raw.enable_moe_block {
            let (e, k, i) = (raw.num_experts, raw.top_k_experts, raw.moe_intermediate_size);
            match (e, k, i) {
                (Some(e), Some(k), Some(i)) if k >= 1 && k <= e => Some(MoeConfig { num_experts: e, top_k: k, intermediate_size: i }),
                _ => {
                    return Err(err("enable_moe_block needs num_experts, top_k_experts (1..=num_experts) and moe_intermediate_size"));
                }
            }
        } else {
            None
        };
        Ok(ModelConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_layers: n,
            num_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            moe,
            sliding_window: raw.sliding_window,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            final_logit_softcapping: raw.final_logit_softcapping,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(131_072),
            pad_token_id: raw.pad_token_id.unwrap_or(0),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            placeholder_ids,
            image_token_id: None,
            video_token_id: None,
            boi_token_id: None,
            eoi_token_id: None,
            layers,
            dtype: raw.dtype.or(raw.torch_dtype),
        })
    }
}

#[derive(Default, Deserialize)]
struct LayerOverride {
    head_dim: Option<usize>,
    num_key_value_heads: Option<usize>,
}

/// `per_layer_config`: `{"5": {"head_dim": 512, ...}}`, or a list with one entry (or null) per layer.
fn parse_per_layer(v: Option<&Value>, n: usize) -> Result<Option<HashMap<usize, LayerOverride>>, LoadError> {
    let Some(v) = v else { return Ok(None) };
    let mut out = HashMap::new();
    let mut put = |idx: usize, item: &Value| -> Result<(), LoadError> {
        if idx >= n {
            return Err(err(format!("per_layer_config names layer {idx}, but there are {n} layers")));
        }
        if !item.is_null() {
            let o: LayerOverride = serde_json::from_value(item.clone()).map_err(|e| err(format!("per_layer_config[{idx}]: {e}")))?;
            out.insert(idx, o);
        }
        Ok(())
    };
    match v {
        Value::Object(m) => {
            for (k, item) in m {
                let idx = k.parse::<usize>().map_err(|_| err(format!("per_layer_config key `{k}` is not a layer index")))?;
                put(idx, item)?;
            }
        }
        Value::Array(a) => {
            for (idx, item) in a.iter().enumerate() {
                put(idx, item)?;
            }
        }
        Value::Null => return Ok(None),
        _ => return Err(err("per_layer_config must be an object or a list")),
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["Gemma4ForConditionalGeneration"],
            "image_token_id": 258880, "audio_token_id": 258881, "video_token_id": 258884, "eos_token_id": [1, 106],
            "text_config": {
                "vocab_size": 262144, "hidden_size": 2816, "num_hidden_layers": 30, "num_attention_heads": 16,
                "num_key_value_heads": 8, "num_global_key_value_heads": 2, "head_dim": 256, "global_head_dim": 512,
                "intermediate_size": 2112, "moe_intermediate_size": 704, "enable_moe_block": true, "num_experts": 128,
                "top_k_experts": 8, "hidden_activation": "gelu_pytorch_tanh", "attention_k_eq_v": true, "sliding_window": 1024,
                "rope_parameters": {
                    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
                "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "dtype": "bfloat16"
            }
        })
    }

    #[test]
    fn published_26b_config_resolves() {
        let c = ModelConfig::from_value(&base()).unwrap();
        assert_eq!(c.layers.len(), 30);
        for (i, l) in c.layers.iter().enumerate() {
            if i % 6 == 5 {
                assert_eq!((l.kind, l.head_dim, l.num_kv_heads, l.k_eq_v), (LayerKind::Full, 512, 2, true), "layer {i}");
            } else {
                assert_eq!((l.kind, l.head_dim, l.num_kv_heads, l.k_eq_v), (LayerKind::Sliding, 256, 8, false), "layer {i}");
            }
        }
        assert_eq!(c.placeholder_ids, vec![258880, 258881, 258884]);
        assert_eq!(c.moe.unwrap().top_k, 8);
    }

    #[test]
    fn per_layer_config_form_resolves_the_same() {
        let mut v = base();
        let t = v["text_config"].as_object_mut().unwrap();
        t.remove("global_head_dim");
        t.remove("num_global_key_value_heads");
        let per: serde_json::Map<String, Value> =
            [5, 11, 17, 23, 29].iter().map(|i| (i.to_string(), json!({"head_dim": 512, "num_key_value_heads": 2}))).collect();
        t.insert("per_layer_config".into(), Value::Object(per));
        let a = ModelConfig::from_value(&v).unwrap();
        let b = ModelConfig::from_value(&base()).unwrap();
        for (x, y) in a.layers.iter().zip(&b.layers) {
            assert_eq!((x.kind, x.head_dim, x.num_kv_heads, x.k_eq_v), (y.kind, y.head_dim, y.num_kv_heads, y.k_eq_v));
            assert_eq!(x.rope.inv_freq, y.rope.inv_freq);
        }
    }

    #[test]
    fn unsupported_features_are_named() {
        let mut v = base();
        v["text_config"]["hidden_size_per_layer_input"] = json!(256);
        let e = ModelConfig::from_value(&v).unwrap_err().to_string();
        assert!(e.contains("hidden_size_per_layer_input"), "{e}");
        let mut v = base();
        v["text_config"]["per_layer_config"] = json!({"40": {"head_dim": 8}});
        assert!(ModelConfig::from_value(&v).unwrap_err().to_string().contains("layer 40"));
    }
}

//! Safetensors checkpoints, memory-mapped: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Tensors stay in their file dtype; nothing is copied at load.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use memmap2::Mmap;
use switchyard_kernels::linear::Panels;
use switchyard_kernels::{DType, Weight};

use crate::error::LoadError;

/// One tensor: a byte range of a memory-mapped file.
#[derive(Clone)]
pub struct Tensor {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub name: String,
    /// Pair-interleaved panels for the bf16 kernel, one per leading slice (see [`Tensor::packed`]).
    panels: Arc<OnceLock<Vec<Panels>>>,
}

impl Tensor {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor as a 2-D weight `[shape[0], product(rest)]`.
    pub fn weight(&self) -> Weight<'_> {
        let rows = self.shape.first().copied().unwrap_or(1);
        let panels = self.panels.get().and_then(|p| p.first()).map(|p| &p[..]);
        Weight::new(self.dtype, self.bytes(), rows, self.numel() / rows.max(1)).with_panels(panels)
    }

    /// Slice `i` of the leading dimension of a 3-D tensor, as a 2-D weight.
    pub fn weight_at(&self, i: usize) -> Weight<'_> {
        let (rows, cols) = (self.shape[1], self.shape[2]);
        let sz = rows * cols * self.dtype.size();
        let panels = self.panels.get().and_then(|p| p.get(i)).map(|p| &p[..]);
        Weight::new(self.dtype, &self.bytes()[i * sz..(i + 1) * sz], rows, cols).with_panels(panels)
    }

    /// This tensor with a repacked copy for the bf16 kernel, for weights used as linear layers.
    ///
    /// Why a copy: transformers' bf16 `linear` (oneDNN) sums each output over k-pairs in order; doing the
    /// same with SIMD needs the weight pair-interleaved across rows. Transposing on the fly works (and is
    /// what runs without this) but costs shuffles on every decode step; the copy is made once at load, in
    /// the same dtype, so decode streams it at memory speed. A no-op where the pair kernel is not used
    /// (f32/f16 checkpoints, the portable kernel path) or when `SWITCHYARD_PACK_WEIGHTS=0`.
    pub fn packed(self) -> Tensor {
        if !packing_enabled() {
            return self;
        }
        self.panels.get_or_init(|| {
            let slices = if self.shape.len() == 3 { self.shape[0] } else { 1 };
            (0..slices)
                .map_while(|i| {
                    let w = if self.shape.len() == 3 { self.weight_at(i) } else { self.weight() };
                    switchyard_kernels::linear::pack_panels(&w)
                })
                .collect()
        });
        self
    }

    /// Decodes a (small) tensor to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dtype.decode_into(self.bytes(), &mut out);
        out
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?} {:?})", self.name, self.dtype, self.shape)
    }
}

/// Whether linear weights get the bf16 kernel's repacked copy ([`Tensor::packed`]);
/// `SWITCHYARD_PACK_WEIGHTS=0` turns it off. Read once per process.
pub fn packing_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| !std::env::var("SWITCHYARD_PACK_WEIGHTS").is_ok_and(|v| v == "0"))
}

/// All tensors of a checkpoint directory, by name; or, with [`Checkpoint::dummy`], random tensors of
/// whatever names and shapes the loader asks for.
pub struct Checkpoint {
    tensors: HashMap<String, Tensor>,
    dummy: Option<Dummy>,
}

/// vLLM's `--load-format dummy`: every tensor the model asks for is made on the spot, uniform in
/// [-1e-3, 1e-3) (vLLM's `initialize_dummy_weights` range; vectors, such as norm weights, in
/// [0.5, 1.5), see `make`), in the compute dtype, from a generator seeded
/// by the tensor's name, so the same name always gets the same values whatever the load order. The
/// checkpoint then holds exactly the tensors the loader asked for: `get` and `names` see those only.
struct Dummy {
    dtype: DType,
    made: std::sync::Mutex<HashMap<String, Tensor>>,
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Checkpoint, LoadError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| LoadError::Io { path: index.clone(), source })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| LoadError::Json { path: index.clone(), source })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LoadError::Safetensors { path: index.clone(), reason: "no `weight_map` object".into() })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains("..") {
                    return Err(LoadError::Safetensors {
                        path: index.clone(),
                        reason: format!("shard name `{n}` leaves the model directory"),
                    });
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for path in files {
            load_file(&path, &mut tensors)?;
        }
        Ok(Checkpoint { tensors, dummy: None })
    }

    /// A checkpoint with no files: random weights of the shapes the model asks for, in `dtype`
    /// (vLLM's `--load-format dummy`; see [`Dummy`]). Serves and benchmarks a model from its
    /// `config.json` alone.
    pub fn dummy(dtype: DType) -> Checkpoint {
        Checkpoint { tensors: HashMap::new(), dummy: Some(Dummy { dtype, made: Default::default() }) }
    }

    /// The dtype a dummy checkpoint makes its tensors in; `None` for a real one.
    pub fn dummy_dtype(&self) -> Option<DType> {
        self.dummy.as_ref().map(|d| d.dtype)
    }

    pub fn get(&self, name: &str) -> Option<Tensor> {
        match &self.dummy {
            Some(d) => d.made.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned(),
            None => self.tensors.get(name).cloned(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.dummy {
            Some(d) => d.made.lock().unwrap_or_else(|e| e.into_inner()).contains_key(name),
            None => self.tensors.contains_key(name),
        }
    }

    /// The tensor `name` with exactly `shape`, or an error naming both.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        if let Some(d) = &self.dummy {
            return d.make(name, shape);
        }
        let t = self.tensors.get(name).ok_or_else(|| LoadError::MissingTensor { name: name.into(), expected: shape.to_vec() })?;
        if t.shape != shape {
            return Err(LoadError::TensorShape { name: name.into(), expected: shape.to_vec(), actual: t.shape.clone() });
        }
        Ok(t.clone())
    }

    /// The first of several accepted names that exists (checked for `shape`), or an error naming the first.
    pub fn expect_any(&self, names: &[String], shape: &[usize]) -> Result<Tensor, LoadError> {
        if self.dummy.is_some() {
            return self.expect(&names[0], shape);
        }
        for n in names {
            if self.contains(n) {
                return self.expect(n, shape);
            }
        }
        Err(LoadError::MissingTensor { name: names[0].clone(), expected: shape.to_vec() })
    }

    /// Tensor-name prefix of the text model: `model.language_model.` in the multimodal checkpoint
    /// Google publishes, `model.` in a text-only (`Gemma4ForCausalLM`) one.
    pub fn text_prefix(&self) -> &'static str {
        if self.dummy.is_some() || self.contains("model.language_model.embed_tokens.weight") { "model.language_model." } else { "model." }
    }

    /// The tensors' names (for a dummy checkpoint, those made so far).
    pub fn names(&self) -> Vec<String> {
        match &self.dummy {
            Some(d) => d.made.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect(),
            None => self.tensors.keys().cloned().collect(),
        }
    }
}

impl Dummy {
    fn make(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        if let Some(t) = self.made.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            if t.shape != shape {
                return Err(LoadError::TensorShape { name: name.into(), expected: shape.to_vec(), actual: t.shape.clone() });
            }
            return Ok(t.clone());
        }
        let numel: usize = shape.iter().product();
        let size = self.dtype.size();
        let io = |source| LoadError::Io { path: PathBuf::from(format!("<dummy {name}>")), source };
        let mut map = memmap2::MmapMut::map_anon((numel * size).max(1)).map_err(io)?;
        // Chunks of 1 Mi values, each from its own stream (the name's hash and the chunk's index), filled
        // in parallel: the values do not depend on the thread count.
        const CHUNK: usize = 1 << 20;
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let dtype = self.dtype;
        // Vectors (norm weights, scalars, scales) in [0.5, 1.5): at vLLM's +-1e-3 the norms shrink every
        // activation towards the subnormal range, where f32 FMA on Intel cores slows several-fold
        // (avx2 batch-1 decode on the mid shapes: 23.4 tok/s against 58.0 with real weights), so the
        // benchmark would measure the wrong thing.
        let scales = shape.len() <= 1;
        switchyard_kernels::pool::for_each_chunk_mut(&mut map[..numel * size], CHUNK * size, &|i, bytes| {
            let mut s = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x2545_F491_4F6C_DD1D;
            let mut vals = vec![0f32; bytes.len() / size];
            for v in vals.iter_mut() {
                // xorshift64*, the top 24 bits as a uniform in [0, 1).
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u32 << 24) as f32;
                *v = if scales { 0.5 + u } else { (u * 2.0 - 1.0) * 1e-3 };
            }
            dtype.encode_into(&vals, bytes);
        });
        let map = Arc::new(map.make_read_only().map_err(io)?);
        let t = Tensor { map, start: 0, end: numel * size, dtype, shape: shape.to_vec(), name: name.to_string(), panels: Arc::default() };
        self.made.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), t.clone());
        Ok(t)
    }
}

fn load_file(path: &Path, out: &mut HashMap<String, Tensor>) -> Result<(), LoadError> {
    let bad = |reason: String| LoadError::Safetensors { path: path.into(), reason };
    let file = File::open(path).map_err(|source| LoadError::Io { path: path.into(), source })?;
    // SAFETY: the checkpoint is treated as read-only for the life of the process; a file truncated under
    // us is outside the contract (as for every mmap-based loader).
    #[allow(unsafe_code)]
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|source| LoadError::Io { path: path.into(), source })?);
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| bad(e.to_string()))?;
    let data_start = 8 + header_len;
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => {
                return Err(LoadError::TensorDtype { name, actual: format!("{other:?}") });
            }
        };
        let (s, e) = info.data_offsets;
        let numel: usize = info.shape.iter().product();
        if e - s != numel * dtype.size() || data_start + e > map.len() {
            return Err(bad(format!("tensor `{name}` has a byte range that does not match its shape")));
        }
        out.insert(
            name.clone(),
            Tensor {
                map: map.clone(),
                start: data_start + s,
                end: data_start + e,
                dtype,
                shape: info.shape.clone(),
                name,
                panels: Arc::default(),
            },
        );
    }
    Ok(())
}

//! A model directory as Hugging Face publishes it, found locally or downloaded from the hub.

use std::path::{Path, PathBuf};

use crate::error::LoadError;

/// The files of a checkpoint directory that Switchyard reads.
#[derive(Clone, Debug)]
pub struct ModelDir {
    pub path: PathBuf,
}

const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
];

impl ModelDir {
    /// `model` is a local directory, or a hub id such as `google/gemma-4-26B-A4B-it`.
    pub fn resolve(model: &str) -> Result<ModelDir, LoadError> {
        let p = Path::new(model);
        if p.is_dir() {
            return Ok(ModelDir { path: p.to_path_buf() });
        }
        if p.exists() {
            return Err(LoadError::Config(format!("`{model}` is a file; --model takes a checkpoint directory or a hub id")));
        }
        let looks_like_id = model.split('/').count() == 2 && !model.starts_with('.') && !model.starts_with('/');
        if !looks_like_id {
            return Err(LoadError::Config(format!("`{model}` is neither a directory nor a hub id of the form org/name")));
        }
        download(model)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Reads `generation_config.json` if present.
    pub fn generation_config(&self) -> Result<Option<serde_json::Value>, LoadError> {
        let p = self.file("generation_config.json");
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|source| LoadError::Io { path: p.clone(), source })?;
        serde_json::from_str(&text).map(Some).map_err(|source| LoadError::Json { path: p, source })
    }

    /// The tokenizer (`tokenizer.json`, loaded with the `tokenizers` crate).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, LoadError> {
        let p = self.file("tokenizer.json");
        tokenizers::Tokenizer::from_file(&p).map_err(|e| LoadError::Tokenizer { path: p, reason: e.to_string() })
    }

    /// The chat template: `chat_template.jinja`, else `chat_template` in `tokenizer_config.json`.
    pub fn chat_template(&self) -> Result<Option<String>, LoadError> {
        let p = self.file("chat_template.jinja");
        if p.exists() {
            return std::fs::read_to_string(&p).map(Some).map_err(|source| LoadError::Io { path: p, source });
        }
        let p = self.file("tokenizer_config.json");
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|source| LoadError::Io { path: p.clone(), source })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| LoadError::Json { path: p, source })?;
        Ok(v.get("chat_template").and_then(|t| t.as_str()).map(String::from))
    }
}

#[cfg(feature = "hub")]
fn download(id: &str) -> Result<ModelDir, LoadError> {
    use hf_hub::api::sync::ApiBuilder;
    let fail = |reason: String| LoadError::Download { id: id.into(), reason };
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v != "0") {
        return Err(fail("HF_HUB_OFFLINE is set and the model is not a local directory".into()));
    }
    let api = ApiBuilder::from_env().with_progress(true).build().map_err(|e| fail(e.to_string()))?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").map_err(|e| fail(format!("{e} (is the network reachable? pass a local directory otherwise)")))?;
    let dir = config.parent().expect("hub files live in a snapshot directory").to_path_buf();
    let index_name = "model.safetensors.index.json";
    let shards: Vec<String> = match repo.get(index_name) {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| fail(e.to_string()))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
            let mut s: Vec<String> =
                v["weight_map"].as_object().into_iter().flatten().filter_map(|(_, f)| f.as_str().map(String::from)).collect();
            s.sort();
            s.dedup();
            s
        }
        Err(_) => vec!["model.safetensors".into()],
    };
    for f in shards.iter().map(String::as_str).chain(SIDE_FILES.iter().copied().filter(|f| *f != "config.json")) {
        match repo.get(f) {
            Ok(_) => {}
            Err(e) if shards.iter().any(|s| s == f) => return Err(fail(format!("{f}: {e}"))),
            Err(_) => {} // side files are optional
        }
    }
    Ok(ModelDir { path: dir })
}

#[cfg(not(feature = "hub"))]
fn download(id: &str) -> Result<ModelDir, LoadError> {
    let _ = SIDE_FILES;
    Err(LoadError::Download { id: id.into(), reason: "this build has no hub support (cargo feature `hub`)".into() })
}

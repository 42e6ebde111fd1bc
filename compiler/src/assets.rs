//! The text assets an artifact carries beside its graph, read from the checkpoint directory:
//! tokenizer.json (verified to parse), the chat template and special-token strings
//! (tokenizer_config.json, chat_template.jinja) and generation_config.json's end-of-sequence ids.

use std::collections::BTreeSet;
use std::path::Path;

use llmc_frontend as frontend;
use llmc_runtime as runtime;

use crate::error::{Error, Result};

/// What the artifact carries besides the graph.
#[derive(Default)]
pub(crate) struct TextAssets {
    /// tokenizer.json's bytes, stored as the artifact's tokenizer blob.
    pub tokenizer: Option<Vec<u8>>,
    /// Whether a chat template was found (it is in the graph's metadata).
    pub chat_template: bool,
    /// Remarks for the report (a tokenizer larger than the model's vocabulary).
    pub notes: Vec<String>,
}

/// Reads `name` in `dir` as JSON if the file exists.
fn json_beside(dir: &Path, name: &str) -> Result<Option<serde_json::Value>> {
    let p = dir.join(name);
    match std::fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| Error::Input(format!("{}: not valid JSON: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Input(format!("{}: {e}", p.display()))),
    }
}

/// Collects the text assets of `m`'s checkpoint directory, writing the chat template, the
/// special-token strings and the merged `eos_token_id` into the graph's metadata. `vocab` is the
/// model's token vocabulary; a tokenizer with more tokens is noted.
pub(crate) fn text_assets(m: &mut frontend::Model, vocab: usize) -> Result<TextAssets> {
    use runtime::tokenizer::{BOS_TOKEN_META, CHAT_TEMPLATE_META, EOS_TOKEN_META};
    let mut assets = TextAssets::default();
    let dir = m.dir.clone();
    let tok_path = dir.join("tokenizer.json");
    if let Ok(bytes) = std::fs::read(&tok_path) {
        let t = runtime::Tokenizer::from_bytes(&tok_path.display().to_string(), &bytes)?;
        if t.vocab_size() > vocab {
            assets.notes.push(format!(
                "{} has {} tokens, more than the model's vocabulary of {vocab}; ids past it will be refused",
                tok_path.display(),
                t.vocab_size()
            ));
        }
        assets.tokenizer = Some(bytes);
    }
    let meta = &mut m.graph.meta;
    if let Some(cfg) = json_beside(&dir, "tokenizer_config.json")? {
        let template = match &cfg["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: the "default" one, else the first.
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or(list.first())
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        if let Some(t) = template {
            meta.insert(CHAT_TEMPLATE_META.into(), t);
        }
        for (key, field) in [(BOS_TOKEN_META, "bos_token"), (EOS_TOKEN_META, "eos_token")] {
            let v = &cfg[field];
            if let Some(s) = v.as_str().or_else(|| v["content"].as_str()) {
                meta.insert(key.into(), s.to_string());
            }
        }
    }
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        meta.insert(CHAT_TEMPLATE_META.into(), t);
    }
    assets.chat_template = meta.contains_key(CHAT_TEMPLATE_META);
    if let Some(gen) = json_beside(&dir, "generation_config.json")? {
        let mut ids: BTreeSet<u64> =
            meta.get("eos_token_id").map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).collect()).unwrap_or_default();
        match &gen["eos_token_id"] {
            serde_json::Value::Number(n) => ids.extend(n.as_u64()),
            serde_json::Value::Array(a) => ids.extend(a.iter().filter_map(|v| v.as_u64())),
            _ => {}
        }
        if !ids.is_empty() {
            meta.insert("eos_token_id".into(), ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        }
    }
    Ok(assets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    /// A copy of a fixture's files into a fresh directory under the system temp dir.
    fn copy_fixture(name: &str, to: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("llmc-compiler-assets-{to}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(fixture(name)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
            }
        }
        d
    }

    #[test]
    fn generation_config_eos_ids_merge_and_bad_json_is_named() {
        let d = copy_fixture("llama_mha", "eos");
        std::fs::write(d.join("generation_config.json"), r#"{"eos_token_id": [7, 3]}"#).unwrap();
        std::fs::write(d.join("chat_template.jinja"), "{{ messages }}").unwrap();
        let mut m = frontend::load(&d, &frontend::Options::default()).unwrap();
        m.graph.meta.insert("eos_token_id".into(), "5".into());
        let a = text_assets(&mut m, usize::MAX).unwrap();
        assert_eq!(m.graph.meta["eos_token_id"], "3,5,7");
        assert!(a.chat_template && a.notes.is_empty());
        std::fs::write(d.join("generation_config.json"), "{oops").unwrap();
        let e = text_assets(&mut m, usize::MAX).err().expect("bad JSON accepted").to_string();
        assert!(e.contains("generation_config.json") && e.contains("not valid JSON"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_tokenizer_larger_than_the_vocabulary_is_a_note() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/seedlm");
        let mut m = frontend::load(&dir, &frontend::Options::default()).unwrap();
        let a = text_assets(&mut m, 10).unwrap();
        assert!(a.tokenizer.is_some());
        assert_eq!(a.notes.len(), 1, "{:?}", a.notes);
        assert!(a.notes[0].contains("tokenizer.json") && a.notes[0].contains("vocabulary of 10"), "{:?}", a.notes);
    }
}

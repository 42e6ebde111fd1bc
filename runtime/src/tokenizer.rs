//! Text in and out: the checkpoint's `tokenizer.json` (carried in the artifact as a blob), streaming
//! detokenization, and chat templates.
//!
//! The tokenizer is Hugging Face's `tokenizers` crate built without C dependencies; chat templates
//! are Jinja rendered by `minijinja` with Hugging Face's settings (`trim_blocks`, `lstrip_blocks`,
//! Python string methods, `raise_exception`). Both sit behind the default-on `tokenizer` cargo
//! feature; the names below (where `llmc compile` stores things) exist without it.

/// Name of the blob holding `tokenizer.json`.
pub const TOKENIZER_BLOB: &str = "tokenizer.json";
/// Header `meta` key of the chat template (Jinja source from `tokenizer_config.json`).
pub const CHAT_TEMPLATE_META: &str = "chat_template";
/// Header `meta` keys of the special-token strings templates refer to.
pub const BOS_TOKEN_META: &str = "bos_token";
pub const EOS_TOKEN_META: &str = "eos_token";

#[cfg(feature = "tokenizer")]
pub use imp::*;

#[cfg(feature = "tokenizer")]
mod imp {
    use std::path::Path;

    use super::*;
    use crate::error::{Result, RuntimeError};
    use crate::model::Model;

    fn err(what: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Tokenizer(what.to_string())
    }

    /// A loaded `tokenizer.json`.
    pub struct Tokenizer {
        inner: tokenizers::Tokenizer,
    }

    impl Tokenizer {
        /// Parses `tokenizer.json` bytes; `origin` names them in errors.
        pub fn from_bytes(origin: &str, json: &[u8]) -> Result<Tokenizer> {
            let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| err(format!("{origin}: bad tokenizer.json: {e}")))?;
            Ok(Tokenizer { inner })
        }

        pub fn from_file(path: &Path) -> Result<Tokenizer> {
            let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
            Self::from_bytes(&path.display().to_string(), &bytes)
        }

        /// The tokenizer the artifact carries; an error naming the artifact when it has none.
        pub fn from_model(model: &Model) -> Result<Tokenizer> {
            let origin = model.path().display().to_string();
            match model.blob(TOKENIZER_BLOB) {
                Some(b) => Self::from_bytes(&origin, b),
                None => Err(err(format!(
                    "{origin}: the artifact carries no tokenizer (there was no tokenizer.json beside the checkpoint's \
                     config.json when it was compiled); pass token ids with --input-ids instead"
                ))),
            }
        }

        /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (a
        /// BOS token, for tokenizers that define one).
        pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
            let enc = self.inner.encode(text, add_special_tokens).map_err(|e| err(format!("tokenizing the prompt: {e}")))?;
            Ok(enc.get_ids().to_vec())
        }

        /// Token ids of `text` with special tokens and without padding (whatever `tokenizer.json`
        /// says), truncated to at most `max_len` ids including the special tokens, as
        /// transformers' `tokenizer(text, truncation=True, max_length=max_len)` (encoder input).
        pub fn encode_unpadded(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
            let mut t = self.inner.clone();
            t.with_padding(None);
            let trunc = tokenizers::TruncationParams { max_length: max_len, ..Default::default() };
            t.with_truncation(Some(trunc)).map_err(|e| err(format!("truncating to {max_len} tokens: {e}")))?;
            let enc = t.encode(text, true).map_err(|e| err(format!("tokenizing the text: {e}")))?;
            Ok(enc.get_ids().to_vec())
        }

        /// The text of `ids`; special tokens (BOS, EOS) are left out when `skip_special_tokens`.
        pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
            self.inner.decode(ids, skip_special_tokens).map_err(|e| err(format!("decoding tokens: {e}")))
        }

        /// The id of a token string (`"<|eos|>"`), if the vocabulary has it.
        pub fn token_to_id(&self, token: &str) -> Option<u32> {
            self.inner.token_to_id(token)
        }

        /// Vocabulary size including added tokens.
        pub fn vocab_size(&self) -> usize {
            self.inner.get_vocab_size(true)
        }

        /// An incremental decoder for a sequence generated token by token.
        pub fn stream(&self, skip_special_tokens: bool) -> TextStream<'_> {
            TextStream { tok: self, ids: Vec::new(), prefix: 0, read: 0, skip_special_tokens }
        }
    }

    /// Turns tokens into text as they arrive, never splitting a UTF-8 character: byte-level BPE
    /// tokens may each hold part of a character's bytes, so a piece is released only once its
    /// text no longer ends in a replacement character (U+FFFD). Decoding always starts a few
    /// tokens back (`prefix`) so that decoders which treat the first token specially (a leading
    /// space) see the same context as a whole-sequence decode. The pieces concatenate to
    /// `decode(all ids)`.
    pub struct TextStream<'a> {
        tok: &'a Tokenizer,
        ids: Vec<u32>,
        /// Start of the decoding context and end of what was already released.
        prefix: usize,
        read: usize,
        skip_special_tokens: bool,
    }

    impl TextStream<'_> {
        /// Adds a token; returns the newly completed text (empty while a character is partial).
        pub fn push(&mut self, id: u32) -> Result<String> {
            self.ids.push(id);
            let before = self.tok.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
            let now = self.tok.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
            if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
                let piece = now.get(before.len()..).unwrap_or_default().to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(piece)
            } else {
                Ok(String::new())
            }
        }

        /// Text still held back (an incomplete character at the very end), replacement characters
        /// included; call once at the end.
        pub fn finish(&mut self) -> Result<String> {
            if self.read == self.ids.len() {
                return Ok(String::new());
            }
            let before = self.tok.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
            let now = self.tok.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(now.get(before.len()..).unwrap_or_default().to_string())
        }

        /// All tokens pushed so far.
        pub fn ids(&self) -> &[u32] {
            &self.ids
        }
    }

    /// One chat turn.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct ChatMessage {
        pub role: String,
        pub content: String,
    }

    impl ChatMessage {
        pub fn new(role: &str, content: &str) -> ChatMessage {
            ChatMessage { role: role.into(), content: content.into() }
        }
    }

    /// A checkpoint's chat template with the special tokens it may print.
    #[derive(Clone, Debug)]
    pub struct ChatTemplate {
        pub source: String,
        pub bos_token: String,
        pub eos_token: String,
    }

    impl ChatTemplate {
        /// The template the artifact carries; an error naming the artifact when it has none.
        pub fn from_model(model: &Model) -> Result<ChatTemplate> {
            let source = model.meta(CHAT_TEMPLATE_META).ok_or_else(|| {
                err(format!(
                    "{}: the checkpoint has no chat template (no `chat_template` in tokenizer_config.json and no \
                     chat_template.jinja when it was compiled), so --chat cannot format a conversation; pass the \
                     prompt as plain text without --chat",
                    model.path().display()
                ))
            })?;
            Ok(ChatTemplate {
                source: source.to_string(),
                bos_token: model.meta(BOS_TOKEN_META).unwrap_or_default().to_string(),
                eos_token: model.meta(EOS_TOKEN_META).unwrap_or_default().to_string(),
            })
        }

        /// Renders `messages` as Hugging Face's `apply_chat_template(..., tokenize=False)` does.
        /// The result already holds any BOS text, so encode it without special tokens.
        pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
            use minijinja::{Environment, Error, ErrorKind, Value};
            let mut env = Environment::new();
            let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
            env.set_syntax(syntax.map_err(|e| err(format!("chat template syntax: {e}")))?);
            env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
            env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            });
            let tmpl = env.template_from_str(&self.source).map_err(|e| err(format!("chat template does not parse: {e}")))?;
            let msgs: Vec<Value> = messages
                .iter()
                .map(|m| {
                    let mut map = std::collections::BTreeMap::new();
                    map.insert("role".to_string(), Value::from(m.role.clone()));
                    map.insert("content".to_string(), Value::from(m.content.clone()));
                    Value::from(map)
                })
                .collect();
            let ctx = minijinja::context! {
                messages => msgs,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            };
            tmpl.render(ctx).map_err(|e| err(format!("chat template failed: {e}")))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn seedlm() -> Tokenizer {
            Tokenizer::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/seedlm/tokenizer.json")).unwrap()
        }

        #[test]
        fn encodes_like_transformers() {
            // models/seedlm/golden_greedy.json, prompt 0.
            let t = seedlm();
            let ids = t.encode("Quantization reduces the memory footprint of", true).unwrap();
            assert_eq!(ids, [50, 86, 1426, 1550, 725, 296, 1704, 286, 80, 317, 1591, 359]);
            assert_eq!(t.token_to_id("<|eos|>"), Some(1));
        }

        #[test]
        fn stream_never_splits_a_character_and_matches_whole_decode() {
            let t = seedlm();
            let text = "naïve café — 量子化 😀 ok";
            let ids = t.encode(text, false).unwrap();
            assert!(ids.len() > text.chars().count() / 2, "multi-byte characters take several tokens");
            let mut s = t.stream(true);
            let mut out = String::new();
            for &id in &ids {
                let piece = s.push(id).unwrap();
                assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} splits a character");
                out.push_str(&piece);
            }
            out.push_str(&s.finish().unwrap());
            assert_eq!(out, text);
            assert_eq!(out, t.decode(&ids, true).unwrap());
        }

        #[test]
        fn stream_skips_special_tokens() {
            let t = seedlm();
            let mut s = t.stream(true);
            let mut out = String::new();
            for id in t.encode("a<|eos|>b", false).unwrap() {
                out.push_str(&s.push(id).unwrap());
            }
            out.push_str(&s.finish().unwrap());
            assert_eq!(out, "ab");
        }

        #[test]
        fn chat_template_renders_with_hf_conventions() {
            let ct = ChatTemplate {
                source: "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'system' %}[S]{{ m.content.strip() }}\n  {% else %}<{{ m.role }}>{{ m.content }}{{ eos_token }}\n  {% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into(),
                bos_token: "<s>".into(),
                eos_token: "</s>".into(),
            };
            let msgs = [ChatMessage::new("system", "  be brief "), ChatMessage::new("user", "hi")];
            assert_eq!(ct.render(&msgs, true).unwrap(), "<s>[S]be brief\n<user>hi</s>\n<assistant>");
            assert_eq!(ct.render(&msgs, false).unwrap(), "<s>[S]be brief\n<user>hi</s>\n");
            let bad = ChatTemplate { source: "{{ raise_exception('no system role') }}".into(), ..ct };
            assert!(bad.render(&msgs, true).unwrap_err().to_string().contains("no system role"));
        }
    }
}

//! Typed, checked access to a Hugging Face `config.json`, and the settings every architecture shares
//! (architecture name, graph name, context length, token-id metadata).
//!
//! JSON `null` is treated as absent (transformers writes `"head_dim": null`, `"rope_scaling": null`).
//! Sizes must be positive integers no larger than [`MAX_DIM`]; the architectures multiply them with
//! checked arithmetic.

use serde_json::Value;

use crate::error::{field_err, FrontendError, Result};
use crate::{Options, SUPPORTED_ARCHITECTURES};

/// Largest accepted size field: token ids and positions are i32, and no real model dimension is
/// anywhere near it.
pub const MAX_DIM: usize = i32::MAX as usize;

/// Largest accepted count of repeated structures (the fields in [`COUNT_FIELDS`]: layers,
/// experts). Architectures build per-layer tables from these before every tensor is checked, so
/// an absurd count must fail here, not as an allocation of billions of entries; real models have
/// at most a few hundred.
pub const MAX_COUNT: usize = 1 << 16;
/// The size fields bounded by [`MAX_COUNT`].
pub const COUNT_FIELDS: &[&str] = &["num_hidden_layers", "n_layer", "num_layers", "num_local_experts", "num_experts"];

/// Default cap on the compiled context when [`Options::max_context`] is unset.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// A view of a JSON object whose error messages name fields by their dotted path.
#[derive(Clone, Copy, Debug)]
pub struct Cfg<'a> {
    v: &'a Value,
    prefix: &'a str,
}

impl<'a> Cfg<'a> {
    pub fn new(v: &'a Value) -> Self {
        Cfg { v, prefix: "" }
    }

    fn path(&self, field: &str) -> String {
        if self.prefix.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.prefix)
        }
    }

    /// The field's value; `null` reads as absent.
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        self.v.get(field).filter(|v| !v.is_null())
    }

    /// A nested object (`rope_scaling`, `rope_parameters`), or `None` when absent.
    pub fn object(&self, field: &'a str) -> Result<Option<Cfg<'a>>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) if v.is_object() => Ok(Some(Cfg { v, prefix: field })),
            Some(v) => Err(field_err(&self.path(field), format!("must be an object, got {v}"))),
        }
    }

    /// `hidden / heads` for a config whose `heads_field` must divide its hidden size.
    pub fn head_dim(&self, hidden: usize, heads: usize, heads_field: &str) -> Result<usize> {
        if hidden % heads != 0 {
            return Err(field_err(&self.path(heads_field), format!("{heads_field} ({heads}) must divide hidden_size ({hidden})")));
        }
        Ok(hidden / heads)
    }

    /// A required size: a positive integer no larger than [`MAX_DIM`].
    pub fn size(&self, field: &str) -> Result<usize> {
        match self.get(field) {
            Some(v) => self.size_value(field, v),
            None => Err(field_err(&self.path(field), "missing")),
        }
    }

    /// An optional size with a default.
    pub fn size_or(&self, field: &str, default: usize) -> Result<usize> {
        match self.get(field) {
            Some(v) => self.size_value(field, v),
            None => Ok(default),
        }
    }

    /// An optional size without a default.
    pub fn size_opt(&self, field: &str) -> Result<Option<usize>> {
        self.get(field).map(|v| self.size_value(field, v)).transpose()
    }

    fn size_value(&self, field: &str, v: &Value) -> Result<usize> {
        let name = self.path(field);
        match v.as_u64() {
            Some(0) => Err(field_err(&name, "must be positive, got 0")),
            Some(n) if n > MAX_COUNT as u64 && COUNT_FIELDS.contains(&field) => {
                Err(field_err(&name, format!("{n} is larger than the supported maximum {MAX_COUNT}")))
            }
            Some(n) if n <= MAX_DIM as u64 => Ok(n as usize),
            Some(n) => Err(field_err(&name, format!("{n} is larger than the supported maximum {MAX_DIM}"))),
            None => Err(field_err(&name, format!("must be a positive integer, got {v}"))),
        }
    }

    /// A required finite number.
    pub fn number(&self, field: &str) -> Result<f64> {
        match self.get(field) {
            Some(v) => self.number_value(field, v),
            None => Err(field_err(&self.path(field), "missing")),
        }
    }

    /// An optional finite number with a default.
    pub fn number_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            Some(v) => self.number_value(field, v),
            None => Ok(default),
        }
    }

    /// An optional finite number without a default.
    pub fn number_opt(&self, field: &str) -> Result<Option<f64>> {
        self.get(field).map(|v| self.number_value(field, v)).transpose()
    }

    fn number_value(&self, field: &str, v: &Value) -> Result<f64> {
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(field_err(&self.path(field), format!("must be a finite number, got {v}"))),
        }
    }

    /// An optional boolean with a default.
    pub fn flag_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(field_err(&self.path(field), format!("must be true or false, got {v}"))),
        }
    }

    /// An optional string.
    pub fn string_opt(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(field_err(&self.path(field), format!("must be a string, got {v}"))),
        }
    }

    /// A config-field error naming `field` by its full dotted path.
    pub fn err(&self, field: &str, msg: impl Into<String>) -> FrontendError {
        field_err(&self.path(field), msg)
    }

    /// A positive float (epsilons, RoPE theta, scaling factors).
    pub fn positive(&self, field: &str, x: f64) -> Result<f64> {
        if x > 0.0 {
            Ok(x)
        } else {
            Err(field_err(&self.path(field), format!("must be positive, got {x}")))
        }
    }
}

/// The architecture to compile: the first entry of `architectures`, or, when the list is absent,
/// the one `model_type` implies. An architecture llmc does not support is an error naming it.
pub fn architecture(config: &Value) -> Result<&'static str> {
    let cfg = Cfg::new(config);
    let name: String = match cfg.get("architectures") {
        Some(Value::Array(list)) => match list.first() {
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(field_err("architectures", format!("entries must be strings, got {v}"))),
            None => return Err(field_err("architectures", "is empty")),
        },
        Some(v) => return Err(field_err("architectures", format!("must be a list of names, got {v}"))),
        None => match cfg.string_opt("model_type")? {
            Some("gpt2") => "GPT2LMHeadModel".into(),
            Some("gpt_neox") => "GPTNeoXForCausalLM".into(),
            Some("bert") => "BertModel".into(),
            Some(t) => match crate::llama::Family::ALL.iter().find(|f| f.model_type() == t) {
                Some(f) => f.architecture().into(),
                None => return Err(FrontendError::UnsupportedArchitecture { name: format!("model_type {t}") }),
            },
            None => return Err(field_err("architectures", "missing (and no model_type to infer it from)")),
        },
    };
    SUPPORTED_ARCHITECTURES
        .iter()
        .copied()
        .find(|a| *a == name)
        .ok_or(FrontendError::UnsupportedArchitecture { name })
}

/// The graph name: `model_type` with characters outside `[A-Za-z0-9_.-]` replaced by `_`.
pub fn graph_name(config: &Value, fallback: &str) -> Result<String> {
    let t = Cfg::new(config).string_opt("model_type")?.unwrap_or(fallback);
    let s: String = t.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' }).collect();
    Ok(if s.is_empty() { fallback.to_string() } else { s })
}

/// The compiled context length: `min(cap, max_positions)` where `cap` is
/// [`Options::max_context`] or [`DEFAULT_MAX_CONTEXT`].
pub fn context_len(opts: &Options, max_positions: usize) -> Result<usize> {
    let cap = match opts.max_context {
        Some(0) => {
            return Err(FrontendError::InvalidOption { name: "max_context".into(), msg: "must be positive".into() })
        }
        Some(c) => c,
        None => DEFAULT_MAX_CONTEXT,
    };
    Ok(cap.min(max_positions))
}

/// `bos_token_id` / `eos_token_id` as metadata strings (a list of ids is written comma-separated);
/// `None` when the field is absent.
pub fn token_ids(config: &Value, field: &str) -> Result<Option<String>> {
    let one = |v: &Value| -> Result<String> {
        v.as_u64().map(|n| n.to_string()).ok_or_else(|| field_err(field, format!("token ids must be non-negative integers, got {v}")))
    };
    match Cfg::new(config).get(field) {
        None => Ok(None),
        Some(Value::Array(list)) => {
            let ids: Vec<String> = list.iter().map(one).collect::<Result<_>>()?;
            Ok(if ids.is_empty() { None } else { Some(ids.join(",")) })
        }
        Some(v) => one(v).map(Some),
    }
}

/// Checked product of sizes; `what` names the config-derived quantity in the error.
pub fn mul(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .filter(|&n| n <= MAX_DIM)
        .ok_or_else(|| field_err(what, format!("{a} x {b} is larger than the supported maximum {MAX_DIM}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_are_checked() {
        let v = json!({"a": 4, "z": 0, "neg": -3, "f": 2.5, "huge": 1u64 << 40, "s": "x", "n": null});
        let c = Cfg::new(&v);
        assert_eq!(c.size("a").unwrap(), 4);
        for f in ["z", "neg", "f", "huge", "s", "missing", "n"] {
            let e = c.size(f).unwrap_err().to_string();
            assert!(e.contains(f), "{e}");
        }
        assert_eq!(c.size_or("n", 7).unwrap(), 7);
        let v = json!({"num_hidden_layers": 2_000_000_000u64, "hidden_size": 2_000_000_000u64});
        let e = Cfg::new(&v).size("num_hidden_layers").unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers") && e.contains("65536"), "{e}");
        assert_eq!(Cfg::new(&v).size("hidden_size").unwrap(), 2_000_000_000);
    }

    #[test]
    fn nested_fields_name_their_path() {
        let v = json!({"rope_scaling": {"factor": "big"}});
        let r = Cfg::new(&v).object("rope_scaling").unwrap().unwrap();
        let e = r.number("factor").unwrap_err().to_string();
        assert!(e.contains("rope_scaling.factor"), "{e}");
    }

    #[test]
    fn token_ids_accept_lists() {
        let v = json!({"eos_token_id": [128001, 128009], "bos_token_id": 1, "pad": "x"});
        assert_eq!(token_ids(&v, "eos_token_id").unwrap().as_deref(), Some("128001,128009"));
        assert_eq!(token_ids(&v, "bos_token_id").unwrap().as_deref(), Some("1"));
        assert_eq!(token_ids(&v, "nothing").unwrap(), None);
        assert!(token_ids(&v, "pad").is_err());
    }

    #[test]
    fn graph_names_are_sanitized() {
        assert_eq!(graph_name(&json!({"model_type": "llama"}), "m").unwrap(), "llama");
        assert_eq!(graph_name(&json!({"model_type": "my model/v2"}), "m").unwrap(), "my_model_v2");
        assert_eq!(graph_name(&json!({}), "gpt2").unwrap(), "gpt2");
    }

    #[test]
    fn context_is_capped() {
        assert_eq!(context_len(&Options::default(), 131072).unwrap(), DEFAULT_MAX_CONTEXT);
        assert_eq!(context_len(&Options { max_context: Some(64) }, 1024).unwrap(), 64);
        assert_eq!(context_len(&Options { max_context: Some(9999) }, 1024).unwrap(), 1024);
        assert!(context_len(&Options { max_context: Some(0) }, 1024).is_err());
    }
}

//! Sentence embeddings from encoder artifacts (header meta `task = embedding`, compiled from a
//! `BertModel` checkpoint): one encoder pass over the token ids gives every token's hidden state,
//! which is pooled into one vector and optionally L2-normalized as the artifact's metadata says
//! (`pooling`, `normalize`), the way sentence-transformers' Pooling and Normalize modules do it.
//!
//! An encoder pass sees the whole input at once (bidirectional attention, no KV cache), so the
//! input must fit one step (`max_chunk` tokens) and every pass starts from an empty session.

use crate::error::{Result, RuntimeError};
use crate::model::{Model, Session};

/// How token states become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Average over the tokens.
    Mean,
    /// The first token's (`[CLS]`) state.
    Cls,
    /// Per channel maximum over the tokens.
    Max,
    /// Sum over the tokens divided by the square root of their count.
    MeanSqrtLen,
}

impl Pooling {
    /// The mode named as in the artifact's `pooling` meta.
    pub fn from_name(name: &str) -> Option<Pooling> {
        Some(match name {
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            "max" => Pooling::Max,
            "mean_sqrt_len" => Pooling::MeanSqrtLen,
            _ => return None,
        })
    }

    /// Pools `hidden` (`n` rows of `h` floats, all tokens attended) into `h` floats.
    pub fn apply(self, hidden: &[f32], n: usize, h: usize) -> Vec<f32> {
        assert_eq!(hidden.len(), n * h, "hidden states must be n x h");
        let rows = hidden.chunks_exact(h.max(1));
        match self {
            Pooling::Cls => hidden[..h].to_vec(),
            Pooling::Max => {
                let mut out = vec![f32::NEG_INFINITY; h];
                for row in rows {
                    for (o, &x) in out.iter_mut().zip(row) {
                        *o = o.max(x);
                    }
                }
                out
            }
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let mut sum = vec![0.0f64; h];
                for row in rows {
                    for (s, &x) in sum.iter_mut().zip(row) {
                        *s += x as f64;
                    }
                }
                let d = if self == Pooling::Mean { n as f64 } else { (n as f64).sqrt() };
                sum.iter().map(|&s| (s / d.max(1e-9)) as f32).collect()
            }
        }
    }
}

/// Scales `v` to unit L2 norm: `v / max(|v|, 1e-12)` (PyTorch's `F.normalize`).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt().max(1e-12);
    for x in v.iter_mut() {
        *x = (*x as f64 / norm) as f32;
    }
}

/// What an encoder artifact says about its sentence vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingSpec {
    pub pooling: Pooling,
    pub normalize: bool,
    /// Longest token sequence to feed (the tokenizer truncates to it).
    pub max_seq_length: usize,
    /// Width of the vectors.
    pub dim: usize,
}

impl EmbeddingSpec {
    /// The spec of `model`; an error naming the artifact when it is not an encoder.
    pub fn of(model: &Model) -> Result<EmbeddingSpec> {
        let path = model.path().display();
        if model.meta("task") != Some("embedding") {
            return Err(RuntimeError::InvalidArgument(format!(
                "{path}: not an embedding model (architecture {}); `embed` needs an encoder such as BertModel",
                model.meta("architecture").unwrap_or("unknown")
            )));
        }
        let name = model.meta("pooling").unwrap_or("mean");
        let pooling = Pooling::from_name(name).ok_or_else(|| RuntimeError::Corrupt {
            path: model.path().to_path_buf(),
            msg: format!("unknown pooling mode `{name}`"),
        })?;
        let one_step = (model.header().max_chunk as usize).min(model.max_context());
        let max_seq_length = model.meta("max_seq_length").and_then(|v| v.parse().ok()).unwrap_or(one_step);
        Ok(EmbeddingSpec {
            pooling,
            normalize: model.meta("normalize") == Some("true"),
            max_seq_length,
            dim: model.vocab_size(),
        })
    }
}

/// The sentence vector of `ids` (special tokens included): resets `session`, runs one encoder
/// pass, pools and normalizes as the artifact says.
pub fn embed(session: &mut Session, ids: &[u32]) -> Result<Vec<f32>> {
    let model = session.model().clone();
    let spec = EmbeddingSpec::of(&model)?;
    let chunk = model.header().max_chunk as usize;
    if ids.len() > chunk {
        return Err(RuntimeError::InvalidArgument(format!(
            "{} tokens do not fit one encoder step of {chunk} tokens: recompile with --max-chunk {}",
            ids.len(),
            ids.len()
        )));
    }
    session.reset();
    let hidden = session.forward(ids, true)?;
    session.reset();
    let mut v = spec.pooling.apply(&hidden, ids.len(), spec.dim);
    if spec.normalize {
        normalize(&mut v);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes() {
        let h = [1.0, -2.0, 3.0, 4.0, 0.0, -6.0]; // 3 tokens x 2
        assert_eq!(Pooling::Mean.apply(&h, 3, 2), vec![4.0 / 3.0, -4.0 / 3.0]);
        assert_eq!(Pooling::Cls.apply(&h, 3, 2), vec![1.0, -2.0]);
        assert_eq!(Pooling::Max.apply(&h, 3, 2), vec![3.0, 4.0]);
        let s = 3f64.sqrt();
        assert_eq!(Pooling::MeanSqrtLen.apply(&h, 3, 2), vec![(4.0 / s) as f32, (-4.0 / s) as f32]);
        for (n, p) in [
            ("mean", Pooling::Mean),
            ("cls", Pooling::Cls),
            ("max", Pooling::Max),
            ("mean_sqrt_len", Pooling::MeanSqrtLen),
        ] {
            assert_eq!(Pooling::from_name(n), Some(p));
        }
        assert_eq!(Pooling::from_name("weighted"), None);
    }

    #[test]
    fn normalize_gives_unit_vectors_and_keeps_zero() {
        let mut v = vec![3.0, -4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, -0.8]);
        let mut z = vec![0.0; 3];
        normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }
}

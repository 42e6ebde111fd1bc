//! Element types and shapes with symbolic dimensions.
//!
//! A graph describes one forward step over `S` new tokens with `P` tokens already in the KV cache;
//! `T = P + S` is the total attended length. Every other dimension is a compile-time constant.

use std::fmt;

/// Element type of a tensor. Weights may be *stored* in f16/bf16 and are computed in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }
    pub fn from_name(s: &str) -> Option<DType> {
        Some(match s {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "i32" => DType::I32,
            _ => return None,
        })
    }
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a 2-D weight `[N, K]` is stored. The value's type stays the logical `f32[N, K]`; a packed
/// layout means the value *is* the dequantized tensor: round-to-nearest quantize then dequantize
/// ([`crate::quant::fake_quant`]), so every backend must be exact to the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// Plain f32 (the checkpoint's values); not printed.
    #[default]
    Dense,
    /// int8, symmetric, one f32 scale per row (per output channel): `w = q * scale`, `q` in -127..=127.
    Int8,
    /// int4 in groups of `group` consecutive elements along `K` (the last group of a row may be
    /// partial), one f32 scale per group; symmetric (`q` in -8..=7, `w = q * scale`) or `asym`
    /// (`q` in 0..=15 with a zero point per group, `w = (q - zero) * scale`).
    Int4 { group: usize, asym: bool },
    /// 2:4 structured sparsity along `K` (`K` a multiple of 4): in each aligned group of 4
    /// elements the two of largest magnitude are kept (ties: the lower index), the others are 0.
    /// Stored as the kept values and their 2-bit indices; with `int8` the kept values are int8
    /// codes with one f32 scale per row (`max|kept| / 127`), as [`Layout::Int8`].
    Sparse24 { int8: bool },
    /// W8A8: the weight as [`Layout::Int8`], and every product reading it as its right-hand side
    /// quantizes its left-hand side per row (per token) to int8 first: `x = q * s` with
    /// `s = max|x_row| / 127`, `q = round_ties_even(x * (127 / max|x_row|))` in -127..=127
    /// ([`crate::quant::quantize_act`]); a zero row stays zero.
    W8A8,
    /// W4A8: the weight as symmetric [`Layout::Int4`] with groups of `group` (a multiple of 32),
    /// the left-hand side of its products quantized per token as for [`Layout::W8A8`].
    W4A8 { group: usize },
}

impl Layout {
    /// The printed name: `int8`, `int4_g32`, `int4_g128_asym` (`dense` for [`Layout::Dense`]).
    pub fn name(self) -> String {
        match self {
            Layout::Dense => "dense".into(),
            Layout::Int8 => "int8".into(),
            Layout::Int4 { group, asym } => format!("int4_g{group}{}", if asym { "_asym" } else { "" }),
            Layout::Sparse24 { int8: false } => "sparse24".into(),
            Layout::Sparse24 { int8: true } => "sparse24_int8".into(),
            Layout::W8A8 => "w8a8".into(),
            Layout::W4A8 { group } => format!("w4a8_g{group}"),
        }
    }
    pub fn from_name(s: &str) -> Option<Layout> {
        Some(match s {
            "dense" => Layout::Dense,
            "int8" => Layout::Int8,
            "sparse24" => Layout::Sparse24 { int8: false },
            "sparse24_int8" => Layout::Sparse24 { int8: true },
            "w8a8" => Layout::W8A8,
            _ if s.starts_with("w4a8_g") => {
                let group: usize = s["w4a8_g".len()..].parse().ok()?;
                if group == 0 || !group.is_multiple_of(32) {
                    return None;
                }
                Layout::W4A8 { group }
            }
            _ => {
                let rest = s.strip_prefix("int4_g")?;
                let (g, asym) = match rest.strip_suffix("_asym") {
                    Some(g) => (g, true),
                    None => (rest, false),
                };
                let group: usize = g.parse().ok()?;
                if group == 0 || !group.is_multiple_of(2) {
                    return None;
                }
                Layout::Int4 { group, asym }
            }
        })
    }
    /// The weight-side format: [`Layout::W8A8`] stores [`Layout::Int8`] codes, [`Layout::W4A8`]
    /// symmetric [`Layout::Int4`] codes; others are their own.
    pub fn weight_format(self) -> Layout {
        match self {
            Layout::W8A8 => Layout::Int8,
            Layout::W4A8 { group } => Layout::Int4 { group, asym: false },
            l => l,
        }
    }
    /// Whether products reading a weight of this layout quantize their activations per token.
    pub fn quantizes_activations(self) -> bool {
        matches!(self, Layout::W8A8 | Layout::W4A8 { .. })
    }
    /// Storage bits per weight element, scales and zero points included, for a row of `k` elements.
    pub fn bits_per_weight(self, k: usize) -> f64 {
        if self.weight_format() != self {
            return self.weight_format().bits_per_weight(k);
        }
        let k = k.max(1) as f64;
        match self {
            Layout::Dense => 32.0,
            Layout::Int8 | Layout::W8A8 | Layout::W4A8 { .. } => 8.0 + 32.0 / k,
            // Half-precision scales (and zero points).
            Layout::Int4 { group, asym } => {
                let groups = (k / group as f64).ceil();
                4.0 + groups * (if asym { 32.0 } else { 16.0 }) / k
            }
            // Per 4 elements: two kept values and two 2-bit indices.
            Layout::Sparse24 { int8: false } => (2.0 * 32.0 + 4.0) / 4.0,
            Layout::Sparse24 { int8: true } => (2.0 * 8.0 + 4.0) / 4.0 + 32.0 / k,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One dimension of a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    /// A compile-time constant.
    N(usize),
    /// Tokens processed by this step (the sequence length of a prefill chunk; 1 for decode).
    S,
    /// Tokens already in the KV cache before this step.
    P,
    /// `P + S`: the attended length after this step's tokens are appended.
    T,
}

impl Dim {
    pub fn is_const(self) -> bool {
        matches!(self, Dim::N(_))
    }
    pub fn as_const(self) -> Option<usize> {
        match self {
            Dim::N(n) => Some(n),
            _ => None,
        }
    }
    /// The concrete value under `b`.
    pub fn eval(self, b: Bindings) -> usize {
        match self {
            Dim::N(n) => n,
            Dim::S => b.s,
            Dim::P => b.p,
            Dim::T => b.p + b.s,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::N(n) => write!(f, "{n}"),
            Dim::S => f.write_str("S"),
            Dim::P => f.write_str("P"),
            Dim::T => f.write_str("T"),
        }
    }
}

/// Values of the symbolic dimensions for one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Bindings {
    pub s: usize,
    pub p: usize,
}

/// The type of a value: element type and row-major (contiguous) shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Self {
        TensorType { dtype, shape }
    }
    pub fn f32(shape: Vec<Dim>) -> Self {
        TensorType::new(DType::F32, shape)
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Concrete shape under `b`.
    pub fn eval_shape(&self, b: Bindings) -> Vec<usize> {
        self.shape.iter().map(|d| d.eval(b)).collect()
    }
    /// Number of elements under `b`.
    pub fn numel(&self, b: Bindings) -> usize {
        self.shape.iter().map(|d| d.eval(b)).product()
    }
    /// Element count when every dimension is constant.
    pub fn static_numel(&self) -> Option<usize> {
        self.shape.iter().map(|d| d.as_const()).product()
    }
    /// Product of the constant dimensions and the sorted list of symbolic ones:
    /// two shapes with equal keys have equal element counts for every binding.
    pub fn numel_key(&self) -> (usize, Vec<Dim>) {
        let mut c = 1;
        let mut syms = Vec::new();
        for d in &self.shape {
            match d {
                Dim::N(n) => c *= n,
                s => syms.push(*s),
            }
        }
        syms.sort();
        (c, syms)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

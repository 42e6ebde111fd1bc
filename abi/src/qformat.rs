//! Packed quantized weights: the byte format of one weight row, written by the compiler
//! ([`QFormat::encode_row`]) and read by the runtime's microkernels, the generated CPU and GPU
//! kernels, and [`QFormat::dequant_row`]. This file is the one definition of those bytes.
//!
//! ## Row format
//! A `[N, K]` weight is stored as `N` self-contained row records of [`QFormat::row_bytes`] bytes
//! (so a row-wise `concat {axis = 0}` of packed weights is the concatenation of their bytes):
//! the scales (one f32 per row; for int4 and W4A8 one IEEE half per group, as GGUF's Q4_0 stores
//! them: 4.5 bits per weight at group 32), then for asymmetric int4 one half zero point per
//! group, then the codes ([`QFormat::codes_at`]):
//! - int8: `K` signed bytes, padded to 4; `w = q * scale`.
//! - int4: blocks of 32 elements in 16 bytes, byte `i` of a block holding element `i` in its low
//!   nibble and element `16 + i` in its high nibble; symmetric codes stored as `q + 8`, so
//!   `w = (c - 8) * scale` (asymmetric: `w = (c - zero) * scale`). A partial last block is padded
//!   with code 0. Groups are a multiple of 16 elements (a group's scale covers whole halves of
//!   blocks); the last group of a row may be partial.
//! - 2:4: the two kept values of each aligned group of 4 in element order (f32, or int8 codes
//!   padded to 4 bytes after the row's one scale), then one byte per two groups: the kept indices
//!   `a < b` of the even group as `a | b << 2` in bits 0..4, the odd group's in bits 4..8 (padded
//!   to 4 bytes). `K` is a multiple of 4.
//! - W8A8: the scale, the row's code sum (i32), then the int8 codes padded to 16.
//! - W4A8: exactly a symmetric int4 row (groups a multiple of 32).
//!
//! ## Quantized activation rows
//! W8A8 and W4A8 products quantize each activation row to int8 codes `q` (one scale per row, as
//! `ir::quant::quantize_act`) and hand the kernels ([`crate::ukernel::QGemvFn`],
//! [`crate::ukernel::QGemmA8Fn`]) the codes in the layout the VNNI `vpdpbusd` steps read
//! ([`QFormat::act_bytes`], [`QFormat::act_at`], [`QFormat::aux_words`]):
//! - W8A8: the codes stored as `q + 128` (the unsigned operand) in element order, padded to a
//!   multiple of 32 with 128.
//! - W4A8: signed codes, padded with 0, in two regions. The first `512 · ⌊K / 512⌋` elements go
//!   in *super-steps* of 16 blocks (512 elements), laid out so that each 32-bit lane of a
//!   64-byte vector belongs to one block: lane `L` holds block `β(L) = 4 · (L % 4) + L / 4` of
//!   the super-step, and vector `4h + j` (`h` = 0 for a block's first 16 codes, 1 for its last
//!   16; `j` = 0..4) holds codes `16h + 4j .. 16h + 4j + 4` of each lane's block. That is the
//!   order the packed rows' code bytes take after a 4 x 4 transpose of 32-bit words within each
//!   128-bit lane, so 8 `vpdpbusd` give 16 blocks' sums in 16 lanes, converted and scaled once.
//!   The remaining elements go in *steps* of 4 blocks (128 elements): the first 16 codes of the
//!   four blocks (16 bytes each, block order), then their last 16, padded to a whole step.
//!   Beside the codes, `aux`: `-8 · Σ` of block `b`'s codes, the term that turns the stored
//!   nibbles `c = w + 8` back into `w`, at word [`QFormat::aux_at`]`(b)` (16 words per super-step
//!   in lane order, then 16 per step with block `4t + i` at word `4i`, the others 0).
//!
//! Every value decodes as `(q - zero) as f32 * scale` in f32, exactly as `ir::quant` (the
//! interpreter) computes it; the round-trip test below checks that for every format on ragged `K`.

use std::fmt;

use crate::error::{AbiError, Result};

/// A packed row format (the compiler's quantized `Layout`s that are stored packed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QFormat {
    Int8,
    /// int4 in groups of `group` elements (a multiple of 16), symmetric or `asym`.
    Int4 { group: usize, asym: bool },
    /// 2:4 sparsity, kept values as f32 or (`int8`) int8 codes with one scale per row.
    Sparse24 { int8: bool },
    W8A8,
    /// Weights as symmetric int4 in groups of `group` (a multiple of 32), activations int8.
    W4A8 { group: usize },
}

impl fmt::Display for QFormat {
    /// The layout's name as the IR prints it (`int8`, `int4_g32_asym`, `sparse24_int8`, ...).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QFormat::Int8 => write!(f, "int8"),
            QFormat::Int4 { group, asym } => write!(f, "int4_g{group}{}", if asym { "_asym" } else { "" }),
            QFormat::Sparse24 { int8: false } => write!(f, "sparse24"),
            QFormat::Sparse24 { int8: true } => write!(f, "sparse24_int8"),
            QFormat::W8A8 => write!(f, "w8a8"),
            QFormat::W4A8 { group } => write!(f, "w4a8_g{group}"),
        }
    }
}

/// One row's contents as [`QFormat::encode_row`] takes them (borrowed; [`RowBuf`] owns them).
/// Fields a format does not store are empty.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Row<'a> {
    /// `K` codes: int8 in -127..=127 (int8, W8A8, 2:4 int8, where pruned elements' codes are not
    /// stored); int4 in -8..=7 (symmetric, W4A8) or 0..=15 (asymmetric). Empty for 2:4 f32.
    pub codes: &'a [i8],
    /// One scale per row (int8, W8A8, 2:4 int8) or per group (int4, W4A8); none for 2:4 f32.
    pub scales: &'a [f32],
    /// Asymmetric int4: one zero point per group, in 0..=15.
    pub zeros: &'a [i8],
    /// 2:4: the kept indices `(a, b)`, `a < b < 4`, of each aligned group of 4 (`K / 4` pairs).
    pub kept: &'a [(u8, u8)],
    /// 2:4 f32: the row's `K` values (the kept ones are stored as they are).
    pub values: &'a [f32],
}

/// An owned [`Row`]: what [`QFormat::unpack_row`] reads back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowBuf {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub zeros: Vec<i8>,
    pub kept: Vec<(u8, u8)>,
    /// 2:4 f32: the `K` values, 0 where pruned.
    pub values: Vec<f32>,
}

impl RowBuf {
    pub fn as_row(&self) -> Row<'_> {
        Row { codes: &self.codes, scales: &self.scales, zeros: &self.zeros, kept: &self.kept, values: &self.values }
    }
}

fn f32_at(row: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
}

/// The `i`-th IEEE half of `row`, widened (exactly) to f32.
fn f16_at(row: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32()
}

impl QFormat {
    /// Scales per row (`ceil(K / group)` for int4, else 1).
    pub fn groups(self, k: usize) -> usize {
        match self {
            QFormat::Int4 { group, .. } | QFormat::W4A8 { group } => k.div_ceil(group.max(1)),
            _ => 1,
        }
    }

    /// Byte offset of the codes in a row record.
    pub fn codes_at(self, k: usize) -> usize {
        match self {
            QFormat::Sparse24 { int8 } => 4 * int8 as usize,
            QFormat::W8A8 => 8, // scale, then the row's code sum (i32)
            QFormat::Int4 { asym, .. } => 2 * self.groups(k) * (1 + asym as usize),
            QFormat::W4A8 { .. } => 2 * self.groups(k),
            QFormat::Int8 => 4,
        }
    }

    /// Bytes of a row's codes.
    pub fn code_bytes(self, k: usize) -> usize {
        match self {
            QFormat::Int4 { .. } | QFormat::W4A8 { .. } => k.div_ceil(32) * 16,
            QFormat::W8A8 => k.div_ceil(16) * 16,
            QFormat::Sparse24 { int8 } => Self::sparse_idx_at(int8, k) + (k / 4).div_ceil(2).div_ceil(4) * 4,
            QFormat::Int8 => k.div_ceil(4) * 4,
        }
    }

    /// Byte offset, from the codes, of a 2:4 row's index bytes: after the `K / 2` kept values
    /// (f32, or int8 padded to 4 bytes).
    pub fn sparse_idx_at(int8: bool, k: usize) -> usize {
        if int8 { (k / 2).div_ceil(4) * 4 } else { 4 * (k / 2) }
    }

    /// Bytes of one packed row of `k` elements.
    pub fn row_bytes(self, k: usize) -> usize {
        self.codes_at(k) + self.code_bytes(k)
    }

    /// Whether the activations are quantized too (the `QGEMV_A8` and `QGEMM_A8` microkernels).
    pub fn a8(self) -> bool {
        matches!(self, QFormat::W8A8 | QFormat::W4A8 { .. })
    }

    /// Bytes of one quantized activation row of `k` elements (see the module docs): W8A8 `k`
    /// rounded up to 32; W4A8 its super-steps and its steps (the rest rounded up to 128); 0 for
    /// the weight-only formats.
    pub fn act_bytes(self, k: usize) -> usize {
        match self {
            QFormat::W8A8 => k.div_ceil(32) * 32,
            QFormat::W4A8 { .. } => k / 512 * 512 + (k % 512).div_ceil(128) * 128,
            _ => 0,
        }
    }

    /// Byte position of element `e`'s code in a quantized activation row of `k` elements: `e`
    /// for W8A8, the super-step or step order for W4A8.
    pub fn act_at(self, k: usize, e: usize) -> usize {
        match self {
            QFormat::W4A8 { .. } => {
                let sup = k / 512 * 512;
                if e < sup {
                    let (u, blk, i) = (e / 512, e % 512 / 32, e % 32);
                    512 * u + 64 * (i / 4) + 4 * Self::lane_of(blk) + i % 4
                } else {
                    let e = e - sup;
                    sup + 128 * (e / 128) + 64 * (e / 16 % 2) + 16 * (e / 32 % 4) + e % 16
                }
            }
            _ => e,
        }
    }

    /// The 32-bit lane of a W4A8 super-step that holds its block `blk` (`blk < 16`; the map is its
    /// own inverse: lane `L` holds block `lane_of(L)`).
    pub fn lane_of(blk: usize) -> usize {
        4 * (blk % 4) + blk / 4
    }

    /// i32 words of a quantized activation row's `aux` (W4A8: 16 per super-step and per step);
    /// 0 for W8A8, which has none.
    pub fn aux_words(self, k: usize) -> usize {
        match self {
            QFormat::W4A8 { .. } => 16 * (k / 512) + 16 * (k % 512).div_ceil(128),
            _ => 0,
        }
    }

    /// The `aux` word of W4A8 block `b` in a row of `k` elements.
    pub fn aux_at(k: usize, b: usize) -> usize {
        let sup = k / 512 * 16;
        if b < sup { 16 * (b / 16) + Self::lane_of(b % 16) } else { sup + 4 * (b - sup) }
    }

    /// Whether the format's parameters are ones the kernels read: int4 groups a positive multiple
    /// of 16, W4A8 groups a positive multiple of 32.
    pub fn is_valid(self) -> bool {
        match self {
            QFormat::Int4 { group, .. } => group > 0 && group.is_multiple_of(16),
            QFormat::W4A8 { group } => group > 0 && group.is_multiple_of(32),
            _ => true,
        }
    }

    /// The format as the `fmt` argument of a `QGemvFn`/`QGemmFn` ([`crate::ukernel`]): a tag in
    /// bits 0..8, the asymmetric flag in bit 8, the group from bit 16.
    pub fn arg(self) -> i64 {
        let (tag, asym, group) = match self {
            QFormat::Int8 => (0, false, 0),
            QFormat::Int4 { group, asym } => (1, asym, group),
            QFormat::Sparse24 { int8: false } => (2, false, 0),
            QFormat::Sparse24 { int8: true } => (3, false, 0),
            QFormat::W8A8 => (4, false, 0),
            QFormat::W4A8 { group } => (5, false, group),
        };
        tag | (asym as i64) << 8 | (group as i64) << 16
    }

    /// The inverse of [`arg`](Self::arg) (`None` for a value no valid format encodes to).
    pub fn from_arg(v: i64) -> Option<QFormat> {
        let group = (v >> 16) as usize;
        let asym = v >> 8 & 1 == 1;
        let f = match v & 0xff {
            0 => QFormat::Int8,
            1 => QFormat::Int4 { group, asym },
            2 => QFormat::Sparse24 { int8: false },
            3 => QFormat::Sparse24 { int8: true },
            4 => QFormat::W8A8,
            5 => QFormat::W4A8 { group },
            _ => return None,
        };
        (f.is_valid() && f.arg() == v).then_some(f)
    }

    fn err(self, k: usize, msg: impl Into<String>) -> AbiError {
        AbiError::Row { format: self, k, msg: msg.into() }
    }

    /// Appends the [`row_bytes`](Self::row_bytes)`(k)` bytes of one row record to `out`. An error
    /// (nothing appended) when `row` does not hold what the format stores for `k` elements or a
    /// code is out of its range.
    pub fn encode_row(self, k: usize, row: &Row<'_>, out: &mut Vec<u8>) -> Result<()> {
        self.check_row(k, row)?;
        let start = out.len();
        let rb = self.row_bytes(k);
        out.reserve(rb);
        if self.half_scales() {
            for &s in row.scales {
                out.extend_from_slice(&half::f16::from_f32(s).to_le_bytes());
            }
            for &z in row.zeros {
                out.extend_from_slice(&half::f16::from_f32(z as f32).to_le_bytes());
            }
        } else {
            for s in row.scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
        }
        match self {
            QFormat::Sparse24 { int8 } => {
                // Kept values in element order, then one byte per two groups of 4.
                for (gi, &(a, b)) in row.kept.iter().enumerate() {
                    for l in [a, b] {
                        let e = 4 * gi + l as usize;
                        if int8 {
                            out.push(row.codes[e] as u8);
                        } else {
                            out.extend_from_slice(&row.values[e].to_le_bytes());
                        }
                    }
                }
                out.resize(start + self.codes_at(k) + Self::sparse_idx_at(int8, k), 0);
                for pair in row.kept.chunks(2) {
                    let nib = |(a, b): (u8, u8)| a | b << 2;
                    out.push(nib(pair[0]) | pair.get(1).map_or(0, |&p| nib(p) << 4));
                }
            }
            QFormat::Int4 { .. } | QFormat::W4A8 { .. } => {
                let asym = matches!(self, QFormat::Int4 { asym: true, .. });
                let code = |j: usize| -> u8 {
                    match row.codes.get(j) {
                        None => 0,
                        Some(&q) if asym => q as u8,
                        Some(&q) => (q + 8) as u8,
                    }
                };
                for blk in 0..k.div_ceil(32) {
                    for i in 0..16 {
                        out.push(code(32 * blk + i) | code(32 * blk + 16 + i) << 4);
                    }
                }
            }
            QFormat::W8A8 => {
                let sum: i32 = row.codes.iter().map(|&q| q as i32).sum();
                out.extend_from_slice(&sum.to_le_bytes());
                out.extend(row.codes.iter().map(|&q| q as u8));
            }
            QFormat::Int8 => out.extend(row.codes.iter().map(|&q| q as u8)),
        }
        out.resize(start + rb, 0);
        Ok(())
    }

    /// Whether the scales (and zero points) are IEEE halves: int4 and W4A8 (per group); int8,
    /// W8A8 and 2:4 int8 keep one f32 per row.
    pub fn half_scales(self) -> bool {
        matches!(self, QFormat::Int4 { .. } | QFormat::W4A8 { .. })
    }

    /// Whether `row` holds what the format stores for `k` elements, every code in its range.
    fn check_row(self, k: usize, row: &Row<'_>) -> Result<()> {
        if !self.is_valid() {
            return Err(self.err(k, "the kernels cannot read this group size"));
        }
        let sparse = matches!(self, QFormat::Sparse24 { .. });
        let f32_sparse = self == QFormat::Sparse24 { int8: false };
        let (scales, zeros) = match self {
            QFormat::Int4 { asym, .. } => (self.groups(k), if asym { self.groups(k) } else { 0 }),
            QFormat::W4A8 { .. } => (self.groups(k), 0),
            QFormat::Sparse24 { int8: false } => (0, 0),
            _ => (1, 0),
        };
        let want = [
            ("codes", row.codes.len(), if f32_sparse { 0 } else { k }),
            ("scales", row.scales.len(), scales),
            ("zero points", row.zeros.len(), zeros),
            ("kept pairs", row.kept.len(), if sparse { k / 4 } else { 0 }),
            ("values", row.values.len(), if f32_sparse { k } else { row.values.len() }),
        ];
        for (what, got, n) in want {
            if got != n {
                return Err(self.err(k, format!("{got} {what}, the format stores {n}")));
            }
        }
        if sparse && !k.is_multiple_of(4) {
            return Err(self.err(k, "2:4 rows need K divisible by 4"));
        }
        if let Some(&(a, b)) = row.kept.iter().find(|&&(a, b)| a >= b || b > 3) {
            return Err(self.err(k, format!("kept pair ({a}, {b}) is not two indices a < b < 4")));
        }
        let range = match self {
            QFormat::Int4 { asym: true, .. } => 0..=15,
            QFormat::Int4 { .. } | QFormat::W4A8 { .. } => -8..=7,
            _ => -127..=127,
        };
        if let Some((e, q)) = row.codes.iter().enumerate().find(|(_, q)| !range.contains(*q)) {
            return Err(self.err(k, format!("code {q} of element {e} is outside {range:?}")));
        }
        if let Some(z) = row.zeros.iter().find(|z| !(0..=15).contains(*z)) {
            return Err(self.err(k, format!("zero point {z} is outside 0..=15")));
        }
        if self.half_scales() {
            if let Some((g, s)) = row.scales.iter().enumerate().find(|(_, &s)| half::f16::from_f32(s).to_f32().to_bits() != s.to_bits()) {
                return Err(self.err(k, format!("scale {s:e} of group {g} is not an IEEE half (the quantizer rounds them)")));
            }
        }
        Ok(())
    }

    fn check_bytes(self, row: &[u8], k: usize) -> Result<()> {
        if !self.is_valid() {
            return Err(self.err(k, "the kernels cannot read this group size"));
        }
        if row.len() < self.row_bytes(k) {
            return Err(self.err(k, format!("{} bytes, a record is {}", row.len(), self.row_bytes(k))));
        }
        Ok(())
    }

    /// The dequantized values of one packed row into `out[..k]`: `(q - zero) * scale` in f32, 0
    /// where 2:4 dropped an element, exactly as the interpreter computes them. An error when
    /// `row` is shorter than a record or `out` than `k`.
    pub fn dequant_row(self, row: &[u8], k: usize, out: &mut [f32]) -> Result<()> {
        self.check_bytes(row, k)?;
        let Some(out) = out.get_mut(..k) else {
            return Err(self.err(k, format!("an output of {} values", out.len())));
        };
        let c = self.codes_at(k);
        match self {
            QFormat::Int8 | QFormat::W8A8 => {
                let s = f32_at(row, 0);
                for (o, &q) in out.iter_mut().zip(&row[c..c + k]) {
                    *o = (q as i8) as f32 * s;
                }
            }
            QFormat::Int4 { group, .. } | QFormat::W4A8 { group } => {
                // By 16-element halves of the 32-element blocks (groups are multiples of 16).
                let asym = matches!(self, QFormat::Int4 { asym: true, .. });
                let ng = self.groups(k);
                for (h, o) in out.chunks_mut(16).enumerate() {
                    let g = 16 * h / group;
                    let (s, z) = (f16_at(row, g), if asym { f16_at(row, ng + g) as i32 } else { 8 });
                    let codes = &row[c + 16 * (h / 2)..c + 16 * (h / 2) + 16];
                    let shift = 4 * (h % 2);
                    for (o, &byte) in o.iter_mut().zip(codes) {
                        *o = ((byte >> shift & 15) as i32 - z) as f32 * s;
                    }
                }
            }
            QFormat::Sparse24 { int8 } => {
                out.fill(0.0);
                let idx = c + Self::sparse_idx_at(int8, k);
                let s = if int8 { f32_at(row, 0) } else { 1.0 };
                for gi in 0..k / 4 {
                    let byte = row[idx + gi / 2] >> (4 * (gi % 2));
                    for (t, l) in [(2 * gi, byte & 3), (2 * gi + 1, byte >> 2 & 3)] {
                        let v = if int8 { (row[c + t] as i8) as f32 * s } else { f32_at(&row[c..], t) };
                        out[4 * gi + l as usize] = v;
                    }
                }
            }
        }
        Ok(())
    }

    /// The contents of one packed row: the inverse of [`encode_row`](Self::encode_row), for
    /// readers that need the codes rather than the values (integer references, tools). An error
    /// when `row` is shorter than a record or a W8A8 row's stored code sum does not match its codes.
    pub fn unpack_row(self, row: &[u8], k: usize) -> Result<RowBuf> {
        self.check_bytes(row, k)?;
        let c = self.codes_at(k);
        let mut r = RowBuf::default();
        match self {
            QFormat::Int8 | QFormat::W8A8 => {
                r.scales.push(f32_at(row, 0));
                r.codes.extend(row[c..c + k].iter().map(|&b| b as i8));
                let sum: i32 = r.codes.iter().map(|&q| q as i32).sum();
                if self == QFormat::W8A8 && i32::from_le_bytes([row[4], row[5], row[6], row[7]]) != sum {
                    return Err(self.err(k, format!("stored code sum differs from the codes' sum {sum}")));
                }
            }
            QFormat::Int4 { .. } | QFormat::W4A8 { .. } => {
                let asym = matches!(self, QFormat::Int4 { asym: true, .. });
                let ng = self.groups(k);
                r.scales.extend((0..ng).map(|g| f16_at(row, g)));
                if asym {
                    r.zeros.extend((0..ng).map(|g| f16_at(row, ng + g) as i8));
                }
                r.codes.extend((0..k).map(|e| {
                    let byte = row[c + 16 * (e / 32) + e % 16];
                    let nib = (if e % 32 < 16 { byte & 15 } else { byte >> 4 }) as i8;
                    if asym { nib } else { nib - 8 }
                }));
            }
            QFormat::Sparse24 { int8 } => {
                let idx = c + Self::sparse_idx_at(int8, k);
                if int8 {
                    r.scales.push(f32_at(row, 0));
                    r.codes = vec![0; k];
                } else {
                    r.values = vec![0.0; k];
                }
                for gi in 0..k / 4 {
                    let byte = row[idx + gi / 2] >> (4 * (gi % 2));
                    let (a, b) = (byte & 3, byte >> 2 & 3);
                    r.kept.push((a, b));
                    for (t, l) in [(2 * gi, a), (2 * gi + 1, b)] {
                        if int8 {
                            r.codes[4 * gi + l as usize] = row[c + t] as i8;
                        } else {
                            r.values[4 * gi + l as usize] = f32_at(&row[c..], t);
                        }
                    }
                }
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use llmc_ir::{quant, Layout};

    use super::*;

    /// The packed format of an IR layout (an exhaustive match: a new layout must say how it is
    /// stored before this test compiles).
    fn format_of(l: Layout) -> Option<QFormat> {
        let f = match l {
            Layout::Dense => return None,
            Layout::Int8 => QFormat::Int8,
            Layout::Int4 { group, asym } => QFormat::Int4 { group, asym },
            Layout::Sparse24 { int8 } => QFormat::Sparse24 { int8 },
            Layout::W8A8 => QFormat::W8A8,
            Layout::W4A8 { group } => QFormat::W4A8 { group },
        };
        f.is_valid().then_some(f)
    }

    /// Every packed layout: int8, int4 g16/g32/g48/g64/g128 symmetric and asymmetric, 2:4 f32
    /// and int8, W8A8, W4A8 g32/g64/g96/g128.
    fn layouts() -> Vec<Layout> {
        let mut v = vec![Layout::Int8, Layout::Sparse24 { int8: false }, Layout::Sparse24 { int8: true }, Layout::W8A8];
        for group in [16, 32, 48, 64, 128] {
            v.extend([Layout::Int4 { group, asym: false }, Layout::Int4 { group, asym: true }]);
        }
        v.extend([32, 64, 96, 128].map(|group| Layout::W4A8 { group }));
        v
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        /// Values of mixed sign and magnitude, with exact zeros, ties in magnitude and outliers.
        fn value(&mut self) -> f32 {
            let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            match self.below(16) {
                0 => 0.0,
                1 => 0.5,
                2 => -0.5,
                3 => u * 40.0,
                4 => u * 1e-3,
                _ => u,
            }
        }
    }

    /// The rows as the compiler packs them: round-to-nearest codes from `ir::quant`, 2:4 pairs
    /// from `ir::quant::sparse24_pair`.
    fn encode(f: QFormat, l: Layout, data: &[f32], k: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for row in data.chunks(k) {
            let q = quant::quantize_row(l, row);
            let kept: Vec<(u8, u8)> = if matches!(f, QFormat::Sparse24 { .. }) {
                row.chunks_exact(4).map(quant::sparse24_pair).map(|(a, b)| (a as u8, b as u8)).collect()
            } else {
                Vec::new()
            };
            let r = Row { codes: &q.q, scales: &q.scales, zeros: &q.zeros, kept: &kept, values: row };
            f.encode_row(k, &r, &mut out).unwrap_or_else(|e| panic!("{l} k={k}: {e}"));
        }
        out
    }

    /// The round trip over every layout and ragged `K` (not a multiple of the group, the 32-element
    /// block or 16; 2:4 with an odd number of groups): decoding the encoded rows gives exactly
    /// (bit for bit) the layout's dequantization in `ir::quant`, and re-encoding what
    /// [`QFormat::unpack_row`] reads gives the same bytes.
    #[test]
    fn decode_of_encode_is_the_layouts_dequantization() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut ks = vec![1, 4, 12, 15, 16, 17, 31, 32, 33, 44, 100, 127, 129, 688, 1000];
        ks.extend((0..24).map(|_| 1 + rng.below(700) as usize));
        let rows = 3;
        for l in layouts() {
            let f = format_of(l).unwrap_or_else(|| panic!("{l} has no packed format"));
            assert_eq!(f.to_string(), l.name());
            for &k0 in &ks {
                let k = if matches!(l, Layout::Sparse24 { .. }) { k0.div_ceil(4) * 4 } else { k0 };
                let mut data: Vec<f32> = (0..rows * k).map(|_| rng.value()).collect();
                data[..k].fill(0.0); // an all-zero row: scale 0
                let bytes = encode(f, l, &data, k);
                let rb = f.row_bytes(k);
                assert_eq!(bytes.len(), rows * rb, "{l} k={k}");
                let want = quant::fake_quant(l, &data, k);
                let mut got = vec![f32::NAN; k];
                for (r, rec) in bytes.chunks(rb).enumerate() {
                    f.dequant_row(rec, k, &mut got).unwrap();
                    for (e, (g, w)) in got.iter().zip(&want[r * k..(r + 1) * k]).enumerate() {
                        let what = format!("{l} k={k} row {r} element {e}: decoded {g}, ir::quant {w}");
                        assert_eq!(g.to_bits(), w.to_bits(), "{what}");
                    }
                    let parts = f.unpack_row(rec, k).unwrap();
                    let mut again = Vec::new();
                    f.encode_row(k, &parts.as_row(), &mut again).unwrap();
                    assert_eq!(again, rec, "{l} k={k} row {r}: encode(unpack(bytes)) != bytes");
                }
            }
        }
    }

    /// A row-wise concatenation of packed weights is the concatenation of their bytes (rows are
    /// self-contained), and the sizes are what the format documents.
    #[test]
    fn rows_are_self_contained_and_sized_as_documented() {
        let mut rng = Rng(7);
        let (k, l) = (100, Layout::Int4 { group: 32, asym: true });
        let f = format_of(l).unwrap();
        let a: Vec<f32> = (0..2 * k).map(|_| rng.value()).collect();
        let b: Vec<f32> = (0..3 * k).map(|_| rng.value()).collect();
        let ab: Vec<f32> = a.iter().chain(&b).copied().collect();
        assert_eq!(encode(f, l, &ab, k), [encode(f, l, &a, k), encode(f, l, &b, k)].concat());
        // int4 g32 on K = 688: 22 half scales (and zero points), 22 blocks of 16 bytes: 4.5 bits
        // per weight symmetric, as GGUF's Q4_0 (18 bytes per 32 weights).
        assert_eq!(QFormat::Int4 { group: 32, asym: false }.row_bytes(688), 22 * 2 + 22 * 16);
        assert_eq!(QFormat::Int4 { group: 32, asym: true }.row_bytes(688), 2 * 22 * 2 + 22 * 16);
        assert_eq!(QFormat::W4A8 { group: 32 }.row_bytes(2048), 64 * 18);
        assert_eq!(QFormat::Int8.row_bytes(256), 4 + 256);
        assert_eq!(QFormat::Int8.row_bytes(13), 4 + 16);
        assert_eq!(QFormat::W8A8.row_bytes(44), 8 + 48);
        // 2:4 f32 on K = 44: 22 kept f32, 11 groups in 6 index bytes padded to 8.
        assert_eq!(QFormat::Sparse24 { int8: false }.row_bytes(44), 22 * 4 + 8);
        assert_eq!(QFormat::Sparse24 { int8: true }.row_bytes(44), 4 + 24 + 8);
    }

    /// The W4A8 activation order is a permutation of each super-step and step, a super-step's
    /// lanes each hold one block, and the block terms' words are distinct and in range.
    #[test]
    fn w4a8_activation_order_is_a_permutation_by_region() {
        let f = QFormat::W4A8 { group: 32 };
        assert_eq!([100, 256, 512, 576, 1024, 1100].map(|k| f.act_bytes(k)), [128, 256, 512, 640, 1024, 1152]);
        assert_eq!([129, 512, 576].map(|k| f.aux_words(k)), [32, 16, 32]);
        // Steps only (K < 512): block halves in 16-byte runs.
        assert_eq!([0, 15, 16, 31, 32, 48, 127, 128].map(|e| f.act_at(300, e)), [0, 15, 64, 79, 16, 80, 127, 128]);
        // A super-step: element 4j + b of block 0 in lane 0 of vector j; block 1 in lane 4.
        assert_eq!([0, 3, 4, 16, 32, 64].map(|e| f.act_at(576, e)), [0, 3, 64, 256, 16, 32]);
        for k in [300, 512, 576, 1100] {
            let n = f.act_bytes(k);
            let mut seen = vec![false; n];
            for e in 0..k {
                let p = f.act_at(k, e);
                let region = |x: usize| if x < k / 512 * 512 { x / 512 } else { 1000 + (x - k / 512 * 512) / 128 };
                assert!(p < n && region(p) == region(e) && !seen[p], "k={k} e={e}: {p}");
                seen[p] = true;
                if e < k / 512 * 512 {
                    let blk = e % 512 / 32;
                    assert_eq!(p % 64 / 4, QFormat::lane_of(blk), "k={k} e={e}: lane");
                }
            }
            let mut words = vec![false; f.aux_words(k)];
            for b in 0..k.div_ceil(32) {
                let w = QFormat::aux_at(k, b);
                assert!(!words[w], "k={k}: block {b} word {w} twice");
                words[w] = true;
            }
        }
        assert!((0..16).all(|l| QFormat::lane_of(QFormat::lane_of(l)) == l));
        assert_eq!((QFormat::W8A8.act_bytes(44), QFormat::W8A8.act_at(44, 43), QFormat::W8A8.aux_words(44)), (64, 43, 0));
    }

    #[test]
    fn format_args_round_trip() {
        for f in [
            QFormat::Int8,
            QFormat::Int4 { group: 32, asym: false },
            QFormat::Int4 { group: 48, asym: true },
            QFormat::Sparse24 { int8: false },
            QFormat::Sparse24 { int8: true },
            QFormat::W8A8,
            QFormat::W4A8 { group: 128 },
        ] {
            assert_eq!(QFormat::from_arg(f.arg()), Some(f));
        }
        assert_eq!(QFormat::from_arg(1 | 8 << 16), None, "int4 group 8 is not a packed format");
        assert_eq!(QFormat::from_arg(5 | 48 << 16), None, "w4a8 group 48 is not a packed format");
        assert_eq!(QFormat::from_arg(9), None);
    }

    /// Rows that do not fit their format are errors naming the format and what is wrong, and
    /// append nothing; short records are errors, not panics.
    #[test]
    fn mismatched_rows_are_errors() {
        let codes = [1i8; 8];
        let s = [0.5f32];
        let mut out = vec![7u8];
        let row = Row { codes: &codes, scales: &s, ..Row::default() };
        let sparse_f32 = Row { values: &[0.0; 6], kept: &[(0, 1)], ..Row::default() };
        let (int4, int4_asym) = (QFormat::Int4 { group: 16, asym: false }, QFormat::Int4 { group: 16, asym: true });
        let cases: Vec<(QFormat, usize, Row, &str)> = vec![
            (QFormat::Int8, 9, row, "8 codes, the format stores 9"),
            (QFormat::Int8, 8, Row { scales: &[], ..row }, "0 scales"),
            (int4, 8, Row { codes: &[9; 8], ..row }, "code 9 of element 0"),
            (int4_asym, 8, Row { zeros: &[16], ..row }, "zero point 16"),
            (int4, 8, Row { scales: &[0.1], ..row }, "scale 1e-1 of group 0 is not an IEEE half"),
            (QFormat::Int4 { group: 8, asym: false }, 8, row, "group size"),
            (QFormat::Sparse24 { int8: true }, 8, Row { kept: &[(0, 1), (2, 2)], ..row }, "kept pair (2, 2)"),
            (QFormat::Sparse24 { int8: false }, 6, sparse_f32, "divisible by 4"),
        ];
        for (f, k, r, msg) in cases {
            let e = f.encode_row(k, &r, &mut out).unwrap_err().to_string();
            assert!(e.contains(msg) && e.contains(&f.to_string()), "{f} k={k}: {e}");
            assert_eq!(out, [7], "{f}: bytes appended on error");
        }
        let f = QFormat::Int4 { group: 32, asym: false };
        let e = f.dequant_row(&[0; 10], 32, &mut [0.0; 32]).unwrap_err().to_string();
        assert!(e.contains("10 bytes, a record is 18"), "{e}");
        assert!(f.dequant_row(&[0; 18], 32, &mut [0.0; 31]).is_err());
        assert!(f.unpack_row(&[0; 17], 32).is_err());
        let mut w8 = Vec::new();
        QFormat::W8A8.encode_row(4, &Row { codes: &[1, 2, 3, 4], scales: &s, ..Row::default() }, &mut w8).unwrap();
        w8[4] ^= 1;
        assert!(QFormat::W8A8.unpack_row(&w8, 4).unwrap_err().to_string().contains("code sum"));
    }
}

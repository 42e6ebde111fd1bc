//! `quantize`: round-to-nearest weight quantization as a layout change.
//!
//! Sets the [`ir::Layout`] of every 2-D weight whose every use is the right-hand side of a
//! `matmul {transpose_b}`, `linear {transpose_b}` or `gated_linear` (directly, or through a
//! row-wise `concat {axis = 0}` of weights that only feeds such uses) or the table of a `gather`.
//! Three roles, each with its format:
//! - products of the body: the `format`;
//! - the LM head (a product weight of `vocab_size` rows), tied or not to the embedding table:
//!   the `head` format, by default the `format` for int8/w8a8 and int8 for the 4-bit formats and
//!   2:4 with int8 values (as llama.cpp's `llama-quantize` keeps the output matrix at 6-8 bits),
//!   none for 2:4 alone (pruning the head costs the most);
//! - an untied embedding table (only gathered from): the `format`'s weight format (int8 for
//!   w8a8 and 2:4 with int8 values, int4 for w4a8; a gather reads weights only), none for 2:4
//!   alone.
//!
//! A gather dequantizes the rows it reads, so a tied table is stored once, packed.
//! Norms, biases and weights matching a `--keep-fp` pattern stay f32; every matrix left in float
//! is named in the pass's notes with the reason (`float NAME [R, K]: why`), which the compile
//! summary shows. The values'
//! types do not change; their semantics become the dequantized tensors (see `ir::quant`), so the
//! interpreter and every backend agree on the quantized graph. Not in the default pipeline: a
//! pipeline names it with its options, `quantize{format=int4:g64,keep-fp=lm_head}`, and
//! `llmc compile --quant/--sparsity/--keep-fp` append that entry ([`Quantize::spec_from_flags`]).
//! `quantize` without a format or a sparsity is an error, not a silent int8; so is one that
//! would change nothing (no weight takes the format) and a `keep-fp` pattern that matches no
//! weight.
//!
//! The pass sets layouts only (round-to-nearest semantics, 2:4 by magnitude); calibrated
//! methods (GPTQ, Wanda) change the weights' values through `calibrate::Calibrated`, not the graph.
//! A 2:4 layout skips weights whose `K` is not a multiple of 4 (counted as kept).

use llmc_ir as ir;

use crate::error::{PassError, Result};
use crate::manager::{Pass, PassStats};
use crate::pipeline::PassSpec;
use crate::registry::{PassContext, PassOption, PassOptions, RegisteredPass};

/// Quantizes matmul weights to `layout`, keeping names that match any of `keep_fp`.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantize {
    pub layout: ir::Layout,
    /// Substrings or globs (`*`, `?`) on the checkpoint tensor name.
    pub keep_fp: Vec<String>,
    /// With a 2:4 layout: prune by Wanda (|w| times the input's activation norm) rather than by
    /// magnitude. The pass sets the same layout either way; calibration picks the kept values.
    pub wanda: bool,
    /// The LM head's format (`--head-quant`): `None` for the default of `layout`
    /// ([`Quantize::head_layout`]), `Some(None)` to keep it in float.
    pub head: Option<Option<ir::Layout>>,
}

/// What quantization makes of one weight matrix.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Stored in this layout.
    Quantized(ir::Layout),
    /// Left in float, and why.
    Float(String),
}

/// The formats `format=` and `--quant` take.
const FORMATS: &str = "int8, int4[:gN][:asym], w8a8 or w4a8[:gN]";
/// The patterns `sparsity=` and `--sparsity` take.
const SPARSITIES: &str = "2:4, 2:4:magnitude or 2:4:wanda";

impl Quantize {
    /// Parses `--quant`: `int8`, `int4`, `int4:g64`, `int4:g128:asym`, `int4:asym` (group 32 by default).
    pub fn parse_spec(spec: &str) -> Result<ir::Layout> {
        parse_format(spec).map_err(|why| PassError::Quant(format!("--quant `{spec}`: {why} (want {FORMATS})")))
    }

    /// Parses `--sparsity`: `2:4`, `2:4:magnitude` or `2:4:wanda`; returns whether Wanda.
    pub fn parse_sparsity(spec: &str) -> Result<bool> {
        parse_sparsity(spec).map_err(|why| PassError::Quant(format!("--sparsity `{spec}`: {why} (want {SPARSITIES})")))
    }

    /// The layout of `--quant` and `--sparsity` together: 2:4 alone (f32 kept values), 2:4 with
    /// int8, or the `--quant` format alone.
    pub fn combine(quant: Option<ir::Layout>, sparse: bool) -> Result<Option<ir::Layout>> {
        combine(quant, sparse).map_err(|l| PassError::Quant(format!("--sparsity 2:4 combines with --quant int8 only, not {l}")))
    }

    /// The pipeline entry for `llmc compile --quant Q --sparsity S --keep-fp P...`:
    /// `quantize{format=Q,sparsity=S,keep-fp=P1;P2}` (the options given), or `None` when neither
    /// `--quant` nor `--sparsity` is. The flags are checked here, with errors naming the flag, so
    /// the entry always builds; `--keep-fp` alone is an error, as is a pattern that is empty or
    /// holds `;` (the entry's pattern separator).
    pub fn spec_from_flags(quant: Option<&str>, sparsity: Option<&str>, keep_fp: &[String]) -> Result<Option<PassSpec>> {
        Self::spec_from_flags_with_head(quant, sparsity, None, keep_fp)
    }

    /// [`Quantize::spec_from_flags`] with `--head-quant` (`head=`), which needs `--quant` or
    /// `--sparsity` too.
    pub fn spec_from_flags_with_head(
        quant: Option<&str>,
        sparsity: Option<&str>,
        head: Option<&str>,
        keep_fp: &[String],
    ) -> Result<Option<PassSpec>> {
        let layout = quant.map(Quantize::parse_spec).transpose()?;
        let wanda = sparsity.map(Quantize::parse_sparsity).transpose()?;
        if let Some(h) = head {
            parse_head(h).map_err(|why| PassError::Quant(format!("--head-quant `{h}`: {why} (want {FORMATS} or none)")))?;
        }
        if Quantize::combine(layout, wanda.is_some())?.is_none() {
            if !keep_fp.is_empty() {
                return Err(PassError::Quant("--keep-fp needs --quant or --sparsity".into()));
            }
            if head.is_some() {
                return Err(PassError::Quant("--head-quant needs --quant or --sparsity".into()));
            }
            return Ok(None);
        }
        for p in keep_fp {
            check_pattern(p).map_err(|why| PassError::Quant(format!("--keep-fp `{p}`: {why}")))?;
        }
        let mut spec = PassSpec::new(Self::NAME);
        if let Some(q) = quant {
            spec = spec.with("format", q);
        }
        if let Some(s) = sparsity {
            spec = spec.with("sparsity", s);
        }
        if let Some(h) = head {
            spec = spec.with("head", h);
        }
        if !keep_fp.is_empty() {
            spec = spec.with("keep-fp", keep_fp.join(";"));
        }
        Ok(Some(spec))
    }

    fn keep(&self, name: &str) -> Option<&str> {
        self.keep_fp.iter().find(|p| matches(p, name)).map(String::as_str)
    }

    /// The head's layout: `head=` when given, else the `format` for int8/w8a8, 8-bit weights for
    /// the 4-bit formats (int8 for int4 and 2:4 with int8 values; w8a8 for w4a8, whose products
    /// quantize their activations already, so the head's dot products run on VNNI at twice the
    /// weight-only int8 rate), none (float) for 2:4 alone.
    pub fn head_layout(&self) -> Option<ir::Layout> {
        match self.head {
            Some(h) => h,
            None => match self.layout {
                ir::Layout::Int8 | ir::Layout::W8A8 => Some(self.layout),
                ir::Layout::W4A8 { .. } => Some(ir::Layout::W8A8),
                ir::Layout::Int4 { .. } | ir::Layout::Sparse24 { int8: true } => Some(ir::Layout::Int8),
                _ => None,
            },
        }
    }

    /// Whether weight `n` has the LM head's shape: `vocab_size` rows (`uses` says whether a
    /// product reads it).
    fn is_head(&self, g: &ir::Graph, n: ir::NodeId) -> bool {
        let rows = g.ty(n).shape.first().and_then(|d| d.as_const());
        let vocab = g.meta.get("vocab_size").and_then(|v| v.parse::<usize>().ok());
        rows.is_some() && rows == vocab && uses(g, n).is_ok_and(|u| u.product)
    }

    /// What the pass makes of weight `n` (a 2-D dense weight of `g`).
    pub fn decide(&self, g: &ir::Graph, n: ir::NodeId) -> Decision {
        let ir::Op::Weight { name, .. } = g.op(n) else {
            return Decision::Float("not a weight".into());
        };
        let uses = match uses(g, n) {
            Ok(u) => u,
            Err(why) => return Decision::Float(why),
        };
        if let Some(p) = self.keep(name) {
            return Decision::Float(format!("--keep-fp `{p}`"));
        }
        let head = uses.product && self.is_head(g, n);
        let sparse = matches!(self.layout, ir::Layout::Sparse24 { .. });
        if head {
            return match self.head_layout() {
                Some(l) => Decision::Quantized(l),
                None if self.head == Some(None) => Decision::Float("--head-quant none".into()),
                None => Decision::Float("the LM head is not pruned by 2:4 sparsity (--head-quant sets its format)".into()),
            };
        }
        // A gathered table is not pruned: dense int8 with `--quant int8 --sparsity 2:4`.
        let table_layout = match self.layout {
            ir::Layout::Sparse24 { int8: true } => Some(ir::Layout::Int8),
            ir::Layout::Sparse24 { int8: false } => None,
            l => Some(l.weight_format()),
        };
        if !uses.product {
            return match table_layout {
                Some(l) => Decision::Quantized(l),
                None => Decision::Float("an embedding table (gathered from) is not pruned by 2:4 sparsity".into()),
            };
        }
        if uses.table && sparse {
            // A table that a product of fewer than vocab_size rows also reads.
            return match table_layout {
                Some(l) => Decision::Quantized(l),
                None => Decision::Float("a gathered table is not pruned by 2:4 sparsity".into()),
            };
        }
        let k = g.ty(n).shape[1].as_const();
        if sparse && k.is_none_or(|k| k % 4 != 0) {
            return Decision::Float("2:4 sparsity needs K a multiple of 4".into());
        }
        Decision::Quantized(self.layout)
    }
}

/// `name` contains the `--keep-fp` pattern `p` or matches it as a glob.
fn matches(p: &str, name: &str) -> bool {
    name.contains(p) || glob(p.as_bytes(), name.as_bytes())
}

/// How a weight is read: as a product's right-hand side, as a gather's table.
struct Uses {
    product: bool,
    table: bool,
}

/// How the 2-D weight `n` is read, or why it cannot be quantized (a use that is neither a
/// transposed product's right-hand side nor a gather's table).
fn uses(g: &ir::Graph, n: ir::NodeId) -> std::result::Result<Uses, String> {
    if g.outputs.contains(&n) {
        return Err("a graph output".into());
    }
    let mut u = Uses { product: false, table: false };
    let mut users = g.users(n);
    users.sort();
    users.dedup();
    for user in users {
        let ins = g.inputs(user);
        let only_at = |slot: usize| ins.iter().enumerate().all(|(s, &i)| i != n || s == slot);
        match g.op(user) {
            ir::Op::Matmul { transpose_b: true } | ir::Op::Linear { transpose_b: true, .. } | ir::Op::GatedLinear { .. }
                if only_at(1) =>
            {
                u.product = true
            }
            ir::Op::Concat { axis: 0, .. }
                if ins.iter().all(|&i| matches!(g.op(i), ir::Op::Weight { .. })) && rhs_only(g, user) =>
            {
                u.product = true
            }
            ir::Op::Gather if only_at(0) => u.table = true,
            ir::Op::Matmul { transpose_b: false } | ir::Op::Linear { transpose_b: false, .. } => {
                return Err("the [K, N] operand of a non-transposed product (GPT-2's Conv1D): not packable yet".into())
            }
            op => return Err(format!("read by `{}`", op.name())),
        }
    }
    if !u.product && !u.table {
        return Err("unused".into());
    }
    Ok(u)
}

/// A `keep-fp` pattern: non-empty (the empty substring would keep every weight), no `;`.
fn check_pattern(p: &str) -> std::result::Result<(), String> {
    if p.is_empty() {
        Err("an empty pattern would match every weight".into())
    } else if p.contains(';') {
        Err("a pattern cannot hold `;` (it separates patterns in quantize{keep-fp=A;B})".into())
    } else {
        Ok(())
    }
}

/// `int8`, `int4[:gN][:asym]`, `w8a8`, `w4a8[:gN]`; the error says why not.
fn parse_format(spec: &str) -> std::result::Result<ir::Layout, String> {
    let mut parts = spec.split(':');
    match parts.next() {
        Some("int8") => match parts.next() {
            None => Ok(ir::Layout::Int8),
            Some(p) => Err(format!("int8 takes no option `{p}`")),
        },
        Some("w4a8") => {
            let mut group = 32;
            for p in parts {
                match p.strip_prefix('g').and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) if n > 0 && n % 32 == 0 => group = n,
                    Some(_) => return Err("the w4a8 group size must be a positive multiple of 32".into()),
                    None => return Err(format!("unknown option `{p}`")),
                }
            }
            Ok(ir::Layout::W4A8 { group })
        }
        Some("w8a8") => match parts.next() {
            None => Ok(ir::Layout::W8A8),
            Some(p) => Err(format!("w8a8 takes no option `{p}`")),
        },
        Some("int4") => {
            let (mut group, mut asym) = (32, false);
            for p in parts {
                if p == "asym" {
                    asym = true;
                } else if p == "sym" {
                    asym = false;
                } else if let Some(n) = p.strip_prefix('g').and_then(|n| n.parse::<usize>().ok()) {
                    if n == 0 || n % 2 != 0 {
                        return Err("the group size must be even and positive".into());
                    }
                    group = n;
                } else {
                    return Err(format!("unknown option `{p}`"));
                }
            }
            Ok(ir::Layout::Int4 { group, asym })
        }
        _ => Err("unknown format".into()),
    }
}

/// `--head-quant`: a format, or `none` (float).
fn parse_head(spec: &str) -> std::result::Result<Option<ir::Layout>, String> {
    if spec == "none" {
        return Ok(None);
    }
    match parse_format(spec)? {
        ir::Layout::Sparse24 { .. } => Err("2:4 is not a head format".into()),
        l => Ok(Some(l)),
    }
}

/// `2:4[:magnitude|wanda]`: whether Wanda; the error says why not.
fn parse_sparsity(spec: &str) -> std::result::Result<bool, String> {
    let mut parts = spec.split(':');
    match (parts.next(), parts.next()) {
        (Some("2"), Some("4")) => {}
        (Some(n), Some(m)) if n.parse::<u32>().is_ok() && m.parse::<u32>().is_ok() => {
            return Err(format!("only 2:4 structured sparsity is supported, not {n}:{m}"))
        }
        _ => return Err("not an N:M pattern".into()),
    }
    let wanda = match parts.next() {
        None | Some("magnitude") => false,
        Some("wanda") => true,
        Some(m) => return Err(format!("unknown pruning method `{m}`")),
    };
    match parts.next() {
        None => Ok(wanda),
        Some(p) => Err(format!("unexpected `{p}`")),
    }
}

/// The layout of a format and 2:4 sparsity together; the error is a format 2:4 does not take.
fn combine(quant: Option<ir::Layout>, sparse: bool) -> std::result::Result<Option<ir::Layout>, ir::Layout> {
    Ok(match (quant, sparse) {
        (q, false) => q,
        (None, true) => Some(ir::Layout::Sparse24 { int8: false }),
        (Some(ir::Layout::Int8), true) => Some(ir::Layout::Sparse24 { int8: true }),
        (Some(l), true) => return Err(l),
    })
}

/// Whether `pat` (with `*` and `?`) matches all of `s`.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&pat[1..], s) || (!s.is_empty() && glob(pat, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&pat[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&pat[1..], &s[1..]),
        _ => false,
    }
}

/// Every use of `n` reads it as a `[N, K]` right-hand side, row-wise.
fn rhs_only(g: &ir::Graph, n: ir::NodeId) -> bool {
    if g.outputs.contains(&n) {
        return false;
    }
    let mut any = false;
    let mut users = g.users(n);
    users.sort();
    users.dedup();
    for user in users {
        any = true;
        let ins = g.inputs(user);
        let rhs = || ins.iter().enumerate().all(|(slot, &i)| i != n || slot == 1);
        let ok = match g.op(user) {
            ir::Op::Matmul { transpose_b: true }
            | ir::Op::Linear { transpose_b: true, .. }
            | ir::Op::GatedLinear { .. } => rhs(),
            ir::Op::Concat { axis: 0, .. } => {
                g.inputs(user).iter().all(|&i| matches!(g.op(i), ir::Op::Weight { .. })) && rhs_only(g, user)
            }
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    any
}

impl RegisteredPass for Quantize {
    const NAME: &'static str = "quantize";
    const SUMMARY: &'static str = "round-to-nearest int8/int4/w8a8/w4a8/2:4 layouts for matmul weights \
         (llmc compile --quant/--sparsity; not in the default pipeline)";
    const OPTIONS: &'static [PassOption] = &[
        PassOption {
            name: "format",
            values: "int8|int4[:gN][:asym]|w8a8|w4a8[:gN]",
            default: "none (then sparsity is required)",
            summary: "the weight format (llmc compile --quant)",
        },
        PassOption {
            name: "sparsity",
            values: "2:4[:magnitude|wanda]",
            default: "none (dense)",
            summary: "2:4 structured sparsity, pruned by magnitude or by Wanda (needs --calib); with format=int8 \
                      the kept values are int8, no other format combines (--sparsity)",
        },
        PassOption {
            name: "head",
            values: "int8|int4[:gN][:asym]|w8a8|w4a8[:gN]|none",
            default: "the format for int8/w8a8, int8 for int4/w4a8 and 2:4 with int8, none for 2:4 alone",
            summary: "the LM head's format, tied to the embedding table or not (--head-quant); none keeps it in float",
        },
        PassOption {
            name: "keep-fp",
            values: "PATTERN[;PATTERN...]",
            default: "none",
            summary: "keep the weights whose checkpoint name contains a pattern or matches it as a glob (* ?) \
                      in f32 (--keep-fp, one pattern each)",
        },
    ];

    fn from_options(opts: &PassOptions<'_>, _: &PassContext) -> Result<Self> {
        let format = opts.parse("format", parse_format)?;
        let wanda = opts.parse("sparsity", parse_sparsity)?;
        let layout = combine(format, wanda.is_some()).map_err(|l| {
            let v = opts.get("sparsity").unwrap_or_default();
            opts.bad("sparsity", v, format!("2:4 combines with format=int8 only, not {l}"))
        })?;
        let Some(layout) = layout else {
            return Err(opts.invalid(
                "needs `format` or `sparsity` (for example quantize{format=int8}); its options: \
                 format=int8|int4[:gN][:asym]|w8a8|w4a8[:gN], sparsity=2:4[:magnitude|wanda], keep-fp=PATTERN[;PATTERN...]"
                    .into(),
            ));
        };
        let keep_fp: Vec<String> = match opts.get("keep-fp") {
            None => Vec::new(),
            Some(v) => v.split(';').map(String::from).collect(),
        };
        for p in &keep_fp {
            check_pattern(p).map_err(|why| opts.bad("keep-fp", opts.get("keep-fp").unwrap_or_default(), why))?;
        }
        let head = opts.parse("head", parse_head)?;
        Ok(Quantize { layout, keep_fp, wanda: wanda.unwrap_or(false), head })
    }
}

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn summary(&self) -> &'static str {
        Self::SUMMARY
    }
    fn run(&self, g: &mut ir::Graph) -> Result<PassStats> {
        let mut st = PassStats::default();
        let nodes: Vec<ir::NodeId> = g.g.node_indices().collect();
        let (mut done, mut kept, mut params) = (0u64, 0u64, 0u64);
        let mut floats = Vec::new();
        let mut heads = 0;
        let mut set = Vec::new();
        for n in nodes {
            let ir::Op::Weight { name, layout, .. } = g.op(n) else {
                continue;
            };
            if *layout != ir::Layout::Dense || g.ty(n).rank() != 2 {
                continue;
            }
            heads += self.is_head(g, n) as usize;
            match self.decide(g, n) {
                Decision::Float(why) => {
                    kept += 1;
                    floats.push(format!("float {name} {}: {why}", shape_text(g.ty(n))));
                }
                Decision::Quantized(l) => {
                    params += g.ty(n).static_numel().unwrap_or(0) as u64;
                    set.push((n, l));
                    done += 1;
                }
            }
        }
        // Every check before the graph changes: an error leaves it as it was.
        for p in &self.keep_fp {
            let hit = g.g.node_indices().any(|n| matches!(g.op(n), ir::Op::Weight { name, .. } if matches(p, name)));
            if !hit {
                return Err(PassError::Quant(format!("--keep-fp `{p}` matches no weight of `{}`", g.name)));
            }
        }
        if self.head.is_some() && heads == 0 {
            return Err(PassError::Quant(format!(
                "--head-quant would change nothing: `{}` has no LM head (a product weight of vocab_size rows)",
                g.name
            )));
        }
        if done == 0 {
            let why = if floats.is_empty() { "it has no weight matrix".to_string() } else { floats.join("; ") };
            return Err(PassError::Quant(format!(
                "{} would change nothing: no weight of `{}` takes it ({why})",
                self.flag_text(),
                g.name
            )));
        }
        for (n, l) in set {
            if let ir::Op::Weight { layout, .. } = &mut g.g[n].op {
                *layout = l;
            }
        }
        st.bump("quantized", done);
        st.bump("kept-fp", kept);
        st.bump("quantized-params", params);
        st.notes.extend(floats);
        Ok(st)
    }
}

/// `layout` as `--quant` spells it (`int4:g32:asym`).
fn format_flag(l: ir::Layout) -> String {
    match l {
        ir::Layout::Int4 { group, asym } => format!("int4:g{group}{}", if asym { ":asym" } else { "" }),
        ir::Layout::W4A8 { group } => format!("w4a8:g{group}"),
        l => l.to_string(),
    }
}

/// `[R, K]` as the notes print a weight's shape.
fn shape_text(t: &ir::TensorType) -> String {
    let dims: Vec<String> = t.shape.iter().map(|d| d.as_const().map_or("?".into(), |v| v.to_string())).collect();
    format!("[{}]", dims.join(", "))
}

impl Quantize {
    /// The flags this pass was asked for, as an error names them.
    fn flag_text(&self) -> String {
        match self.layout {
            ir::Layout::Sparse24 { int8: false } => "--sparsity 2:4".into(),
            ir::Layout::Sparse24 { int8: true } => "--quant int8 --sparsity 2:4".into(),
            l => format!("--quant {}", format_flag(l)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use ir::{Dim, Op, TensorType};

    fn layouts(g: &ir::Graph) -> Vec<(String, ir::Layout)> {
        let mut v: Vec<_> =
            g.g.node_indices()
                .filter_map(|n| match g.op(n) {
                    Op::Weight { name, layout, .. } => Some((name.clone(), *layout)),
                    _ => None,
                })
                .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn quantizes_matmul_weights_only() {
        let mut g = ir::Graph::new("q");
        let (_, x) = embed(&mut g, 10, 8);
        let wq = weight(&mut g, "q_proj", &[8, 8]);
        let wk = weight(&mut g, "k_proj", &[4, 8]);
        let cat = g.add(Op::Concat { axis: 0, n: 2 }, &[wq, wk], None).unwrap();
        let y = g.add(Op::Matmul { transpose_b: true }, &[x, cat], None).unwrap();
        let wg = weight(&mut g, "gate_up", &[12, 12]);
        let y = g.add(Op::GatedLinear { act: ir::UnaryOp::Silu }, &[y, wg], None).unwrap();
        let nw = weight(&mut g, "norm", &[6]);
        let y = g.add(Op::RmsNorm { eps: 1e-5 }, &[y, nw], None).unwrap();
        let wn = weight(&mut g, "plain", &[6, 5]); // transpose_b = false: [K, N], not row-wise
        let y = g.add(Op::Matmul { transpose_b: false }, &[y, wn], None).unwrap();
        let head = weight(&mut g, "lm_head", &[7, 5]);
        let y =
            g.add(Op::Linear { transpose_b: true, bias: false, act: None, residual: false }, &[y, head], None).unwrap();
        g.outputs.push(y);
        ir::verify(&g).unwrap();
        let before = g.clone();
        let l = ir::Layout::Int4 { group: 32, asym: false };
        let st = Quantize { layout: l, keep_fp: vec!["lm_*".into()], wanda: false, head: None }.run(&mut g).unwrap();
        ir::verify(&g).unwrap();
        assert_eq!(st.get("quantized"), 4);
        assert_eq!(st.get("kept-fp"), 2);
        assert!(st.notes.contains(&"float lm_head [7, 5]: --keep-fp `lm_*`".to_string()), "{:?}", st.notes);
        assert!(st.notes.iter().any(|n| n.starts_with("float plain [6, 5]: the [K, N] operand of a non-transposed product")), "{:?}", st.notes);
        let d = ir::Layout::Dense;
        assert_eq!(
            layouts(&g),
            vec![
                ("embed".into(), l),
                ("gate_up".into(), l),
                ("k_proj".into(), l),
                ("lm_head".into(), d),
                ("norm".into(), d),
                ("plain".into(), d),
                ("q_proj".into(), l)
            ]
        );
        // Round trip through the text form, and the interpreter sees the quantization.
        assert_eq!(ir::parse(&ir::print(&g)).unwrap(), g);
        let w = weights_for(&[&g]);
        let a = ir::Interpreter::new(&w).run(&before, &[1, 2]).unwrap();
        let b = ir::Interpreter::new(&w).run(&g, &[1, 2]).unwrap();
        assert_ne!(a[0].data, b[0].data);
        let _ = TensorType::f32(vec![Dim::S]);
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(Quantize::parse_spec("int8").unwrap(), ir::Layout::Int8);
        assert_eq!(Quantize::parse_spec("w8a8").unwrap(), ir::Layout::W8A8);
        assert_eq!(Quantize::parse_spec("w4a8:g64").unwrap(), ir::Layout::W4A8 { group: 64 });
        assert!(Quantize::parse_spec("w4a8:g16").is_err());
        assert_eq!(Quantize::parse_spec("int4").unwrap(), ir::Layout::Int4 { group: 32, asym: false });
        assert_eq!(Quantize::parse_spec("int4:g128:asym").unwrap(), ir::Layout::Int4 { group: 128, asym: true });
        for bad in ["int2", "int4:g0", "int4:g3", "int4:x", "int8:g32", ""] {
            assert!(Quantize::parse_spec(bad).is_err(), "{bad}");
        }
        assert!(!Quantize::parse_sparsity("2:4").unwrap());
        assert!(!Quantize::parse_sparsity("2:4:magnitude").unwrap());
        assert!(Quantize::parse_sparsity("2:4:wanda").unwrap());
        for bad in ["3:4", "2:8", "2:4:x", "2", "", "2:4:wanda:1"] {
            assert!(Quantize::parse_sparsity(bad).is_err(), "{bad}");
        }
        let e = Quantize::parse_sparsity("3:4").unwrap_err().to_string();
        assert!(e.contains("3:4"), "{e}");
        assert_eq!(Quantize::combine(Some(ir::Layout::Int8), true).unwrap(), Some(ir::Layout::Sparse24 { int8: true }));
        assert_eq!(Quantize::combine(None, true).unwrap(), Some(ir::Layout::Sparse24 { int8: false }));
        assert!(Quantize::combine(Some(ir::Layout::Int4 { group: 32, asym: false }), true).is_err());
        assert!(glob(b"model.*.mlp.*", b"model.layers.0.mlp.up_proj.weight"));
        assert!(!glob(b"lm_?ead", b"lm_head.weight"));
    }

    fn from(spec: &str) -> Result<Quantize> {
        Quantize::from_spec(&PassSpec::parse(spec).unwrap(), &PassContext::default())
    }

    #[test]
    fn options_mean_what_the_flags_mean() {
        let flags: &[(Option<&str>, Option<&str>, &[&str])] = &[
            (Some("int8"), None, &[]),
            (Some("int4"), None, &["lm_head"]),
            (Some("int4:g128:asym"), None, &["lm_head", "model.*.mlp.*"]),
            (Some("w8a8"), None, &[]),
            (Some("w4a8:g64"), None, &[]),
            (None, Some("2:4"), &[]),
            (None, Some("2:4:wanda"), &["lm_head"]),
            (Some("int8"), Some("2:4:magnitude"), &[]),
        ];
        for &(q, sp, keep) in flags {
            let keep: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
            let spec = Quantize::spec_from_flags(q, sp, &keep).unwrap().expect("a quantize entry");
            // What the flags mean, composed as `llmc compile` did before the pass took options.
            let layout = Quantize::combine(q.map(|q| Quantize::parse_spec(q).unwrap()), sp.is_some()).unwrap().unwrap();
            let wanda = sp.is_some_and(|s| Quantize::parse_sparsity(s).unwrap());
            let want = Quantize { layout, keep_fp: keep.clone(), wanda, head: None };
            assert_eq!(Quantize::from_spec(&spec, &PassContext::default()).unwrap(), want, "{spec}");
            // Through the text form too.
            assert_eq!(from(&spec.to_string()).unwrap(), want, "{spec}");
        }
        let spec = Quantize::spec_from_flags(Some("int4:g32:asym"), None, &["lm_head".into(), "*.gate*".into()]).unwrap();
        assert_eq!(spec.unwrap().to_string(), "quantize{format=int4:g32:asym,keep-fp=lm_head;*.gate*}");
        let spec = Quantize::spec_from_flags(Some("int8"), Some("2:4"), &[]).unwrap();
        assert_eq!(spec.unwrap().to_string(), "quantize{format=int8,sparsity=2:4}");
        assert_eq!(Quantize::spec_from_flags(None, None, &[]).unwrap(), None);
    }

    #[test]
    fn bad_flags_and_options_are_errors_naming_them() {
        let flag_err = |q: Option<&str>, s: Option<&str>, k: &[&str]| {
            let k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
            Quantize::spec_from_flags(q, s, &k).unwrap_err().to_string()
        };
        assert_eq!(
            flag_err(Some("int3"), None, &[]),
            "quantize: --quant `int3`: unknown format (want int8, int4[:gN][:asym], w8a8 or w4a8[:gN])"
        );
        assert!(flag_err(None, Some("3:4"), &[]).contains("--sparsity `3:4`: only 2:4"));
        assert!(flag_err(Some("int4"), Some("2:4"), &[]).contains("--sparsity 2:4 combines with --quant int8 only"));
        assert!(flag_err(None, None, &["lm_head"]).contains("--keep-fp needs --quant or --sparsity"));
        assert!(flag_err(Some("int8"), None, &["a;b"]).contains("--keep-fp `a;b`: a pattern cannot hold `;`"));
        assert!(flag_err(Some("int8"), None, &[""]).contains("--keep-fp ``: an empty pattern"));

        let err = |spec: &str| from(spec).unwrap_err().to_string();
        let e = err("quantize");
        assert!(e.starts_with("pass `quantize`: needs `format` or `sparsity`") && e.contains("format=int8|int4"), "{e}");
        assert!(err("quantize{keep-fp=lm_head}").contains("needs `format` or `sparsity`"));
        assert_eq!(
            err("quantize{format=int2}"),
            "pass `quantize`, option `format=int2`: unknown format (allowed: int8|int4[:gN][:asym]|w8a8|w4a8[:gN])"
        );
        assert!(err("quantize{format=int4:g7}").contains("option `format=int4:g7`: the group size must be even"));
        assert!(err("quantize{format=w4a8:g16}").contains("multiple of 32"));
        assert_eq!(
            err("quantize{format=int4,sparsity=2:4}"),
            "pass `quantize`, option `sparsity=2:4`: 2:4 combines with format=int8 only, not int4 (allowed: 2:4[:magnitude|wanda])"
                .replace("not int4", &format!("not {}", ir::Layout::Int4 { group: 32, asym: false }))
        );
        assert!(err("quantize{sparsity=2:4:lottery}").contains("unknown pruning method `lottery`"));
        assert!(err("quantize{format=int8,keep-fp=\"a;;b\"}").contains("option `keep-fp=a;;b`: an empty pattern"));
        assert!(err("quantize{format=int8,bits=4}").contains("has no option `bits`; its options: format="));
        let q = from("quantize{sparsity=2:4:wanda,keep-fp=lm_head;*.down*}").unwrap();
        assert_eq!(q, Quantize { layout: ir::Layout::Sparse24 { int8: false }, keep_fp: vec!["lm_head".into(), "*.down*".into()], wanda: true, head: None });
        assert!(err("quantize{format=int8,head=2:4}").contains("option `head=2:4`"));
        assert_eq!(from("quantize{format=int4,head=none}").unwrap().head, Some(None));
        assert_eq!(from("quantize{format=int4,head=int4:g64}").unwrap().head, Some(Some(ir::Layout::Int4 { group: 64, asym: false })));
        let flag_head = |h: &str| Quantize::spec_from_flags_with_head(Some("int4"), None, Some(h), &[]);
        assert_eq!(flag_head("none").unwrap().unwrap().to_string(), "quantize{format=int4,head=none}");
        assert!(flag_head("int3").unwrap_err().to_string().contains("--head-quant `int3`: unknown format"));
        let e = Quantize::spec_from_flags_with_head(None, None, Some("int8"), &[]).unwrap_err().to_string();
        assert!(e.contains("--head-quant needs --quant or --sparsity"), "{e}");
    }

    /// A small LM: an embedding table (tied to the head or not), one product, the head.
    fn lm(tied: bool) -> ir::Graph {
        let mut g = ir::Graph::new("lm");
        g.meta.insert("vocab_size".into(), "16".into());
        let (_, x) = embed(&mut g, 16, 8);
        let w = weight(&mut g, "layers.0.up", &[8, 8]);
        let y = g.add(Op::Matmul { transpose_b: true }, &[x, w], None).unwrap();
        let head = if tied { g.inputs(x)[0] } else { weight(&mut g, "lm_head", &[16, 8]) };
        let logits = g.add(Op::Matmul { transpose_b: true }, &[y, head], None).unwrap();
        g.outputs.push(logits);
        ir::verify(&g).unwrap();
        g
    }

    fn q(layout: ir::Layout, head: Option<Option<ir::Layout>>, keep: &[&str]) -> Quantize {
        Quantize { layout, keep_fp: keep.iter().map(|s| s.to_string()).collect(), wanda: false, head }
    }

    #[test]
    fn heads_and_embedding_tables_take_their_formats() {
        use ir::Layout::*;
        let i4 = Int4 { group: 32, asym: false };
        // Tied: the one table is the head (8-bit by default under a 4-bit format: w8a8 under
        // w4a8, int8 under weight-only int4).
        for (main, head, want) in [
            (i4, None, Some(Int8)),
            (W4A8 { group: 32 }, None, Some(W8A8)),
            (Int8, None, Some(Int8)),
            (W8A8, None, Some(W8A8)),
            (i4, Some(Some(i4)), Some(i4)),
            (i4, Some(None), None),
            (Sparse24 { int8: false }, None, None),
        ] {
            let mut g = lm(true);
            let st = q(main, head, &[]).run(&mut g).unwrap();
            let got = layouts(&g);
            assert_eq!(got[0], ("embed".into(), want.unwrap_or(Dense)), "{main} head {head:?}");
            assert_eq!(got[1].1, main, "{main}");
            assert_eq!(st.notes.len(), want.is_none() as usize, "{main}: {:?}", st.notes);
            // The interpreter reads the quantized table for the gather and the head alike.
            let w = weights_for(&[&g]);
            ir::Interpreter::new(&w).run(&g, &[3, 15]).unwrap();
        }
        // Untied: the table takes the format's weight format, the head the head format.
        let mut g = lm(false);
        q(W4A8 { group: 32 }, None, &[]).run(&mut g).unwrap();
        assert_eq!(
            layouts(&g),
            vec![("embed".into(), i4), ("layers.0.up".into(), W4A8 { group: 32 }), ("lm_head".into(), W8A8)]
        );
        let mut g = lm(false);
        q(Sparse24 { int8: true }, None, &[]).run(&mut g).unwrap();
        assert_eq!(layouts(&g), vec![("embed".into(), Int8), ("layers.0.up".into(), Sparse24 { int8: true }), ("lm_head".into(), Int8)]);
        let mut g = lm(false);
        let st = q(Sparse24 { int8: false }, None, &[]).run(&mut g).unwrap();
        assert_eq!(layouts(&g)[0].1, Dense);
        assert!(st.notes.iter().any(|n| n.starts_with("float embed [16, 8]: an embedding table")), "{:?}", st.notes);
        assert!(st.notes.iter().any(|n| n.starts_with("float lm_head [16, 8]: the LM head is not pruned")), "{:?}", st.notes);
        // --keep-fp still wins.
        let mut g = lm(true);
        let st = q(i4, None, &["embed"]).run(&mut g).unwrap();
        assert_eq!(layouts(&g)[0].1, Dense);
        assert_eq!(st.notes, vec!["float embed [16, 8]: --keep-fp `embed`".to_string()]);
    }

    #[test]
    fn flags_that_would_change_nothing_are_errors() {
        let i4 = ir::Layout::Int4 { group: 32, asym: false };
        let e = q(i4, None, &["no_such_weight"]).run(&mut lm(true)).unwrap_err().to_string();
        assert!(e.contains("--keep-fp `no_such_weight` matches no weight of `lm`"), "{e}");
        let e = q(i4, None, &["embed", "up"]).run(&mut lm(true)).unwrap_err().to_string();
        assert!(e.contains("--quant int4:g32 would change nothing") && e.contains("float embed [16, 8]: --keep-fp `embed`"), "{e}");
        // GPT-2's Conv1D products: refused by name, not a silent all-f32 artifact.
        let mut g = ir::Graph::new("conv");
        let (_, x) = embed(&mut g, 16, 8);
        let w = weight(&mut g, "c_attn", &[8, 8]);
        let y = g.add(Op::Matmul { transpose_b: false }, &[x, w], None).unwrap();
        g.outputs.push(y);
        let e = q(i4, Some(Some(ir::Layout::Int8)), &[]).run(&mut g).unwrap_err().to_string();
        assert!(e.contains("--head-quant would change nothing: `conv` has no LM head"), "{e}");
        let mut keep = q(i4, None, &["embed"]);
        let e = keep.run(&mut g).unwrap_err().to_string();
        assert!(e.contains("would change nothing") && e.contains("c_attn [8, 8]: the [K, N] operand of a non-transposed product"), "{e}");
        keep.keep_fp.clear();
        keep.run(&mut g).unwrap(); // the untied table alone still takes the format
    }
}

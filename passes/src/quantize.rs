//! `quantize`: round-to-nearest weight quantization as a layout change.
//!
//! Sets the [`ir::Layout`] of every 2-D weight whose every use is the right-hand side of a
//! `matmul {transpose_b}`, `linear {transpose_b}` or `gated_linear` (directly, or through a
//! row-wise `concat {axis = 0}` of weights that only feeds such uses). Embedding tables (used by
//! `gather`), norms, biases and weights matching a `--keep-fp` pattern stay f32. The values'
//! types do not change; their semantics become the dequantized tensors (see `ir::quant`), so the
//! interpreter and every backend agree on the quantized graph. Not in the default pipeline: a
//! pipeline names it with its options, `quantize{format=int4:g64,keep-fp=lm_head}`, and
//! `llmc compile --quant/--sparsity/--keep-fp` append that entry ([`Quantize::spec_from_flags`]).
//! `quantize` without a format or a sparsity is an error, not a silent int8.
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
        let layout = quant.map(Quantize::parse_spec).transpose()?;
        let wanda = sparsity.map(Quantize::parse_sparsity).transpose()?;
        if Quantize::combine(layout, wanda.is_some())?.is_none() {
            if !keep_fp.is_empty() {
                return Err(PassError::Quant("--keep-fp needs --quant or --sparsity".into()));
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
        if !keep_fp.is_empty() {
            spec = spec.with("keep-fp", keep_fp.join(";"));
        }
        Ok(Some(spec))
    }

    fn keep(&self, name: &str) -> bool {
        self.keep_fp.iter().any(|p| name.contains(p.as_str()) || glob(p.as_bytes(), name.as_bytes()))
    }
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
        Ok(Quantize { layout, keep_fp, wanda: wanda.unwrap_or(false) })
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
        for n in nodes {
            let ir::Op::Weight { name, layout, .. } = g.op(n) else {
                continue;
            };
            if *layout != ir::Layout::Dense || g.ty(n).rank() != 2 || !rhs_only(g, n) {
                continue;
            }
            let k = g.ty(n).shape[1].as_const();
            if matches!(self.layout, ir::Layout::Sparse24 { .. }) && k.is_none_or(|k| k % 4 != 0) {
                kept += 1;
                continue;
            }
            if self.keep(name) {
                kept += 1;
                continue;
            }
            params += g.ty(n).static_numel().unwrap_or(0) as u64;
            if let ir::Op::Weight { layout, .. } = &mut g.g[n].op {
                *layout = self.layout;
            }
            done += 1;
        }
        st.bump("quantized", done);
        st.bump("kept-fp", kept);
        st.bump("quantized-params", params);
        if done == 0 {
            st.notes.push("no weight qualified for quantization".into());
        }
        Ok(st)
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
        let st = Quantize { layout: l, keep_fp: vec!["lm_*".into()], wanda: false }.run(&mut g).unwrap();
        ir::verify(&g).unwrap();
        assert_eq!(st.get("quantized"), 3);
        assert_eq!(st.get("kept-fp"), 1);
        let d = ir::Layout::Dense;
        assert_eq!(
            layouts(&g),
            vec![
                ("embed".into(), d),
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
            let want = Quantize { layout, keep_fp: keep.clone(), wanda };
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
        assert_eq!(q, Quantize { layout: ir::Layout::Sparse24 { int8: false }, keep_fp: vec!["lm_head".into(), "*.down*".into()], wanda: true });
    }
}

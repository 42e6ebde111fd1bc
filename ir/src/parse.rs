//! Parser for the text form written by [`print`](crate::print): `parse(print(g)) == g`.
//! Comments run from `;` to the end of the line. Value names are any `%word`, defined before use.
//! A state declaration without a kind (`state @k : f32[16,4]`, the text before Redesign I) is a
//! contiguous KV cache.

use std::collections::{BTreeMap, HashMap};

use crate::error::{IrError, Result};
use crate::graph::{Graph, KvLayout, NodeId, StateDecl, StateKind};
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::types::{DType, Dim, Layout, TensorType};

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Value(String),
    Global(String),
    Ident(String),
    Num(String),
    Str(String),
    Punct(char),
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn lex(line: &str, ln: usize) -> Result<Vec<Tok>> {
    let err = |msg: String| IrError::Parse { line: ln, msg };
    let cs: Vec<char> = line.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == ';' {
            break;
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match cs.get(i) {
                    None => return Err(err("unterminated string".into())),
                    Some('"') => break,
                    Some('\\') => {
                        i += 1;
                        match cs.get(i) {
                            Some('n') => s.push('\n'),
                            Some(&c) => s.push(c),
                            None => return Err(err("unterminated escape".into())),
                        }
                    }
                    Some(&c) => s.push(c),
                }
                i += 1;
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if c == '%' || c == '@' {
            let start = i + 1;
            i += 1;
            while i < cs.len() && is_ident_char(cs[i]) {
                i += 1;
            }
            if i == start {
                return Err(err(format!("empty name after `{c}`")));
            }
            let w: String = cs[start..i].iter().collect();
            out.push(if c == '%' { Tok::Value(w) } else { Tok::Global(w) });
        } else if c.is_ascii_digit() || c == '-' || c == '+' {
            let start = i;
            i += 1;
            while i < cs.len() && (cs[i].is_ascii_alphanumeric() || matches!(cs[i], '.' | '-' | '+')) {
                i += 1;
            }
            out.push(Tok::Num(cs[start..i].iter().collect()));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < cs.len() && (cs[i].is_ascii_alphanumeric() || cs[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(cs[start..i].iter().collect()));
        } else if "=,:[]{}<>".contains(c) {
            out.push(Tok::Punct(c));
            i += 1;
        } else {
            return Err(err(format!("unexpected character `{c}`")));
        }
    }
    Ok(out)
}

/// An attribute value.
#[derive(Debug, Clone)]
enum AVal {
    Flag,
    Num(String),
    Str(String),
    Global(String),
    Ident(String),
    List(Vec<String>),
}

struct Cursor<'a> {
    t: &'a [Tok],
    i: usize,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(IrError::Parse { line: self.line, msg: msg.into() })
    }
    fn peek(&self) -> Option<&'a Tok> {
        self.t.get(self.i)
    }
    fn next(&mut self) -> Option<&'a Tok> {
        let t = self.t.get(self.i);
        self.i += 1;
        t
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: char) -> Result<()> {
        if self.eat(c) {
            Ok(())
        } else {
            self.err(format!("expected `{c}`, found {:?}", self.peek()))
        }
    }
    fn ident(&mut self) -> Result<&'a str> {
        match self.next() {
            Some(Tok::Ident(s)) => Ok(s),
            t => self.err(format!("expected a word, found {t:?}")),
        }
    }
    fn global(&mut self) -> Result<&'a str> {
        match self.next() {
            Some(Tok::Global(s)) => Ok(s),
            t => self.err(format!("expected `@name`, found {t:?}")),
        }
    }
    fn end(&self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(t) => self.err(format!("unexpected {t:?} at end of line")),
        }
    }

    /// A state's kind before its type: `kv<LAYOUT>`, or nothing (a contiguous KV cache).
    fn state_kind(&mut self) -> Result<StateKind> {
        match self.peek() {
            Some(Tok::Ident(w)) if w == "kv" => {
                self.next();
                self.expect('<')?;
                let name = self.ident()?;
                let Some(layout) = KvLayout::from_name(name) else {
                    let known: Vec<&str> = KvLayout::ALL.iter().map(|l| l.name()).collect();
                    return self.err(format!("unknown KV-cache layout `{name}` (known: {})", known.join(", ")));
                };
                self.expect('>')?;
                Ok(StateKind::Kv { layout })
            }
            _ => Ok(StateKind::CONTIGUOUS_KV),
        }
    }

    fn ty(&mut self) -> Result<TensorType> {
        let d = self.ident()?;
        let dtype = match DType::from_name(d) {
            Some(d) => d,
            None => return self.err(format!("unknown dtype `{d}`")),
        };
        self.expect('[')?;
        let mut shape = Vec::new();
        if !self.eat(']') {
            loop {
                shape.push(match self.next() {
                    Some(Tok::Num(n)) => match n.parse() {
                        Ok(v) => Dim::N(v),
                        Err(_) => return self.err(format!("bad dimension `{n}`")),
                    },
                    Some(Tok::Ident(s)) if s == "S" => Dim::S,
                    Some(Tok::Ident(s)) if s == "P" => Dim::P,
                    Some(Tok::Ident(s)) if s == "T" => Dim::T,
                    t => return self.err(format!("bad dimension {t:?}")),
                });
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        Ok(TensorType::new(dtype, shape))
    }

    fn attrs(&mut self) -> Result<BTreeMap<String, AVal>> {
        let mut m = BTreeMap::new();
        if !self.eat('{') {
            return Ok(m);
        }
        if self.eat('}') {
            return Ok(m);
        }
        loop {
            let k = self.ident()?.to_string();
            let v = if self.eat('=') {
                match self.next() {
                    Some(Tok::Num(n)) => AVal::Num(n.clone()),
                    Some(Tok::Str(s)) => AVal::Str(s.clone()),
                    Some(Tok::Global(s)) => AVal::Global(s.clone()),
                    Some(Tok::Ident(s)) => AVal::Ident(s.clone()),
                    Some(Tok::Punct('[')) => {
                        let mut items = Vec::new();
                        if !self.eat(']') {
                            loop {
                                match self.next() {
                                    Some(Tok::Num(n)) => items.push(n.clone()),
                                    Some(Tok::Ident(n)) => items.push(n.clone()),
                                    t => return self.err(format!("bad list item {t:?}")),
                                }
                                if self.eat(']') {
                                    break;
                                }
                                self.expect(',')?;
                            }
                        }
                        AVal::List(items)
                    }
                    t => return self.err(format!("bad attribute value {t:?}")),
                }
            } else {
                AVal::Flag
            };
            if m.insert(k.clone(), v).is_some() {
                return self.err(format!("attribute `{k}` given twice"));
            }
            if self.eat('}') {
                break;
            }
            self.expect(',')?;
        }
        Ok(m)
    }
}

struct Attrs {
    m: BTreeMap<String, AVal>,
    line: usize,
    op: String,
}

impl Attrs {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(IrError::Parse { line: self.line, msg: format!("`{}`: {}", self.op, msg.into()) })
    }
    fn take(&mut self, k: &str) -> Option<AVal> {
        self.m.remove(k)
    }
    fn req(&mut self, k: &str) -> Result<AVal> {
        match self.take(k) {
            Some(v) => Ok(v),
            None => self.err(format!("missing attribute `{k}`")),
        }
    }
    fn usize(&mut self, k: &str) -> Result<usize> {
        match self.req(k)? {
            AVal::Num(n) => match n.parse() {
                Ok(v) => Ok(v),
                Err(_) => self.err(format!("`{k}` must be a non-negative integer, got `{n}`")),
            },
            v => self.err(format!("`{k}` must be an integer, got {v:?}")),
        }
    }
    fn f32(&mut self, k: &str) -> Result<f32> {
        match self.req(k)? {
            AVal::Num(n) | AVal::Ident(n) => match crate::print::parse_f32(&n) {
                Some(v) => Ok(v),
                None => self.err(format!("`{k}` must be a number, got `{n}`")),
            },
            v => self.err(format!("`{k}` must be a number, got {v:?}")),
        }
    }
    fn unary(&mut self, k: &str) -> Result<UnaryOp> {
        match self.req(k)? {
            AVal::Ident(n) => match UnaryOp::ALL.iter().find(|u| u.name() == n) {
                Some(u) => Ok(*u),
                None => self.err(format!("`{k}`: unknown activation `{n}`")),
            },
            v => self.err(format!("`{k}` must be an activation name, got {v:?}")),
        }
    }
    fn string(&mut self, k: &str) -> Result<String> {
        match self.req(k)? {
            AVal::Str(s) => Ok(s),
            v => self.err(format!("`{k}` must be a string, got {v:?}")),
        }
    }
    fn flag(&mut self, k: &str) -> Result<bool> {
        match self.take(k) {
            None => Ok(false),
            Some(AVal::Flag) => Ok(true),
            Some(v) => self.err(format!("`{k}` is a flag and takes no value, got {v:?}")),
        }
    }
    fn list(&mut self, k: &str) -> Result<Vec<String>> {
        match self.req(k)? {
            AVal::List(l) => Ok(l),
            v => self.err(format!("`{k}` must be a list, got {v:?}")),
        }
    }
    fn done(self) -> Result<()> {
        match self.m.keys().next() {
            None => Ok(()),
            Some(k) => self.err(format!("unknown attribute `{k}`")),
        }
    }
}

fn make_op(name: &str, a: &mut Attrs) -> Result<Op> {
    if let Some(u) = UnaryOp::ALL.iter().find(|u| u.name() == name) {
        return Ok(Op::Unary(*u));
    }
    if let Some(b) = BinaryOp::ALL.iter().find(|b| b.name() == name) {
        return Ok(Op::Binary(*b));
    }
    if let Some(r) = ReduceOp::ALL.iter().find(|r| r.name() == name) {
        return Ok(Op::Reduce(*r));
    }
    Ok(match name {
        "input" => Op::Input { name: a.string("name")? },
        "positions" => Op::Positions,
        "weight" => {
            let wname = a.string("name")?;
            let stored = match a.take("stored") {
                None => DType::F32,
                Some(AVal::Ident(d)) => match DType::from_name(&d) {
                    Some(d) => d,
                    None => return a.err(format!("unknown dtype `{d}`")),
                },
                Some(v) => return a.err(format!("`stored` must be a dtype, got {v:?}")),
            };
            let layout = match a.take("layout") {
                None => Layout::Dense,
                Some(AVal::Ident(l)) => match Layout::from_name(&l) {
                    Some(l) => l,
                    None => return a.err(format!("unknown layout `{l}` (want int8, int4_gN or int4_gN_asym)")),
                },
                Some(v) => return a.err(format!("`layout` must be a layout name, got {v:?}")),
            };
            Op::Weight { name: wname, stored, layout }
        }
        "const" => {
            let mut values = Vec::new();
            for v in a.list("values")? {
                match crate::print::parse_f32(&v) {
                    Some(x) => values.push(x),
                    None => return a.err(format!("bad float `{v}`")),
                }
            }
            Op::Const { values }
        }
        "gather" => Op::Gather,
        "softmax" => Op::Softmax,
        "matmul" => Op::Matmul { transpose_b: a.flag("transpose_b")? },
        "transpose" => {
            let mut perm = Vec::new();
            for v in a.list("perm")? {
                match v.parse() {
                    Ok(x) => perm.push(x),
                    Err(_) => return a.err(format!("bad axis `{v}`")),
                }
            }
            Op::Transpose { perm }
        }
        "reshape" => Op::Reshape,
        "slice" => Op::Slice { axis: a.usize("axis")?, start: a.usize("start")?, end: a.usize("end")? },
        "rope" => Op::Rope { rotary_dim: a.usize("rotary_dim")? },
        "causal_mask" => Op::CausalMask { window: if a.m.contains_key("window") { Some(a.usize("window")?) } else { None } },
        "kv_concat" => match a.req("state")? {
            AVal::Global(s) => Op::KvConcat { state: s },
            v => return a.err(format!("`state` must be `@name`, got {v:?}")),
        },
        "concat" => Op::Concat { axis: a.usize("axis")?, n: a.usize("n")? },
        "attention" => Op::Attention {
            scale: a.f32("scale")?,
            window: if a.m.contains_key("window") { Some(a.usize("window")?) } else { None },
            causal: !a.flag("bidirectional")?,
        },
        "rms_norm" => Op::RmsNorm { eps: a.f32("eps")? },
        "layer_norm" => Op::LayerNorm { eps: a.f32("eps")? },
        "linear" => Op::Linear {
            transpose_b: a.flag("transpose_b")?,
            bias: a.flag("bias")?,
            act: if a.m.contains_key("act") { Some(a.unary("act")?) } else { None },
            residual: a.flag("residual")?,
        },
        "gated_linear" => Op::GatedLinear { act: a.unary("act")? },
        "moe" => Op::Moe { top_k: a.usize("top_k")?, act: a.unary("act")? },
        other => return a.err(format!("unknown op `{other}`")),
    })
}

/// Parses a graph. Types are taken as written; run [`verify`](crate::verify) to check them.
pub fn parse(text: &str) -> Result<Graph> {
    let mut g = Graph::default();
    let mut values: HashMap<String, NodeId> = HashMap::new();
    let mut state = 0; // 0: before header, 1: in body, 2: after closing brace
    let mut returned = false;
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        let toks = lex(raw, line)?;
        if toks.is_empty() {
            continue;
        }
        let mut c = Cursor { t: &toks, i: 0, line };
        match state {
            0 => {
                if c.ident()? != "graph" {
                    return c.err("expected `graph @name {`");
                }
                g.name = c.global()?.to_string();
                c.expect('{')?;
                c.end()?;
                state = 1;
            }
            1 => match c.peek() {
                Some(Tok::Punct('}')) => {
                    c.next();
                    c.end()?;
                    state = 2;
                }
                Some(Tok::Ident(w)) if w == "meta" => {
                    c.next();
                    let k = c.ident()?.to_string();
                    c.expect('=')?;
                    let v = match c.next() {
                        Some(Tok::Str(s)) => s.clone(),
                        t => return c.err(format!("meta value must be a string, found {t:?}")),
                    };
                    c.end()?;
                    g.meta.insert(k, v);
                }
                Some(Tok::Ident(w)) if w == "state" => {
                    c.next();
                    let name = c.global()?.to_string();
                    c.expect(':')?;
                    let kind = c.state_kind()?;
                    let ty = c.ty()?;
                    c.end()?;
                    if g.state(&name).is_some() {
                        return c.err(format!("state @{name} declared twice"));
                    }
                    g.states.push(StateDecl { name, ty, kind });
                }
                Some(Tok::Ident(w)) if w == "return" => {
                    c.next();
                    if returned {
                        return c.err("second `return`");
                    }
                    returned = true;
                    loop {
                        match c.next() {
                            Some(Tok::Value(v)) => match values.get(v) {
                                Some(&n) => g.outputs.push(n),
                                None => return c.err(format!("undefined value %{v}")),
                            },
                            t => return c.err(format!("expected a value, found {t:?}")),
                        }
                        if c.peek().is_none() {
                            break;
                        }
                        c.expect(',')?;
                    }
                }
                Some(Tok::Value(v)) => {
                    if returned {
                        return c.err("instruction after `return`");
                    }
                    let v = v.clone();
                    c.next();
                    c.expect('=')?;
                    let opname = c.ident()?.to_string();
                    let mut ins = Vec::new();
                    while let Some(Tok::Value(x)) = c.peek() {
                        c.next();
                        match values.get(x) {
                            Some(&n) => ins.push(n),
                            None => return c.err(format!("undefined value %{x}")),
                        }
                        if !c.eat(',') {
                            break;
                        }
                    }
                    let mut attrs = Attrs { m: c.attrs()?, line, op: opname.clone() };
                    c.expect(':')?;
                    let ty = c.ty()?;
                    c.end()?;
                    let op = make_op(&opname, &mut attrs)?;
                    attrs.done()?;
                    if ins.len() != op.arity() {
                        return c.err(format!("`{opname}` takes {} operands, got {}", op.arity(), ins.len()));
                    }
                    let n = g.add_typed(op, &ins, ty);
                    if values.insert(v.clone(), n).is_some() {
                        return c.err(format!("value %{v} defined twice"));
                    }
                }
                t => return c.err(format!("unexpected {t:?}")),
            },
            _ => return c.err("text after the closing `}`"),
        }
    }
    match state {
        0 => Err(IrError::Parse { line: 0, msg: "no `graph` found".into() }),
        1 => Err(IrError::Parse { line: text.lines().count(), msg: "missing closing `}`".into() }),
        _ => Ok(g),
    }
}

//! Pipeline specs in MLIR's spelling: `dce,optimize{target=cuda},quantize{format=int4:g64}`.
//!
//! ```text
//! pipeline := [ entry ( "," entry )* ]            (empty or blank: no passes)
//! entry    := name [ "{" [ option ( "," option )* ] "}" ]
//! option   := key "=" value
//! name,key := [A-Za-z0-9_-]+
//! value    := bare | quoted
//! bare     := one or more characters other than whitespace and , { } = " \
//! quoted   := '"' ( any character but " and \ | '\"' | '\\' )* '"'
//! ```
//!
//! Whitespace around names, keys, `=`, values, commas and braces is ignored. A bare value may hold
//! `:`, `;`, `*`, `?`, `.` and `/` (`format=int4:g64:asym`, `keep-fp=lm_head;*.gate*`); a value
//! holding whitespace or any of `, { } = " \` must be quoted (`keep-fp="a,b"`), with `\"` and
//! `\\` as its only escapes. An option may be given once per entry. This module checks only the
//! grammar; which passes and options exist is the registry's business
//! ([`crate::registry`]).
//!
//! [`PassSpec`] and [`Pipeline`] print in the canonical form (no whitespace, a value quoted only
//! when it must be, options in the order given), so `parse(print(x)) == x` and
//! `print(parse(s))` is the canonical spelling of `s`.

use std::fmt;
use std::str::FromStr;

use crate::error::{PassError, Result};

/// One pipeline entry: a pass name and its options in the order written.
///
/// Invariant (upheld by the parser; constructors should keep it): `name` and every key are
/// non-empty and made of ASCII letters, digits, `-` and `_`, and no key repeats. Values are
/// arbitrary strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PassSpec {
    pub name: String,
    pub options: Vec<(String, String)>,
}

impl PassSpec {
    /// An entry with no options.
    pub fn new(name: impl Into<String>) -> Self {
        PassSpec { name: name.into(), options: Vec::new() }
    }

    /// The same entry with option `key = value` appended.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    /// The value of option `key`, if given.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Parses exactly one entry (`optimize{target=cuda}`).
    pub fn parse(s: &str) -> Result<PassSpec> {
        let mut p = Parser::new(s);
        p.skip_ws();
        let spec = p.entry()?;
        p.skip_ws();
        match p.peek() {
            None => Ok(spec),
            Some(c) => {
                Err(p.error(format!("unexpected `{c}` after pass `{}`: a single pass entry was expected", spec.name)))
            }
        }
    }
}

impl fmt::Display for PassSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.options.is_empty() {
            return Ok(());
        }
        f.write_str("{")?;
        for (i, (k, v)) in self.options.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}=")?;
            write_value(f, v)?;
        }
        f.write_str("}")
    }
}

impl FromStr for PassSpec {
    type Err = PassError;
    fn from_str(s: &str) -> Result<Self> {
        PassSpec::parse(s)
    }
}

/// A whole pipeline: the entries in run order. Derefs to the slice of entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pipeline {
    pub passes: Vec<PassSpec>,
}

impl Pipeline {
    /// Parses a comma-separated pipeline; see the module docs for the grammar. An empty or blank
    /// string is the empty pipeline.
    pub fn parse(s: &str) -> Result<Pipeline> {
        let mut p = Parser::new(s);
        let mut passes = Vec::new();
        p.skip_ws();
        if p.peek().is_none() {
            return Ok(Pipeline { passes });
        }
        loop {
            let spec = p.entry()?;
            p.skip_ws();
            match p.peek() {
                None => {
                    passes.push(spec);
                    return Ok(Pipeline { passes });
                }
                Some(',') => {
                    p.bump();
                    p.skip_ws();
                    if p.peek().is_none() {
                        return Err(p.error(format!("a pass name must follow the `,` after pass `{}`", spec.name)));
                    }
                    passes.push(spec);
                }
                Some('}') => return Err(p.error(format!("unbalanced `}}` after pass `{}`", spec.name))),
                Some(c) => {
                    return Err(p.error(format!("unexpected `{c}` after pass `{}`: expected `,` or `{{`", spec.name)))
                }
            }
        }
    }

    /// Appends an entry.
    pub fn push(&mut self, spec: PassSpec) {
        self.passes.push(spec);
    }

    /// The pass names in order.
    pub fn names(&self) -> Vec<&str> {
        self.passes.iter().map(|p| p.name.as_str()).collect()
    }
}

impl std::ops::Deref for Pipeline {
    type Target = [PassSpec];
    fn deref(&self) -> &[PassSpec] {
        &self.passes
    }
}

impl<'a> IntoIterator for &'a Pipeline {
    type Item = &'a PassSpec;
    type IntoIter = std::slice::Iter<'a, PassSpec>;
    fn into_iter(self) -> Self::IntoIter {
        self.passes.iter()
    }
}

impl From<Vec<PassSpec>> for Pipeline {
    fn from(passes: Vec<PassSpec>) -> Self {
        Pipeline { passes }
    }
}

impl FromIterator<PassSpec> for Pipeline {
    fn from_iter<I: IntoIterator<Item = PassSpec>>(iter: I) -> Self {
        Pipeline { passes: iter.into_iter().collect() }
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.passes.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl FromStr for Pipeline {
    type Err = PassError;
    fn from_str(s: &str) -> Result<Self> {
        Pipeline::parse(s)
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Characters a bare (unquoted) value may not hold.
fn needs_quotes(c: char) -> bool {
    c.is_whitespace() || matches!(c, ',' | '{' | '}' | '=' | '"' | '\\')
}

/// `v` bare when it can be, else quoted with `\"` and `\\` escaped.
fn write_value(f: &mut fmt::Formatter<'_>, v: &str) -> fmt::Result {
    if !v.is_empty() && !v.chars().any(needs_quotes) {
        return f.write_str(v);
    }
    f.write_str("\"")?;
    for c in v.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

/// A cursor over the spec's characters; errors carry the 1-based column of the cursor.
struct Parser<'a> {
    src: &'a str,
    chars: Vec<char>,
    i: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser { src, chars: src.chars().collect(), i: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek();
        self.i += usize::from(c.is_some());
        c
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.i += 1;
        }
    }

    fn error(&self, why: String) -> PassError {
        self.error_at(self.i, why)
    }

    fn error_at(&self, i: usize, why: String) -> PassError {
        PassError::Syntax { pipeline: self.src.to_string(), column: i + 1, why }
    }

    fn ident(&mut self) -> String {
        let start = self.i;
        while self.peek().is_some_and(is_ident) {
            self.i += 1;
        }
        self.chars[start..self.i].iter().collect()
    }

    /// `name [ "{" options "}" ]`, the cursor on the name's first character.
    fn entry(&mut self) -> Result<PassSpec> {
        let name = self.ident();
        if name.is_empty() {
            return Err(match self.peek() {
                None => self.error("expected a pass name at the end".into()),
                Some(',') => self.error("empty pipeline entry: expected a pass name before `,`".into()),
                Some(c) => self.error(format!("expected a pass name, found `{c}`")),
            });
        }
        let mut spec = PassSpec::new(name);
        self.skip_ws();
        if self.peek() == Some('{') {
            self.options(&mut spec)?;
        }
        Ok(spec)
    }

    /// `"{" [ key "=" value ( "," key "=" value )* ] "}"`, the cursor on the `{`.
    fn options(&mut self, spec: &mut PassSpec) -> Result<()> {
        let open = self.i;
        let pass = spec.name.clone();
        let unclosed =
            |p: &Self| p.error_at(open, format!("the `{{` of pass `{pass}` is never closed (unbalanced brace)"));
        self.bump();
        self.skip_ws();
        if self.peek() == Some('}') {
            self.bump();
            return Ok(());
        }
        loop {
            self.skip_ws();
            let key_at = self.i;
            let key = self.ident();
            if key.is_empty() {
                return Err(match self.peek() {
                    None => unclosed(self),
                    Some(c) => self.error(format!("pass `{pass}`: expected an option name, found `{c}`")),
                });
            }
            self.skip_ws();
            match self.peek() {
                Some('=') => {
                    self.bump();
                }
                None => return Err(unclosed(self)),
                Some(c) if c == ',' || c == '}' => {
                    return Err(self.error(format!("pass `{pass}`: option `{key}` has no value: write `{key}=VALUE`")))
                }
                Some(c) => {
                    return Err(self.error(format!("pass `{pass}`: expected `=` after option `{key}`, found `{c}`")))
                }
            }
            self.skip_ws();
            let value = self.value(&pass, &key, open)?;
            if spec.option(&key).is_some() {
                return Err(self.error_at(key_at, format!("pass `{pass}`: option `{key}` is given twice")));
            }
            spec.options.push((key.clone(), value));
            self.skip_ws();
            match self.bump() {
                Some(',') => continue,
                Some('}') => return Ok(()),
                None => return Err(unclosed(self)),
                Some(c) => {
                    self.i -= 1;
                    return Err(self.error(format!(
                        "pass `{pass}`, option `{key}`: unexpected `{c}` in the value; quote a value that holds \
                         whitespace or any of , {{ }} = \" \\ (`{key}=\"...\"`)"
                    )));
                }
            }
        }
    }

    /// A bare or quoted value, the cursor on its first character.
    fn value(&mut self, pass: &str, key: &str, open: usize) -> Result<String> {
        if self.peek() != Some('"') {
            let start = self.i;
            while self.peek().is_some_and(|c| !needs_quotes(c)) {
                self.i += 1;
            }
            if self.i == start {
                return Err(match self.peek() {
                    None => {
                        self.error_at(open, format!("the `{{` of pass `{pass}` is never closed (unbalanced brace)"))
                    }
                    Some(c) if c == ',' || c == '}' => self.error(format!(
                        "pass `{pass}`: option `{key}` has an empty value (write `{key}=\"\"` for an empty string)"
                    )),
                    Some(c) => self.error(format!(
                        "pass `{pass}`, option `{key}`: a value starting with `{c}` must be quoted (`{key}=\"...\"`)"
                    )),
                });
            }
            return Ok(self.chars[start..self.i].iter().collect());
        }
        let quote = self.i;
        self.bump();
        let mut v = String::new();
        loop {
            match self.bump() {
                None => {
                    return Err(self.error_at(
                        quote,
                        format!("pass `{pass}`, option `{key}`: the quoted value is never closed (missing `\"`)"),
                    ))
                }
                Some('"') => return Ok(v),
                Some('\\') => match self.bump() {
                    Some(c @ ('"' | '\\')) => v.push(c),
                    Some(c) => {
                        self.i -= 1;
                        return Err(self.error(format!(
                            "pass `{pass}`, option `{key}`: unknown escape `\\{c}` in a quoted value (only `\\\"` and `\\\\`)"
                        )));
                    }
                    None => {
                        return Err(self.error_at(
                            quote,
                            format!("pass `{pass}`, option `{key}`: the quoted value is never closed (missing `\"`)"),
                        ))
                    }
                },
                Some(c) => v.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    fn pl(s: &str) -> Pipeline {
        Pipeline::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        match Pipeline::parse(s) {
            Ok(p) => panic!("`{s}` parsed as {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_names_and_options() {
        let p = pl("dce,optimize{target=cuda},quantize{format=int4:g64,keep-fp=lm_head}");
        assert_eq!(p.names(), vec!["dce", "optimize", "quantize"]);
        assert_eq!(p[0], PassSpec::new("dce"));
        assert_eq!(p[1], PassSpec::new("optimize").with("target", "cuda"));
        assert_eq!(p[2], PassSpec::new("quantize").with("format", "int4:g64").with("keep-fp", "lm_head"));
        assert_eq!(p.to_string(), "dce,optimize{target=cuda},quantize{format=int4:g64,keep-fp=lm_head}");
        // Whitespace anywhere between tokens; `{}` is no options.
        let q = pl("  dce ,\toptimize { target = cuda } , quantize{ format=int4:g64 ,keep-fp= lm_head }, cse{}  ");
        assert_eq!(q.to_string(), format!("{p},cse"));
        assert!(pl("").is_empty() && pl("  ").is_empty());
        assert_eq!(pl("a{k=\"x, y{}=\\\"\\\\\"}")[0].option("k"), Some("x, y{}=\"\\"));
        assert_eq!(pl("a{k=\"\"}")[0].option("k"), Some(""));
        assert_eq!(pl("a{k=*.mlp.*;lm_?ead}")[0].option("k"), Some("*.mlp.*;lm_?ead"));
        assert_eq!(
            PassSpec::parse(" optimize{iterations=3} ").unwrap(),
            PassSpec::new("optimize").with("iterations", "3")
        );
        assert!(PassSpec::parse("dce,cse").unwrap_err().to_string().contains("single pass entry"));
        assert_eq!("dce{x=1}".parse::<PassSpec>().unwrap().to_string(), "dce{x=1}");
        assert_eq!("dce,cse".parse::<Pipeline>().unwrap().len(), 2);
    }

    #[test]
    fn values_are_quoted_only_when_they_must_be() {
        let s = |v: &str| PassSpec::new("p").with("k", v).to_string();
        assert_eq!(s("int4:g64:asym"), "p{k=int4:g64:asym}");
        assert_eq!(s("a;b*?./-_"), "p{k=a;b*?./-_}");
        assert_eq!(s(""), "p{k=\"\"}");
        assert_eq!(s("a,b"), "p{k=\"a,b\"}");
        assert_eq!(s("a b"), "p{k=\"a b\"}");
        assert_eq!(s("{x}"), "p{k=\"{x}\"}");
        assert_eq!(s("a=b"), "p{k=\"a=b\"}");
        assert_eq!(s("say \"hi\" \\o/"), "p{k=\"say \\\"hi\\\" \\\\o/\"}");
    }

    #[test]
    fn errors_name_the_place_and_the_pass() {
        let cases: &[(&str, &[&str])] = &[
            ("dce,optimize{target=cuda", &["column 13", "`{` of pass `optimize` is never closed", "unbalanced"]),
            ("optimize{target=", &["`{` of pass `optimize` is never closed"]),
            ("optimize{", &["never closed"]),
            ("dce}", &["unbalanced `}` after pass `dce`", "column 4"]),
            ("dce,,cse", &["empty pipeline entry", "column 5"]),
            ("dce,", &["must follow the `,` after pass `dce`"]),
            (",dce", &["empty pipeline entry", "column 1"]),
            ("dce cse", &["unexpected `c` after pass `dce`"]),
            ("optimize{target}", &["pass `optimize`: option `target` has no value"]),
            ("optimize{target=,x=1}", &["option `target` has an empty value"]),
            ("optimize{=cuda}", &["pass `optimize`: expected an option name, found `=`"]),
            ("optimize{target cuda}", &["expected `=` after option `target`, found `c`"]),
            ("quantize{keep-fp=a b}", &["pass `quantize`, option `keep-fp`: unexpected `b`", "quote"]),
            ("quantize{keep-fp=a{b}}", &["option `keep-fp`: unexpected `{`"]),
            ("quantize{keep-fp={b}}", &["option `keep-fp`: a value starting with `{` must be quoted"]),
            ("quantize{keep-fp=\"a,b}", &["the quoted value is never closed", "column 18"]),
            ("quantize{keep-fp=\"a\\nb\"}", &["unknown escape `\\n`"]),
            ("quantize{format=int8,format=int4}", &["pass `quantize`: option `format` is given twice", "column 22"]),
            ("{x=1}", &["expected a pass name, found `{`"]),
            ("dce{x=1}}", &["unbalanced `}` after pass `dce`"]),
        ];
        for (s, want) in cases {
            let e = err(s);
            assert!(e.starts_with(&format!("pipeline `{s}`, column ")), "{s}: {e}");
            for w in *want {
                assert!(e.contains(w), "{s}: `{e}` lacks `{w}`");
            }
        }
    }

    /// Characters values are drawn from: every one the grammar treats specially, and some plain.
    const VALUE_CHARS: &[char] =
        &['a', 'z', '0', '9', ':', ';', '*', '?', '.', '/', '-', '_', ',', '{', '}', '=', '"', '\\', ' ', '\t', 'é'];

    fn random_ident(rng: &mut Rng) -> String {
        const C: &[u8] = b"abcxyz019-_";
        (0..1 + rng.below(6)).map(|_| C[rng.below(C.len())] as char).collect()
    }

    fn random_pipeline(rng: &mut Rng) -> Pipeline {
        let mut p = Pipeline::default();
        for _ in 0..rng.below(5) {
            let mut spec = PassSpec::new(random_ident(rng));
            for _ in 0..rng.below(4) {
                let key = random_ident(rng);
                if spec.option(&key).is_some() {
                    continue;
                }
                let value: String = (0..rng.below(6)).map(|_| VALUE_CHARS[rng.below(VALUE_CHARS.len())]).collect();
                spec = spec.with(key, value);
            }
            p.push(spec);
        }
        p
    }

    /// A non-canonical spelling of `p`: blanks around every token, `{}` for no options, and
    /// values quoted that need not be.
    fn noisy(p: &Pipeline, rng: &mut Rng) -> String {
        let ws = |rng: &mut Rng| [" ", "", "\t", "  "][rng.below(4)].to_string();
        let mut s = ws(rng);
        for (i, spec) in p.iter().enumerate() {
            if i > 0 {
                s += &format!("{},{}", ws(rng), ws(rng));
            }
            s += &spec.name;
            if spec.options.is_empty() && rng.chance(0.3) {
                s += &format!("{}{{{}}}", ws(rng), ws(rng));
            } else if !spec.options.is_empty() {
                s += &format!("{}{{", ws(rng));
                for (j, (k, v)) in spec.options.iter().enumerate() {
                    if j > 0 {
                        s += ",";
                    }
                    let quoted = format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
                    let val =
                        if v.is_empty() || v.chars().any(needs_quotes) || rng.chance(0.5) { quoted } else { v.clone() };
                    s += &format!("{}{k}{}={}{val}{}", ws(rng), ws(rng), ws(rng), ws(rng));
                }
                s += "}";
            }
        }
        s + &ws(rng)
    }

    #[test]
    fn round_trips_random_pipelines() {
        let mut rng = Rng::new(14);
        for _ in 0..2000 {
            let p = random_pipeline(&mut rng);
            let printed = p.to_string();
            assert_eq!(Pipeline::parse(&printed).unwrap_or_else(|e| panic!("{printed}: {e}")), p, "{printed}");
            for spec in &p {
                assert_eq!(PassSpec::parse(&spec.to_string()).unwrap(), *spec);
            }
            // Any spelling parses to the same pipeline and prints canonically.
            let n = noisy(&p, &mut rng);
            let back = Pipeline::parse(&n).unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(back, p, "{n}");
            assert_eq!(back.to_string(), printed, "{n}");
        }
    }

    #[test]
    fn truncated_or_mutated_specs_are_errors_or_other_pipelines_never_panics() {
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            let s = random_pipeline(&mut rng).to_string();
            let chars: Vec<char> = s.chars().collect();
            for cut in 0..chars.len() {
                let t: String = chars[..cut].iter().collect();
                if let Ok(p) = Pipeline::parse(&t) {
                    // Whatever parses prints to something that parses back to it.
                    assert_eq!(Pipeline::parse(&p.to_string()).unwrap(), p, "{t}");
                }
            }
        }
    }
}

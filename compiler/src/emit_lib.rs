//! [`crate::Emit::Lib`]: packs a compiled artifact and the runtime's C API into one static
//! library that a C (or any) program links without any compiler crate.
//!
//! ```text
//! DIR/libllmc_model.a   the runtime (libllmc_capi.a: the llmc-capi crate, Rust std included)
//!                       + llmc_model_data.o: the artifact bytes as the data symbol
//!                         `llmc_model_artifact` (page-aligned, read-only) and its length
//!                         `llmc_model_artifact_len` (u64)
//! DIR/model.h           runtime/include/llmc.h + `llmc_model_load_embedded()`
//! DIR/model.llmc        the artifact itself (for `llmc run` or `llmc_model_load(path)`)
//! ```
//! The object is an x86-64 ELF relocatable written with the `object` crate and appended to a copy
//! of the runtime archive by [`append_member`], which also extends the archive's symbol index (no
//! external `ar` involved). `strip --strip-debug` (or `$STRIP`), when present, first drops the
//! runtime's debug info.
//!
//! Where the runtime archive comes from: [`crate::CompileConfig::runtime_lib`] when set, else
//! `$LLMC_CAPI_LIB`, else a search beside the running executable. Cargo builds
//! `libllmc_capi.a` with every build of `llmc` (llmc-capi is a dependency of the `llmc` package),
//! into the `deps/` folder next to the `llmc` executable (and beside the executable when built as
//! a root with `cargo build -p llmc-capi`); test executables live in `deps/` themselves, beside it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The C API header, compiled into `llmc`.
const LLMC_H: &str = include_str!("../../runtime/include/llmc.h");

/// Symbols of the embedded artifact.
pub const ARTIFACT_SYMBOL: &str = "llmc_model_artifact";
pub const ARTIFACT_LEN_SYMBOL: &str = "llmc_model_artifact_len";

/// What `--emit lib` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibOutput {
    pub library: PathBuf,
    pub header: PathBuf,
    /// The runtime archive that was packed.
    pub runtime: PathBuf,
}

/// Finds `libllmc_capi.a`: `$LLMC_CAPI_LIB`, else the newest of `libllmc_capi.a`,
/// `libllmc_capi-*.a` and `deps/libllmc_capi-*.a` beside the running executable.
pub fn runtime_lib() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LLMC_CAPI_LIB") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("LLMC_CAPI_LIB={}: no such file", p.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the llmc executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut found: Vec<PathBuf> = vec![dir.join("libllmc_capi.a")];
    for d in [dir.to_path_buf(), dir.join("deps")] {
        if let Ok(rd) = std::fs::read_dir(d) {
            found.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libllmc_capi-") && n.ends_with(".a"))
            }));
        }
    }
    found
        .into_iter()
        .filter_map(|p| std::fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| {
            format!(
                "--emit lib: cannot find the runtime library libllmc_capi.a beside {} (cargo builds it with llmc); \
                 build it with `cargo build -p llmc-capi` or set LLMC_CAPI_LIB to its path",
                exe.display()
            )
        })
}

/// An ELF relocatable object defining the artifact symbols over `bytes`.
pub fn artifact_object(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use object::write::{Object, Symbol, SymbolSection};
    use object::{Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope};
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let sec = obj.add_section(vec![], b".rodata.llmc_model".to_vec(), SectionKind::ReadOnlyData);
    let len = (bytes.len() as u64).to_le_bytes();
    for (name, data, align) in [(ARTIFACT_SYMBOL, bytes, 4096), (ARTIFACT_LEN_SYMBOL, &len[..], 8)] {
        let sym = obj.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind: SymbolKind::Data,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
        obj.add_symbol_data(sym, sec, data, align);
    }
    // No executable stack.
    obj.add_section(vec![], b".note.GNU-stack".to_vec(), SectionKind::Other);
    obj.write().map_err(|e| format!("writing the model object: {e}"))
}

/// `model.h`: the C API plus the loader of the embedded model.
pub fn model_header(artifact: &Path) -> String {
    format!(
        "/* model.h: written by `llmc compile --emit lib` for {name}.\n * Link: cc app.c -I DIR -L DIR -lllmc_model -lpthread -ldl -lm */\n\n{LLMC_H}\n\
#ifndef LLMC_MODEL_H\n#define LLMC_MODEL_H\n\n#ifdef __cplusplus\nextern \"C\" {{\n#endif\n\n\
/* The compiled artifact linked into libllmc_model.a. */\n\
extern const unsigned char {ARTIFACT_SYMBOL}[];\nextern const uint64_t {ARTIFACT_LEN_SYMBOL};\n\n\
/* Loads the model linked into this library (verified like a file; the bytes are copied once). */\n\
static inline int llmc_model_load_embedded(llmc_model **out) {{\n\
    return llmc_model_load_bytes({ARTIFACT_SYMBOL}, (size_t){ARTIFACT_LEN_SYMBOL}, out);\n}}\n\n\
#ifdef __cplusplus\n}}\n#endif\n\n#endif /* LLMC_MODEL_H */\n",
        name = artifact.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    )
}

/// Size a member occupies in an `ar` archive: 60-byte header, data, padding to even.
fn occupied(size: usize) -> usize {
    60 + size + (size & 1)
}

/// Appends `data` as member `name` (at most 15 bytes) to the GNU `ar` archive `ar`, adding
/// `symbols` (defined by the new member) to its symbol index. Existing members are copied byte for
/// byte and the existing index is kept, with offsets moved: rebuilding the index with binutils'
/// `ar s` would drop the symbols of Rust std objects that carry LLVM bitcode (the LTO plugin
/// rejects them), and the library would not link.
pub fn append_member(ar: &[u8], name: &str, data: &[u8], symbols: &[&str]) -> Result<Vec<u8>, String> {
    let bad = |m: &str| format!("runtime library: not a GNU ar archive with a symbol index ({m})");
    if !ar.starts_with(b"!<arch>\n") || ar.len() < 68 {
        return Err(bad("no magic"));
    }
    let field = |h: &[u8], r: std::ops::Range<usize>| String::from_utf8_lossy(&h[r]).trim().to_string();
    let head = &ar[8..68];
    let width = match field(head, 0..16).as_str() {
        "/" => 4,
        "/SYM64/" => 8,
        _ => return Err(bad("first member is not the index")),
    };
    let size: usize = field(head, 48..58).parse().map_err(|_| bad("index size"))?;
    let body = ar.get(68..68 + size).ok_or_else(|| bad("truncated index"))?;
    let rest = ar.get(8 + occupied(size)..).ok_or_else(|| bad("truncated"))?;
    let word = |b: &[u8]| b.iter().fold(0u64, |a, &x| (a << 8) | x as u64);
    let n = word(body.get(..width).ok_or_else(|| bad("index"))?) as usize;
    let offs_end = width.checked_mul(n + 1).filter(|&e| e <= body.len()).ok_or_else(|| bad("index count"))?;
    let offsets: Vec<u64> = body[width..offs_end].chunks(width).map(word).collect();
    let mut names = body[offs_end..].to_vec();
    for s in symbols {
        names.extend_from_slice(s.as_bytes());
        names.push(0);
    }
    let total = n + symbols.len();
    let new_size = width * (total + 1) + names.len();
    // Offsets are absolute: everything after the index moves by the change in its size.
    let delta = occupied(new_size) as i64 - occupied(size) as i64;
    let member_at = 8 + occupied(new_size) + rest.len();
    if width == 4 && member_at + occupied(data.len()) > u32::MAX as usize {
        return Err("the library would exceed 4 GiB, which a 32-bit archive index cannot address".into());
    }
    let put = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_be_bytes()[8 - width..]);
    let mut out = Vec::with_capacity(member_at + occupied(data.len()));
    out.extend_from_slice(b"!<arch>\n");
    out.extend_from_slice(&ar[8..56]); // index header up to the size field
    out.extend_from_slice(format!("{new_size:<10}`\n").as_bytes());
    put(&mut out, total as u64);
    for &o in &offsets {
        put(&mut out, (o as i64 + delta) as u64);
    }
    for _ in symbols {
        put(&mut out, member_at as u64);
    }
    out.extend_from_slice(&names);
    if new_size & 1 == 1 {
        out.push(b'\n');
    }
    out.extend_from_slice(rest);
    debug_assert_eq!(out.len(), member_at);
    let ident = format!("{name}/");
    if ident.len() > 16 {
        return Err(format!("archive member name `{name}` is longer than 15 bytes"));
    }
    out.extend_from_slice(format!("{ident:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", 0, 0, 0, 644, data.len()).as_bytes());
    out.extend_from_slice(data);
    if data.len() & 1 == 1 {
        out.push(b'\n');
    }
    Ok(out)
}

/// Symbols in an archive's index (`None` if it has none).
fn index_len(ar: &[u8]) -> Option<u64> {
    let width = match ar.get(8..24)? {
        b"/               " => 4,
        b"/SYM64/         " => 8,
        _ => return None,
    };
    Some(ar.get(68..68 + width)?.iter().fold(0u64, |a, &x| (a << 8) | x as u64))
}

/// The runtime archive, without debug info when `strip --strip-debug` (or `$STRIP`) is there and
/// keeps the index whole; debug info is ~250 MB of a debug build's ~300 MB archive.
fn runtime_bytes(runtime: &Path, dir: &Path) -> Result<Vec<u8>, String> {
    let full = std::fs::read(runtime).map_err(|e| format!("{}: {e}", runtime.display()))?;
    let tmp = dir.join(".llmc_runtime_stripped.a");
    let strip = std::env::var_os("STRIP").unwrap_or_else(|| "strip".into());
    let stripped = std::fs::write(&tmp, &full)
        .ok()
        .and_then(|_| Command::new(&strip).arg("--strip-debug").arg(&tmp).output().ok())
        .filter(|o| o.status.success())
        .and_then(|_| std::fs::read(&tmp).ok());
    let _ = std::fs::remove_file(&tmp);
    Ok(match stripped {
        Some(s) if index_len(&s).is_some() && index_len(&s) == index_len(&full) => s,
        _ => full,
    })
}

/// Writes `dir/libllmc_model.a` and `dir/model.h` for the artifact at `artifact`, packing the
/// runtime library `runtime` (found by [`runtime_lib`] when `None`).
pub fn write(dir: &Path, artifact: &Path, runtime: Option<&Path>) -> Result<LibOutput, String> {
    let runtime = match runtime {
        Some(p) if p.is_file() => p.to_path_buf(),
        Some(p) => return Err(format!("runtime library {}: no such file", p.display())),
        None => runtime_lib()?,
    };
    let bytes = std::fs::read(artifact).map_err(|e| format!("{}: {e}", artifact.display()))?;
    let obj = artifact_object(&bytes)?;
    drop(bytes);
    let lib = append_member(&runtime_bytes(&runtime, dir)?, "llmc_model.o", &obj, &[ARTIFACT_SYMBOL, ARTIFACT_LEN_SYMBOL])?;
    let library = dir.join("libllmc_model.a");
    std::fs::write(&library, lib).map_err(|e| format!("{}: {e}", library.display()))?;
    let header = dir.join("model.h");
    std::fs::write(&header, model_header(artifact)).map_err(|e| format!("{}: {e}", header.display()))?;
    Ok(LibOutput { library, header, runtime })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GNU archive with one member `a.o` defining `x`, built by hand.
    fn tiny_archive() -> Vec<u8> {
        let member = b"AAAAA"; // odd size: padded
        let mut names = b"x\0".to_vec();
        let index_size = 4 + 4 + names.len();
        let member_at = 8 + occupied(index_size);
        let mut a = b"!<arch>\n".to_vec();
        a.extend_from_slice(format!("{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", "/", 0, 0, 0, 0, index_size).as_bytes());
        a.extend_from_slice(&1u32.to_be_bytes());
        a.extend_from_slice(&(member_at as u32).to_be_bytes());
        a.append(&mut names);
        if index_size & 1 == 1 {
            a.push(b'\n');
        }
        a.extend_from_slice(format!("{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", "a.o/", 0, 0, 0, 644, member.len()).as_bytes());
        a.extend_from_slice(member);
        a.push(b'\n');
        a
    }

    #[test]
    fn appended_member_and_moved_offsets_are_indexed() {
        let a = tiny_archive();
        let b = append_member(&a, "m.o", b"MODEL", &["sym_one", "sym_two"]).unwrap();
        assert_eq!(index_len(&b), Some(3));
        let size: usize = String::from_utf8_lossy(&b[56..66]).trim().parse().unwrap();
        let idx = &b[68..68 + size];
        let off = |i: usize| u32::from_be_bytes(idx[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize;
        // Each offset points at the header of the member defining the symbol.
        assert_eq!(&b[off(0)..off(0) + 4], b"a.o/");
        assert_eq!(&b[off(0) + 60..off(0) + 65], b"AAAAA");
        assert_eq!(&b[off(1)..off(1) + 4], b"m.o/");
        assert_eq!(off(1), off(2));
        assert_eq!(&b[off(1) + 60..off(1) + 65], b"MODEL");
        assert!(idx.ends_with(b"x\0sym_one\0sym_two\0"));
        assert!(append_member(b"not an archive", "m.o", b"", &[]).is_err());
    }

    #[test]
    fn object_defines_the_artifact_symbols() {
        use object::{Object, ObjectSymbol};
        let obj = artifact_object(b"LLMCART\0bytes").unwrap();
        let f = object::File::parse(&*obj).unwrap();
        let syms: Vec<(String, u64)> = f.symbols().filter(|s| s.is_definition()).map(|s| (s.name().unwrap().to_string(), s.size())).collect();
        assert!(syms.contains(&(ARTIFACT_SYMBOL.to_string(), 13)), "{syms:?}");
        assert!(syms.contains(&(ARTIFACT_LEN_SYMBOL.to_string(), 8)), "{syms:?}");
    }
}

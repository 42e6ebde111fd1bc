//! Minimal NumPy `.npy` (format 1.0) reading and writing for little-endian f32 arrays.

use std::io::Write;
use std::path::Path;

use crate::error::{Result, RuntimeError};

/// Writes `data` as a C-order float32 array of `shape`.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let io = |source| RuntimeError::Io { path: path.to_path_buf(), source };
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(&out).map_err(io)
}

/// Reads a C-order little-endian float32 `.npy` file: `(shape, data)`.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
    let bad = |msg: &str| RuntimeError::Other(format!("{}: not a float32 .npy file: {msg}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("bad magic"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(bad("unsupported version")),
    };
    let header = std::str::from_utf8(bytes.get(hstart..hstart + hlen).ok_or_else(|| bad("truncated header"))?)
        .map_err(|_| bad("header is not UTF-8"))?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("only C-order '<f4' arrays are supported"));
    }
    let s = header.find("'shape':").ok_or_else(|| bad("no shape"))?;
    let open = header[s..].find('(').ok_or_else(|| bad("no shape"))? + s;
    let close = header[open..].find(')').ok_or_else(|| bad("no shape"))? + open;
    let shape: Vec<usize> = header[open + 1..close]
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    let data_bytes = &bytes[hstart + hlen..];
    let n: usize = shape.iter().product();
    if data_bytes.len() != n * 4 {
        return Err(bad("data length disagrees with shape"));
    }
    let data = data_bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((shape, data))
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip() {
        let dir = std::env::temp_dir().join(format!("llmc-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        super::write_f32(&p, &[3, 4], &data).unwrap();
        let (shape, back) = super::read_f32(&p).unwrap();
        assert_eq!(shape, vec![3, 4]);
        assert_eq!(back, data);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((bytes.len() - 12 * 4) % 64, 0, "header padded to 64 bytes");
    }
}

//! Writing artifacts (feature `writer`, which the compiler enables and the runtime does not): the
//! layout of [`crate::artifact`] streamed to disk one data buffer at a time, through `O_DIRECT`
//! staging where the file system allows it.

use std::path::{Path, PathBuf};

use crate::artifact::{checksum_hex, round_up, Header, DATA_CHUNK_BYTES, FORMAT_VERSION, MAGIC, PREAMBLE};
use crate::error::{AbiError, Result};

/// Streams an artifact to disk: code, then data buffers one at a time, then the header, so that
/// writing never holds more than one tensor in memory. The bytes go to `<path>.partial`, renamed
/// to `path` by [`finish`](Self::finish); a writer dropped before that (a failed compile) removes
/// the partial file, so a failed compile never leaves a half-written artifact at `path`.
pub struct ArtifactWriter {
    file: std::fs::File,
    /// The data section's bytes not yet on disk, and where they go.
    stage: DirectStage,
    path: PathBuf,
    tmp: PathBuf,
    finished: bool,
    reserved: u64,
    code_offset: u64,
    code_len: u64,
    data_offset: u64,
    data_pos: u64,
    data_hash: xxhash_rust::xxh3::Xxh3,
    /// The data chunk being hashed ([`Header::data_chunk_checksums`]) and the sums of those done.
    chunk_hash: xxhash_rust::xxh3::Xxh3,
    chunk_sums: Vec<String>,
    code_checksum: String,
}

impl ArtifactWriter {
    /// Creates `path`, reserving `header_reserve` bytes for the header, and writes the code.
    pub fn create(path: &Path, header_reserve: u64, code: &[u8]) -> Result<Self> {
        use std::io::{Seek, SeekFrom, Write};
        let io = |source| AbiError::Io { path: path.to_path_buf(), source };
        let reserved = round_up(PREAMBLE as u64 + header_reserve, 64);
        let code_offset = reserved;
        let code_len = code.len() as u64;
        let data_offset = round_up(code_offset + code_len, 4096);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.seek(SeekFrom::Start(code_offset)).map_err(io)?;
        file.write_all(code).map_err(io)?;
        file.set_len(data_offset).map_err(io)?;
        file.seek(SeekFrom::Start(data_offset)).map_err(io)?;
        let stage = DirectStage::new(&tmp, &file, data_offset);
        Ok(ArtifactWriter {
            file,
            stage,
            path: path.to_path_buf(),
            tmp,
            finished: false,
            reserved,
            code_offset,
            code_len,
            data_offset,
            data_pos: 0,
            data_hash: xxhash_rust::xxh3::Xxh3::new(),
            chunk_hash: xxhash_rust::xxh3::Xxh3::new(),
            chunk_sums: Vec::new(),
            code_checksum: checksum_hex(xxhash_rust::xxh3::xxh3_64(code)),
        })
    }

    /// Appends a data buffer (64-aligned); returns its offset within the data section.
    pub fn push_data(&mut self, bytes: &[u8]) -> Result<u64> {
        let io = |source| AbiError::Io { path: self.path.clone(), source };
        let aligned = round_up(self.data_pos, 64);
        let pad = vec![0u8; (aligned - self.data_pos) as usize];
        self.stage.write(&self.file, &pad).map_err(io)?;
        self.stage.write(&self.file, bytes).map_err(io)?;
        self.hash(&pad);
        self.hash(bytes);
        Ok(aligned)
    }

    /// Adds the data bytes at `data_pos` to the section's checksum and its chunks', and advances
    /// `data_pos` past them.
    fn hash(&mut self, mut bytes: &[u8]) {
        self.data_hash.update(bytes);
        while !bytes.is_empty() {
            let room = (DATA_CHUNK_BYTES - self.data_pos % DATA_CHUNK_BYTES) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.chunk_hash.update(now);
            self.data_pos += now.len() as u64;
            if self.data_pos % DATA_CHUNK_BYTES == 0 {
                self.chunk_sums.push(checksum_hex(self.chunk_hash.digest()));
                self.chunk_hash.reset();
            }
            bytes = rest;
        }
    }

    /// Fills in section fields and checksums of `header`, writes it, and returns the file size.
    pub fn finish(mut self, mut header: Header) -> Result<u64> {
        use std::io::{Seek, SeekFrom, Write};
        let path = self.path.clone();
        let io = |source| AbiError::Io { path: path.clone(), source };
        self.stage.finish(&self.file).map_err(io)?;
        header.code_offset = self.code_offset;
        header.code_len = self.code_len;
        header.data_offset = self.data_offset;
        header.data_len = self.data_pos;
        header.code_checksum = self.code_checksum.clone();
        header.data_checksum = checksum_hex(self.data_hash.digest());
        if self.data_pos % DATA_CHUNK_BYTES != 0 {
            self.chunk_sums.push(checksum_hex(self.chunk_hash.digest()));
        }
        header.data_chunk_checksums = std::mem::take(&mut self.chunk_sums);
        let json = serde_json::to_vec(&header).map_err(|e| AbiError::Header(format!("serialize header: {e}")))?;
        if PREAMBLE as u64 + json.len() as u64 > self.reserved {
            return Err(AbiError::Header(format!(
                "internal: header of {} bytes exceeds the {} reserved",
                json.len(),
                self.reserved - PREAMBLE as u64
            )));
        }
        let mut pre = Vec::with_capacity(PREAMBLE);
        pre.extend_from_slice(MAGIC);
        pre.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        pre.extend_from_slice(&0u32.to_le_bytes());
        pre.extend_from_slice(&(json.len() as u64).to_le_bytes());
        pre.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&json).to_le_bytes());
        self.file.seek(SeekFrom::Start(0)).map_err(io)?;
        self.file.write_all(&pre).map_err(io)?;
        self.file.write_all(&json).map_err(io)?;
        let pad = self.reserved - PREAMBLE as u64 - json.len() as u64;
        self.file.write_all(&vec![b' '; pad as usize]).map_err(io)?;
        self.file.flush().map_err(io)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io)?;
        self.finished = true;
        Ok(self.data_offset + self.data_pos)
    }
}

/// Writes the data section in large blocks that bypass the page cache (`O_DIRECT` on Linux): a
/// compile writes hundreds of MiB once, and copying them into the page cache costs more than the
/// disk write itself. Bytes collect in a 4096-aligned buffer; each full buffer goes to an I/O
/// thread that writes it through a second, `O_DIRECT` descriptor of the same file while the next
/// one fills (a few buffers in turn), so the caller's copying and checksumming overlap the disk
/// writes. The last partial block goes through the ordinary descriptor. Where `O_DIRECT` is
/// unavailable (tmpfs, other systems) or refused, everything goes through the ordinary descriptor.
struct DirectStage {
    /// The I/O thread, or `None` for the buffered path.
    io: Option<StageIo>,
    /// The buffer filling now (null on the buffered path).
    buf: StageBuf,
    len: usize,
    /// File offset of `buf[0]`.
    at: u64,
}

const STAGE_BYTES: usize = 8 << 20;
const STAGE_ALIGN: usize = 4096;
/// Buffers in turn: one filling, the others written (or waiting to be).
const STAGE_BUFFERS: usize = 3;

/// A `STAGE_BYTES`, `STAGE_ALIGN`-aligned buffer (null when allocation failed).
struct StageBuf(*mut u8);

// SAFETY: `StageBuf` owns its memory; it is only touched by whoever holds the `StageBuf`.
unsafe impl Send for StageBuf {}

impl StageBuf {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(STAGE_BYTES, STAGE_ALIGN).expect("constant layout")
    }
    fn new() -> StageBuf {
        // SAFETY: non-zero size. A null result (out of memory) is checked by the callers.
        StageBuf(unsafe { std::alloc::alloc(Self::layout()) })
    }
    fn null() -> StageBuf {
        StageBuf(std::ptr::null_mut())
    }
}

impl Drop for StageBuf {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.0, Self::layout()) };
        }
    }
}

/// The I/O thread of a [`DirectStage`]: takes (buffer, byte count, file offset), writes the
/// bytes, and hands the buffer back with the outcome.
struct StageIo {
    /// `None` once closed (the thread then ends).
    tx: Option<std::sync::mpsc::Sender<(StageBuf, usize, u64)>>,
    back: std::sync::mpsc::Receiver<(StageBuf, std::io::Result<()>)>,
    /// Empty buffers ready to fill.
    free: Vec<StageBuf>,
    /// Buffers handed to the thread and not yet back.
    in_flight: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StageIo {
    /// Starts the thread writing through `direct`, or through `plain` (the ordinary descriptor)
    /// from the first write `direct` refuses on.
    fn start(direct: std::fs::File, plain: std::fs::File) -> Option<StageIo> {
        use std::os::unix::fs::FileExt;
        let mut free = Vec::with_capacity(STAGE_BUFFERS - 1);
        for _ in 1..STAGE_BUFFERS {
            let b = StageBuf::new();
            if b.0.is_null() {
                return None;
            }
            free.push(b);
        }
        let (tx, rx) = std::sync::mpsc::channel::<(StageBuf, usize, u64)>();
        let (back_tx, back) = std::sync::mpsc::channel();
        let run = move || {
            let mut direct = Some(direct);
            for (buf, len, at) in rx {
                // SAFETY: the sender initialized the first `len <= STAGE_BYTES` bytes of `buf`.
                let data = unsafe { std::slice::from_raw_parts(buf.0, len) };
                let direct_ok = direct.as_ref().is_some_and(|d| d.write_all_at(data, at).is_ok());
                let r = if direct_ok {
                    Ok(())
                } else {
                    direct = None;
                    plain.write_all_at(data, at)
                };
                if back_tx.send((buf, r)).is_err() {
                    return;
                }
            }
        };
        let thread = std::thread::Builder::new().name("llmc-artifact-io".into()).spawn(run).ok()?;
        Some(StageIo { tx: Some(tx), back, free, in_flight: 0, thread: Some(thread) })
    }

    /// Hands `len` bytes of `buf` (to go at file offset `at`) to the thread; returns an empty
    /// buffer, waiting for one to come back if none is free.
    fn submit(&mut self, buf: StageBuf, len: usize, at: u64) -> std::io::Result<StageBuf> {
        let gone = || std::io::Error::other("the artifact I/O thread stopped");
        self.tx.as_ref().ok_or_else(gone)?.send((buf, len, at)).map_err(|_| gone())?;
        self.in_flight += 1;
        match self.free.pop() {
            Some(b) => Ok(b),
            None => self.wait_one(),
        }
    }

    /// Waits for one buffer handed to the thread; returns it, or the error writing it.
    fn wait_one(&mut self) -> std::io::Result<StageBuf> {
        let Ok((buf, r)) = self.back.recv() else {
            self.in_flight = 0; // the thread is gone, and every buffer it held with it
            return Err(std::io::Error::other("the artifact I/O thread stopped"));
        };
        self.in_flight -= 1;
        r.map(|()| buf)
    }

    /// Waits until every buffer handed over is written; the first error if one failed.
    fn drain(&mut self) -> std::io::Result<()> {
        let mut first = Ok(());
        while self.in_flight > 0 {
            match self.wait_one() {
                Ok(b) => self.free.push(b),
                Err(e) => {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
        first
    }
}

impl Drop for StageIo {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the writes it holds.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl DirectStage {
    fn new(path: &Path, file: &std::fs::File, at: u64) -> DirectStage {
        let io = Self::open_direct(path).and_then(|d| StageIo::start(d, file.try_clone().ok()?));
        let buf = if io.is_some() { StageBuf::new() } else { StageBuf::null() };
        DirectStage { io: if buf.0.is_null() { None } else { io }, buf, len: 0, at }
    }

    #[cfg(target_os = "linux")]
    fn open_direct(path: &Path) -> Option<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
        const O_DIRECT: i32 = 0o40000;
        #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
        const O_DIRECT: i32 = 0o200000;
        std::fs::OpenOptions::new().write(true).custom_flags(O_DIRECT).open(path).ok()
    }
    #[cfg(not(target_os = "linux"))]
    fn open_direct(_: &Path) -> Option<std::fs::File> {
        None
    }

    fn write(&mut self, file: &std::fs::File, mut bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(io) = &mut self.io else {
            file.write_all_at(bytes, self.at)?;
            self.at += bytes.len() as u64;
            return Ok(());
        };
        if self.buf.0.is_null() {
            return Err(std::io::Error::other("the artifact writer failed before"));
        }
        while !bytes.is_empty() {
            let n = bytes.len().min(STAGE_BYTES - self.len);
            // SAFETY: `buf` holds STAGE_BYTES bytes and `len + n <= STAGE_BYTES`.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.buf.0.add(self.len), n) };
            self.len += n;
            bytes = &bytes[n..];
            if self.len == STAGE_BYTES {
                // A full buffer is whole blocks (STAGE_BYTES is a multiple of STAGE_ALIGN).
                let full = std::mem::replace(&mut self.buf, StageBuf::null());
                self.buf = io.submit(full, STAGE_BYTES, self.at)?;
                self.at += STAGE_BYTES as u64;
                self.len = 0;
            }
        }
        Ok(())
    }

    /// Writes everything still buffered and waits for the I/O thread's writes.
    fn finish(&mut self, file: &std::fs::File) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(io) = &mut self.io else { return Ok(()) };
        if self.buf.0.is_null() {
            return Err(std::io::Error::other("the artifact writer failed before"));
        }
        io.drain()?;
        // The partial last buffer: whole blocks directly (through the thread), the rest through
        // the ordinary descriptor.
        let whole = self.len / STAGE_ALIGN * STAGE_ALIGN;
        if whole > 0 {
            let buf = std::mem::replace(&mut self.buf, StageBuf::null());
            io.tx.as_ref().ok_or_else(|| std::io::Error::other("the artifact I/O thread stopped"))?.send((buf, whole, self.at)).map_err(|_| std::io::Error::other("the artifact I/O thread stopped"))?;
            io.in_flight += 1;
            self.buf = io.wait_one()?;
            self.at += whole as u64;
        }
        // SAFETY: bytes `whole..len` of `buf` are initialized (the thread does not modify them).
        let rest = unsafe { std::slice::from_raw_parts(self.buf.0.add(whole), self.len - whole) };
        file.write_all_at(rest, self.at)?;
        self.at += rest.len() as u64;
        self.len = 0;
        Ok(())
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The header's serialized size with `header`'s current contents (section fields are fixed-width
/// enough that an upper bound is this plus a small margin).
pub fn header_size_bound(header: &Header) -> u64 {
    serde_json::to_vec(header).map(|v| v.len() as u64).unwrap_or(0) + 256
}


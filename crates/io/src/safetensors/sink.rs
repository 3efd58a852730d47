//! [`FileSink`]: writes one output file front to back from a background thread, bypassing the
//! page cache (`O_DIRECT`) where the filesystem allows.
//!
//! Why: a merge writes as many bytes as one input model. Through the page cache every byte is
//! copied into freshly allocated cache pages on the merging thread (measured here: that copy
//! alone took longer than the merge arithmetic, and varied 5x between runs). With `O_DIRECT`
//! the device reads the bytes from our buffers, and the background thread lets the merge go on
//! while a buffer is being written. Filesystems that refuse `O_DIRECT` (tmpfs, some network
//! and FUSE filesystems) get plain buffered writes, still from the background thread.
//!
//! Bytes go into 4 KiB-aligned buffers of [`BUF`] bytes; a full buffer is handed to the thread
//! and an empty one taken back ([`DEPTH`] buffers in all). The last, partial buffer is written
//! with `O_DIRECT` switched off. [`FileSink::finish`] waits for the thread and fsyncs.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use crate::error::IoError;

/// Bytes per buffer (a multiple of [`ALIGN`]).
pub const BUF: usize = 8 << 20;
/// Buffers in rotation: one filling, the others queued or being written.
pub const DEPTH: usize = 3;
/// Alignment of `O_DIRECT` buffers, offsets and lengths.
const ALIGN: usize = 4096;

/// A fixed-capacity byte buffer whose data starts on an [`ALIGN`] boundary.
struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn new() -> Self {
        let raw = vec![0u8; BUF + ALIGN];
        let off = raw.as_ptr().align_offset(ALIGN);
        Self { raw, off, len: 0 }
    }

    fn data(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    fn spare(&self) -> usize {
        BUF - self.len
    }

    fn push(&mut self, bytes: &[u8]) {
        let start = self.off + self.len;
        self.raw[start..start + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

enum Msg {
    /// A full buffer ([`BUF`] bytes).
    Full(AlignedBuf),
    /// The last bytes: write them, fsync, and stop.
    Last(AlignedBuf),
}

/// Writes one file in order through a background thread (see the module docs).
pub struct FileSink {
    path: PathBuf,
    cur: Option<AlignedBuf>,
    tx: Option<SyncSender<Msg>>,
    free: Receiver<AlignedBuf>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(_) => Ok((File::create(path)?, false)),
    }
}

#[cfg(not(target_os = "linux"))]
fn open_direct(path: &Path) -> io::Result<(File, bool)> {
    Ok((File::create(path)?, false))
}

/// Switch `O_DIRECT` off for the rest of the file (unaligned tail, or a filesystem that
/// accepted the flag but refuses a write).
#[cfg(target_os = "linux")]
fn clear_direct(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: plain fcntl calls on a file descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn clear_direct(_f: &File) -> io::Result<()> {
    Ok(())
}

fn write_loop(
    mut file: File,
    mut direct: bool,
    rx: Receiver<Msg>,
    free: SyncSender<AlignedBuf>,
) -> io::Result<()> {
    for msg in rx {
        let (mut buf, last) = match msg {
            Msg::Full(b) => (b, false),
            Msg::Last(b) => (b, true),
        };
        let data = buf.data();
        // Aligned part with O_DIRECT, the rest (only in the last buffer) buffered.
        let aligned = if direct {
            data.len() / ALIGN * ALIGN
        } else {
            0
        };
        if aligned > 0 {
            if let Err(e) = file.write_all(&data[..aligned]) {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
                // Accepted at open, refused on write: go on buffered. A failed O_DIRECT write
                // writes nothing, so the file offset is unchanged.
                clear_direct(&file)?;
                direct = false;
                file.write_all(&data[..aligned])?;
            }
        }
        if aligned < data.len() {
            if direct {
                clear_direct(&file)?;
                direct = false;
            }
            file.write_all(&data[aligned..])?;
        }
        if last {
            file.sync_all()?;
            return Ok(());
        }
        buf.len = 0;
        // The writer may already be gone (an error on its side); nothing to recycle then.
        let _ = free.send(buf);
    }
    // The sender was dropped without `Last`: an abandoned file (its owner removes it).
    Ok(())
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .finish()
    }
}

impl FileSink {
    /// Create (truncate) `path` and start its writer thread.
    pub fn create(path: &Path) -> Result<Self, IoError> {
        let (file, direct) = open_direct(path).map_err(|e| IoError::io(path, "create", e))?;
        let (tx, rx) = sync_channel::<Msg>(DEPTH);
        let (free_tx, free) = sync_channel::<AlignedBuf>(DEPTH);
        for _ in 0..DEPTH - 1 {
            free_tx
                .send(AlignedBuf::new())
                .expect("the receiver is alive and the channel has room");
        }
        let thread = std::thread::Builder::new()
            .name("amalgam-writer".into())
            .spawn(move || write_loop(file, direct, rx, free_tx))
            .map_err(|e| IoError::io(path, "start the writer thread for", e))?;
        Ok(Self {
            path: path.to_path_buf(),
            cur: Some(AlignedBuf::new()),
            tx: Some(tx),
            free,
            thread: Some(thread),
        })
    }

    /// The writer thread's error, once it has stopped.
    fn thread_error(&mut self) -> IoError {
        let err = match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("the writer thread panicked"),
            _ => io::Error::other("the writer thread stopped"),
        };
        IoError::io(&self.path, "write", err)
    }

    /// Append bytes.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), IoError> {
        while !bytes.is_empty() {
            let cur = self.cur.as_mut().expect("a buffer is held between calls");
            let n = cur.spare().min(bytes.len());
            cur.push(&bytes[..n]);
            bytes = &bytes[n..];
            self.hand_over_if_full()?;
        }
        Ok(())
    }

    /// Send the current buffer to the thread when it is full, and take an empty one back.
    fn hand_over_if_full(&mut self) -> Result<(), IoError> {
        if self.cur.as_ref().is_some_and(|c| c.spare() == 0) {
            let full = self.cur.take().expect("checked above");
            let tx = self.tx.as_ref().expect("sender kept until finish");
            if tx.send(Msg::Full(full)).is_err() {
                return Err(self.thread_error());
            }
            match self.free.recv() {
                Ok(b) => self.cur = Some(b),
                Err(_) => return Err(self.thread_error()),
            }
        }
        Ok(())
    }

    /// Append `len` bytes made in place by `fill(offset, dst)`, which must fill `dst` with the
    /// bytes `offset..offset + dst.len()` of the `len`; its pieces come in order, each a
    /// multiple of `unit` bytes long (`len` is one too). Saves the copy of
    /// [`FileSink::write_all`]: the bytes are made straight into the buffer the thread writes.
    pub fn write_with<F>(&mut self, len: usize, unit: usize, mut fill: F) -> Result<(), IoError>
    where
        F: FnMut(usize, &mut [u8]),
    {
        debug_assert!(unit > 0 && unit <= 64 && len.is_multiple_of(unit));
        let mut done = 0;
        while done < len {
            let cur = self.cur.as_mut().expect("a buffer is held between calls");
            let n = cur.spare().min(len - done) / unit * unit;
            if n == 0 {
                // Less than a unit left in this buffer (an earlier write of odd length): that
                // unit goes through `write_all`, which moves on to the next buffer.
                let mut tmp = [0u8; 64];
                fill(done, &mut tmp[..unit]);
                self.write_all(&tmp[..unit])?;
                done += unit;
                continue;
            }
            let start = cur.off + cur.len;
            fill(done, &mut cur.raw[start..start + n]);
            cur.len += n;
            done += n;
            self.hand_over_if_full()?;
        }
        Ok(())
    }

    /// Write what is left, wait for the writer thread and fsync the file.
    pub fn finish(mut self) -> Result<(), IoError> {
        let last = self.cur.take().expect("a buffer is held between calls");
        let tx = self.tx.take().expect("sender kept until finish");
        if tx.send(Msg::Last(last)).is_err() {
            return Err(self.thread_error());
        }
        drop(tx);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(IoError::io(&self.path, "write", e)),
            _ => Err(IoError::io(
                &self.path,
                "write",
                io::Error::other("the writer thread panicked"),
            )),
        }
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        // Unfinished: stop the thread without writing the rest (the owner removes the file).
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn writes_every_byte_in_order_for_awkward_sizes() {
        let dir = tempfile::tempdir().expect("tempdir");
        for total in [0, 1, 4095, 4096, BUF - 1, BUF, BUF + 3, 2 * BUF + 4097] {
            let path = dir.path().join(format!("f{total}"));
            let data = pattern(total);
            let mut sink = FileSink::create(&path).expect("create");
            // Uneven pieces, to cross buffer edges anywhere.
            let mut rest = &data[..];
            let mut step = 1;
            while !rest.is_empty() {
                let n = step.min(rest.len());
                sink.write_all(&rest[..n]).expect("write");
                rest = &rest[n..];
                step = step * 3 + 1;
            }
            sink.finish().expect("finish");
            let back = std::fs::read(&path).expect("read back");
            assert_eq!(back.len(), total);
            assert!(back == data, "contents differ for {total} bytes");
        }
    }

    #[test]
    fn bytes_made_in_place_cross_buffer_edges_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A lead of odd length leaves the buffers' edges between a unit's bytes.
        for (lead, unit, units) in [
            (0, 2, BUF),
            (3, 2, BUF / 2 + 7),
            (7, 4, BUF / 2 + 1),
            (5, 8, 9),
        ] {
            let path = dir.path().join(format!("f{lead}-{unit}"));
            let data = pattern(lead + unit * units);
            let mut sink = FileSink::create(&path).expect("create");
            sink.write_all(&data[..lead]).expect("lead");
            let body = &data[lead..];
            let mut pieces = 0;
            sink.write_with(body.len(), unit, |off, dst| {
                assert_eq!(off % unit, 0);
                assert_eq!(dst.len() % unit, 0);
                dst.copy_from_slice(&body[off..off + dst.len()]);
                pieces += 1;
            })
            .expect("write_with");
            sink.finish().expect("finish");
            assert!(pieces >= 1);
            let back = std::fs::read(&path).expect("read back");
            assert!(back == data, "contents differ: lead {lead}, unit {unit}");
        }
    }

    #[test]
    fn dropping_unfinished_stops_the_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut sink = FileSink::create(&path).expect("create");
        sink.write_all(&pattern(BUF + 10)).expect("write");
        drop(sink);
        assert!(path.exists());
    }
}

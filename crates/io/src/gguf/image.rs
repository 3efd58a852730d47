//! The in-memory safetensors image of a GGUF file: dequantized tensors under Hugging Face
//! names, in an anonymous file that [`Checkpoint::open`](crate::Checkpoint::open) maps like
//! any safetensors file.

use std::fs::File;
use std::io::Cursor;
use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::quantized::gguf_file::TensorInfo;
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use memmap2::Mmap;
use rayon::prelude::*;

use super::names::{self, NameMapping, Unpermute};
use super::{err, read_content, Meta, SOURCE_KEY};
use crate::dtype::DType;
use crate::error::IoError;
use crate::safetensors::header::{self, HeaderEntry};

/// One tensor of the image.
struct Planned<'a> {
    gguf: &'a str,
    hf: String,
    info: &'a TensorInfo,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset of the data in the image file.
    offset: u64,
    len: u64,
    unpermute: Unpermute,
}

/// An anonymous, memory-backed read/write file (a `memfd` on Linux; elsewhere a file in the
/// temporary directory, unlinked at once).
fn anonymous_file(gguf: &Path) -> Result<File, IoError> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new file
        // descriptor (or -1); a valid descriptor is owned by the File from here on.
        let fd = unsafe { libc::memfd_create(c"amalgam-gguf".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(IoError::io(
                gguf,
                "create an in-memory file for",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let tmp = std::env::temp_dir().join(format!(
            "amalgam-gguf-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| IoError::io(&tmp, "create", e))?;
        let _ = std::fs::remove_file(&tmp);
        Ok(f)
    }
}

/// The stored dtype of a GGUF tensor in the image: F32, F16 and BF16 are kept; every
/// quantized type is dequantized to F32.
fn image_dtype(t: GgmlDType) -> DType {
    match t {
        GgmlDType::F16 => DType::F16,
        GgmlDType::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

/// Reads, dequantizes and un-permutes one tensor, returning its bytes in the image dtype.
fn tensor_bytes(
    path: &Path,
    gguf: &[u8],
    data_offset: u64,
    p: &Planned<'_>,
) -> Result<Vec<u8>, IoError> {
    let item = || format!("tensor \"{}\"", p.gguf);
    let mut cursor = Cursor::new(gguf);
    let qt = p
        .info
        .read(&mut cursor, data_offset, &Device::Cpu)
        .map_err(|e| err(path, item(), e.to_string()))?;
    let mut bytes = match p.info.ggml_dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => qt
            .data()
            .map_err(|e| err(path, item(), e.to_string()))?
            .into_owned(),
        _ => {
            let values: Vec<f32> = qt
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| err(path, item(), format!("dequantization failed: {e}")))?;
            let mut out = Vec::with_capacity(values.len() * 4);
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out
        }
    };
    if bytes.len() as u64 != p.len {
        return Err(err(
            path,
            item(),
            format!(
                "decoded to {} bytes, {} expected for {} {:?}",
                bytes.len(),
                p.len,
                p.dtype,
                p.shape
            ),
        ));
    }
    if let Unpermute::Heads(n) = p.unpermute {
        let rows = p.shape.first().copied().unwrap_or(1);
        let row_bytes = bytes.len().checked_div(rows).unwrap_or(0);
        names::unpermute_rows(&mut bytes, rows, row_bytes, n).map_err(|r| err(path, item(), r))?;
    }
    Ok(bytes)
}

/// Builds the safetensors image of GGUF file `path` in an anonymous file and returns it.
/// Errors name the file and the tensor or metadata key concerned.
pub(crate) fn safetensors_image(path: &Path) -> Result<File, IoError> {
    let ct = read_content(path)?;
    let meta = Meta {
        path,
        map: &ct.metadata,
    };
    let arch = meta.architecture()?;
    let (n_head, n_kv) = meta.heads(arch)?;

    let mut infos: Vec<(&String, &TensorInfo)> = ct.tensor_infos.iter().collect();
    infos.sort_by(|a, b| a.1.offset.cmp(&b.1.offset).then_with(|| a.0.cmp(b.0)));
    let mut planned = Vec::with_capacity(infos.len());
    let mut offset = 0u64;
    let mut seen = std::collections::HashMap::new();
    for (name, info) in infos {
        let item = || format!("tensor \"{name}\"");
        let hf = match names::hf_name(name) {
            Some(NameMapping::Keep(hf)) => hf,
            Some(NameMapping::Drop) => {
                tracing::warn!(
                    file = %path.display(),
                    tensor = %name,
                    "GGUF tensor has no Hugging Face counterpart (llama.cpp derives it from the config); dropped"
                );
                continue;
            }
            None => {
                return Err(err(
                    path,
                    item(),
                    "no Hugging Face name is known for this llama.cpp tensor (GGUF input maps \
                     token_embd, output_norm, output and blk.N.{attn_norm, attn_q, attn_k, \
                     attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down})",
                ))
            }
        };
        if let Some(prev) = seen.insert(hf.clone(), name.clone()) {
            return Err(err(
                path,
                item(),
                format!("maps to \"{hf}\", as \"{prev}\" does"),
            ));
        }
        let dtype = image_dtype(info.ggml_dtype);
        let shape = info.shape.dims().to_vec();
        let numel: usize = shape.iter().product();
        let len = (numel as u64)
            .checked_mul(dtype.size_bytes() as u64)
            .ok_or_else(|| err(path, item(), "tensor too large"))?;
        let unpermute = names::unpermute_for(arch, &hf, n_head, n_kv);
        planned.push(Planned {
            gguf: name,
            hf,
            info,
            dtype,
            shape,
            offset,
            len,
            unpermute,
        });
        offset += len;
    }

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let entries: Vec<HeaderEntry<'_>> = planned
        .iter()
        .map(|p| HeaderEntry {
            name: &p.hf,
            dtype: &p.dtype,
            shape: &p.shape,
            offsets: (p.offset, p.offset + p.len),
        })
        .collect();
    let header_bytes = header::serialize(
        &[
            ("format", "pt"),
            (SOURCE_KEY, &file_name),
            ("amalgam.gguf_architecture", arch),
        ],
        &entries,
    );
    let data_start = (header::PREFIX_LEN + header_bytes.len()) as u64;

    let image = anonymous_file(path)?;
    let total = data_start + offset;
    image
        .set_len(total)
        .map_err(|e| IoError::io(path, "size the in-memory image of", e))?;
    let mut head = (header_bytes.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&header_bytes);
    image
        .write_all_at(&head, 0)
        .map_err(|e| IoError::io(path, "write the in-memory image of", e))?;

    let src = File::open(path).map_err(|e| IoError::io(path, "open", e))?;
    // SAFETY: read-only map; like every reader we rely on the file not being modified while
    // it is read.
    let map = unsafe { Mmap::map(&src) }.map_err(|e| IoError::io(path, "mmap", e))?;
    planned.par_iter().try_for_each(|p| {
        let bytes = tensor_bytes(path, &map, ct.tensor_data_offset, p)?;
        image
            .write_all_at(&bytes, data_start + p.offset)
            .map_err(|e| IoError::io(path, "write the in-memory image of", e))
    })?;
    Ok(image)
}

//! The BLOBFILE weight format and model directories.
//!
//! A weight file is a 64-byte file header (byte 0 = 1, byte 4 = 2) followed by chunks.
//! Each chunk is a 64-byte chunk header — magic `EF BE AD DE`, byte 4 = 1, u32 at +8 the
//! payload size in bytes, u32 at +16 the absolute file offset of the payload — and then
//! the fp16 payload. MIL refers to a tensor by the chunk header's offset, so a
//! single-tensor file is 128 header bytes + payload, referenced as `offset = uint64(64)`.

use std::collections::BTreeMap;

use half::f16;

use crate::ir::{DType, TensorType, Value};
use crate::{mil_err, Result};

/// Size of the file header and of each chunk header.
pub const HEADER_BYTES: usize = 64;
/// First bytes of every chunk header.
pub const CHUNK_MAGIC: [u8; 4] = [0xEF, 0xBE, 0xAD, 0xDE];
/// The prefix MIL uses for paths inside a model directory.
pub const MODEL_PATH: &str = "@model_path/";

/// The weight files of one program, by the path MIL uses for them
/// (`@model_path/weights/w.bin`), as the bytes of each file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Weights {
    files: BTreeMap<String, Vec<u8>>,
}

impl Weights {
    pub fn new() -> Weights {
        Weights::default()
    }

    pub fn insert_file(&mut self, path: impl Into<String>, bytes: Vec<u8>) {
        self.files.insert(path.into(), bytes);
    }

    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(Vec::as_slice)
    }

    pub fn files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Stores `data` (row-major, rounded to fp16) as a one-tensor file at
    /// `@model_path/weights/{name}.bin` and returns the BLOBFILE value that refers to it.
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Value {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "weight `{name}`: shape and data disagree");
        let path = format!("{MODEL_PATH}weights/{name}.bin");
        let payload: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
        self.files.insert(path.clone(), write_blob_file(&[&payload]));
        Value::Blob { ty: TensorType::new(DType::Fp16, shape.to_vec()), path, offset: HEADER_BYTES as u64 }
    }

    /// The fp16 payload of the chunk whose header is at `offset` in the file at `path`,
    /// checked against the number of elements wanted.
    pub fn read_fp16(&self, path: &str, offset: u64, numel: usize) -> Result<Vec<f16>> {
        let bytes = self.file(path).ok_or_else(|| mil_err!(Blob, "weight file `{path}` is missing"))?;
        read_chunk(bytes, offset, numel).map_err(|e| e.in_file(path))
    }
}

/// The bytes of a weight file holding `tensors`, one chunk each, in order. The chunk
/// headers of the result stand at 64, then 64 + 64 + len₀·2 + …, as [`chunk_offsets`] says.
pub fn write_blob_file(tensors: &[&[f16]]) -> Vec<u8> {
    let total: usize = HEADER_BYTES + tensors.iter().map(|t| HEADER_BYTES + 2 * t.len()).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    let mut header = [0u8; HEADER_BYTES];
    header[0] = 1;
    header[4] = 2;
    out.extend_from_slice(&header);
    for t in tensors {
        let payload_offset = out.len() + HEADER_BYTES;
        let mut chunk = [0u8; HEADER_BYTES];
        chunk[0..4].copy_from_slice(&CHUNK_MAGIC);
        chunk[4] = 1;
        chunk[8..12].copy_from_slice(&((2 * t.len()) as u32).to_le_bytes());
        chunk[16..20].copy_from_slice(&(payload_offset as u32).to_le_bytes());
        out.extend_from_slice(&chunk);
        for x in t.iter() {
            out.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }
    out
}

/// Offsets of the chunk headers that [`write_blob_file`] writes for tensors of these lengths.
pub fn chunk_offsets(lens: &[usize]) -> Vec<u64> {
    let mut at = HEADER_BYTES;
    lens.iter()
        .map(|n| {
            let here = at;
            at += HEADER_BYTES + 2 * n;
            here as u64
        })
        .collect()
}

/// Reads the fp16 payload of the chunk whose header is at `offset`.
pub fn read_chunk(bytes: &[u8], offset: u64, numel: usize) -> Result<Vec<f16>> {
    if bytes.len() < HEADER_BYTES {
        return Err(mil_err!(
            Blob,
            "weight file is {} bytes, shorter than its {HEADER_BYTES}-byte header",
            bytes.len()
        ));
    }
    let at = usize::try_from(offset).unwrap_or(usize::MAX);
    if at.checked_add(HEADER_BYTES).is_none_or(|end| end > bytes.len()) {
        return Err(mil_err!(Blob, "chunk offset {offset} is out of range: the file is {} bytes", bytes.len()));
    }
    let chunk = &bytes[at..at + HEADER_BYTES];
    if chunk[0..4] != CHUNK_MAGIC {
        return Err(mil_err!(
            Blob,
            "no chunk header at offset {offset}: expected magic EF BE AD DE, found {:02X?}",
            &chunk[0..4]
        ));
    }
    let size = u32::from_le_bytes(chunk[8..12].try_into().unwrap()) as usize;
    let data_at = u32::from_le_bytes(chunk[16..20].try_into().unwrap()) as usize;
    if size != 2 * numel {
        return Err(mil_err!(
            Blob,
            "chunk at offset {offset} holds {size} bytes, expected {} ({numel} fp16 values)",
            2 * numel
        ));
    }
    if data_at.checked_add(size).is_none_or(|end| end > bytes.len()) {
        return Err(mil_err!(
            Blob,
            "chunk at offset {offset} says its {size}-byte payload starts at {data_at}, past the end of the {}-byte file",
            bytes.len()
        ));
    }
    Ok(bytes[data_at..data_at + size]
        .chunks_exact(2)
        .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
        .collect())
}

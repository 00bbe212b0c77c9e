//! The BLOBFILE weight format and model directories.
//!
//! A weight file is a 64-byte file header (byte 0 = 1, byte 4 = 2) followed by chunks.
//! Each chunk is a 64-byte chunk header — magic `EF BE AD DE`, byte 4 = 1, u32 at +8 the
//! payload size in bytes, u32 at +16 the absolute file offset of the payload — and then
//! the fp16 payload. MIL refers to a tensor by the chunk header's offset, so a
//! single-tensor file is 128 header bytes + payload, referenced as `offset = uint64(64)`.
//!
//! The layout is Core ML's MIL blob storage: the file header is `{u32 count, u32
//! version = 2, reserved}` and a chunk header `{u32 sentinel DEADBEEF, u32 data type
//! (1 = fp16), u64 size, u64 offset, reserved}`; the u32s at +8 and +16 that DESIGN.md
//! names are the low halves of those u64s. [`write_blob_file`] writes the chunk count
//! in the file header (1 for a one-tensor file, as DESIGN.md's "byte 0 = 1" says).
//!
//! A model directory ([`ModelDir`]) is what the ANE framework compiles from: `model.mil`
//! beside `weights/*.bin`, the MIL referring to the files as `@model_path/weights/…`.
//!
//! ```
//! use mil::blob::{ModelDir, Weights};
//! use mil::builder::FunctionBuilder;
//! use mil::{DType, Dialect, Program, TensorType};
//!
//! let mut weights = Weights::new();
//! let mut b = FunctionBuilder::new("main", Dialect::Ios18);
//! let x = b.input("x", TensorType::surface(DType::Fp16, 2, 4));
//! let w = b.constant("w", weights.add_tensor("w", &[3, 2, 1, 1], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
//! let y = b.conv1x1("y", &x, &w);
//! b.output(&y);
//! let model = ModelDir { program: Program::new(Dialect::Ios18, b.finish().unwrap()), weights };
//!
//! let dir = tempfile::tempdir().unwrap();
//! model.write(dir.path()).unwrap();
//! assert_eq!(ModelDir::read(dir.path()).unwrap(), model);
//! ```

use std::collections::BTreeMap;
use std::io::ErrorKind as IoKind;
use std::path::{Component, Path, PathBuf};

use half::f16;

use crate::ir::{Arg, DType, Operation, Program, TensorType, Value};
use crate::{mil_err, Error, Result};

/// Size of the file header and of each chunk header.
pub const HEADER_BYTES: usize = 64;
/// First bytes of every chunk header.
pub const CHUNK_MAGIC: [u8; 4] = [0xEF, 0xBE, 0xAD, 0xDE];
/// The prefix MIL uses for paths inside a model directory.
pub const MODEL_PATH: &str = "@model_path/";
/// The file-header format version Core ML writes and reads (u32 at byte 4).
pub const FILE_VERSION: u32 = 2;
/// The chunk-header data-type code for fp16 (u32 at +4), the only type stored here.
pub const FP16_TYPE_CODE: u32 = 1;
/// The program's file in a model directory.
pub const MODEL_FILE: &str = "model.mil";

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

    /// Stores several tensors (row-major, rounded to fp16) as the chunks of one file,
    /// `@model_path/weights/{file}.bin`, and returns their BLOBFILE values in order.
    /// The names only label mistakes (shape and data of different sizes).
    ///
    /// Some chips reportedly reject files of several chunks (DESIGN.md), so the
    /// generators prefer [`Weights::add_tensor`]; this is for tools and tests.
    pub fn add_tensors(&mut self, file: &str, tensors: &[(&str, &[usize], &[f32])]) -> Vec<Value> {
        let payloads: Vec<Vec<f16>> = tensors
            .iter()
            .map(|(name, shape, data)| {
                assert_eq!(shape.iter().product::<usize>(), data.len(), "weight `{name}`: shape and data disagree");
                data.iter().map(|&x| f16::from_f32(x)).collect()
            })
            .collect();
        let path = format!("{MODEL_PATH}weights/{file}.bin");
        let slices: Vec<&[f16]> = payloads.iter().map(Vec::as_slice).collect();
        self.files.insert(path.clone(), write_blob_file(&slices));
        let offsets = chunk_offsets(&payloads.iter().map(Vec::len).collect::<Vec<_>>());
        tensors
            .iter()
            .zip(offsets)
            .map(|((_, shape, _), offset)| Value::Blob {
                ty: TensorType::new(DType::Fp16, shape.to_vec()),
                path: path.clone(),
                offset,
            })
            .collect()
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
    header[0..4].copy_from_slice(&(tensors.len() as u32).to_le_bytes());
    header[4..8].copy_from_slice(&FILE_VERSION.to_le_bytes());
    out.extend_from_slice(&header);
    for t in tensors {
        let payload_offset = out.len() + HEADER_BYTES;
        let mut chunk = [0u8; HEADER_BYTES];
        chunk[0..4].copy_from_slice(&CHUNK_MAGIC);
        chunk[4..8].copy_from_slice(&FP16_TYPE_CODE.to_le_bytes());
        chunk[8..16].copy_from_slice(&((2 * t.len()) as u64).to_le_bytes());
        chunk[16..24].copy_from_slice(&(payload_offset as u64).to_le_bytes());
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

/// Reads the fp16 payload of the chunk whose header is at `offset`, checking the file
/// header, the chunk header (magic, data type, size = `numel` fp16 values) and that the
/// payload lies inside the file.
pub fn read_chunk(bytes: &[u8], offset: u64, numel: usize) -> Result<Vec<f16>> {
    if bytes.len() < HEADER_BYTES {
        return Err(mil_err!(
            Blob,
            "weight file is {} bytes, shorter than its {HEADER_BYTES}-byte header",
            bytes.len()
        ));
    }
    let version = u32_at(bytes, 4);
    if version != FILE_VERSION {
        return Err(mil_err!(Blob, "weight file header says format version {version}, expected {FILE_VERSION}"));
    }
    let at = usize::try_from(offset).unwrap_or(usize::MAX);
    if at.checked_add(HEADER_BYTES).is_none_or(|end| end > bytes.len()) {
        return Err(mil_err!(
            Blob,
            "chunk offset {offset} is out of range: the file is {} bytes, so a chunk header must start at or before {}",
            bytes.len(),
            bytes.len() - HEADER_BYTES
        ));
    }
    let chunk = &bytes[at..at + HEADER_BYTES];
    if chunk[0..4] != CHUNK_MAGIC {
        return Err(mil_err!(
            Blob,
            "no chunk header at offset {offset}: expected magic EF BE AD DE, found {:02X?}",
            &chunk[0..4]
        ));
    }
    let type_code = u32_at(chunk, 4);
    if type_code != FP16_TYPE_CODE {
        return Err(mil_err!(
            Blob,
            "chunk at offset {offset} holds data type code {type_code}, expected {FP16_TYPE_CODE} (fp16)"
        ));
    }
    let size = u64_at(chunk, 8);
    let data_at = u64_at(chunk, 16);
    let want = numel.checked_mul(2).map(|n| n as u64);
    if want != Some(size) {
        return Err(mil_err!(
            Blob,
            "chunk at offset {offset} holds {size} bytes, expected {} ({numel} fp16 values)",
            numel as u128 * 2
        ));
    }
    if data_at.checked_add(size).is_none_or(|end| end > bytes.len() as u64) {
        return Err(mil_err!(
            Blob,
            "chunk at offset {offset} says its {size}-byte payload starts at {data_at}, past the end of the {}-byte file",
            bytes.len()
        ));
    }
    // Both fit in usize: they are within the file's length.
    let (data_at, size) = (data_at as usize, size as usize);
    Ok(bytes[data_at..data_at + size]
        .chunks_exact(2)
        .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
        .collect())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from(u32_at(bytes, at)) | (u64::from(u32_at(bytes, at + 4)) << 32)
}

/// A model directory: `model.mil` and the weight files it refers to, the form in which
/// the ANE framework compiles a program (and in which a program can be kept or sent).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDir {
    pub program: Program,
    pub weights: Weights,
}

impl ModelDir {
    /// Reads `dir/model.mil`, parses and validates it, and reads every weight file it
    /// refers to. Each BLOBFILE reference is checked: file present, offset in range,
    /// chunk header valid, payload of exactly the declared fp16 tensor's size. Errors
    /// name the file, and for weights the op and its line:column in model.mil.
    pub fn read(dir: &Path) -> Result<ModelDir> {
        let mil_file = dir.join(MODEL_FILE);
        let text = std::fs::read_to_string(&mil_file)
            .map_err(|e| mil_err!(Io, "cannot read the program: {e}").in_file(&mil_file))?;
        let program = crate::text::parse_and_validate(&text).map_err(|e| e.in_file(&mil_file))?;
        let mut weights = Weights::new();
        for f in &program.functions {
            for op in &f.ops {
                for value in op_values(op) {
                    if let Value::Blob { ty, path, offset } = value {
                        let here = |e: Error| e.at(op.span).in_op(op.name.clone());
                        check_blob(dir, &mut weights, ty, path, *offset).map_err(here)?;
                    }
                }
            }
        }
        Ok(ModelDir { program, weights })
    }

    /// Writes `dir/model.mil` (in the program's dialect) and each weight file under
    /// `dir`, creating directories as needed.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let io = |file: &Path| {
            let file = file.to_path_buf();
            move |e: std::io::Error| mil_err!(Io, "cannot write: {e}").in_file(file)
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mil_file = dir.join(MODEL_FILE);
        std::fs::write(&mil_file, crate::text::print(&self.program)).map_err(io(&mil_file))?;
        for (path, bytes) in self.weights.files() {
            let file = weight_file(dir, path)?;
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&file, bytes).map_err(io(&file))?;
        }
        Ok(())
    }
}

/// Loads the file a BLOBFILE value names (once) into `weights` and checks the chunk.
fn check_blob(dir: &Path, weights: &mut Weights, ty: &TensorType, path: &str, offset: u64) -> Result<()> {
    let file = weight_file(dir, path)?;
    if weights.file(path).is_none() {
        let bytes = std::fs::read(&file).map_err(|e| match e.kind() {
            IoKind::NotFound => mil_err!(Blob, "weight file `{path}` is missing").in_file(&file),
            _ => mil_err!(Io, "cannot read weight file `{path}`: {e}").in_file(&file),
        })?;
        weights.insert_file(path, bytes);
    }
    if ty.dtype != DType::Fp16 {
        return Err(mil_err!(Blob, "BLOBFILE tensors are fp16 here, found {ty}").in_file(&file));
    }
    let bytes = weights.file(path).unwrap_or_default();
    read_chunk(bytes, offset, ty.numel()).map(|_| ()).map_err(|e| e.in_file(&file))
}

/// The file under `dir` that a MIL weight path (`@model_path/weights/w.bin`) names;
/// paths that would leave the directory are refused.
pub fn weight_file(dir: &Path, mil_path: &str) -> Result<PathBuf> {
    let rest = mil_path
        .strip_prefix(MODEL_PATH)
        .ok_or_else(|| mil_err!(Blob, "weight path `{mil_path}` does not start with `{MODEL_PATH}`"))?;
    let rel = Path::new(rest);
    let inside = rel.components().all(|c| matches!(c, Component::Normal(_))) && rel.components().next().is_some();
    if !inside {
        return Err(mil_err!(Blob, "weight path `{mil_path}` does not name a file inside the model directory"));
    }
    Ok(dir.join(rel))
}

/// Every constant an op holds: its attributes, then its literal arguments.
fn op_values(op: &Operation) -> Vec<&Value> {
    fn walk<'a>(arg: &'a Arg, out: &mut Vec<&'a Value>) {
        match arg {
            Arg::Var(_) => {}
            Arg::Value(v) => out.push(v),
            Arg::List(items) => items.iter().for_each(|a| walk(a, out)),
        }
    }
    let mut out: Vec<&Value> = op.attrs.iter().map(|(_, v)| v).collect();
    op.args.iter().for_each(|(_, a)| walk(a, &mut out));
    out
}

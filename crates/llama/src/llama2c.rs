//! llama2.c's `model.bin` checkpoint formats, read and write (fp32 only).
//!
//! Two versions exist (karpathy/llama2.c `export.py`):
//!
//! - **v0** (`legacy_export`, what `run.c` reads): 7 little-endian i32 — dim, hidden_dim,
//!   n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a *negative* vocab_size marks an
//!   unshared classifier — then fp32 tensors, all layers of one kind together:
//!   token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final,
//!   freq_cis_real and freq_cis_imag (`[seq_len, head_dim/2]` each, RoPE tables nobody
//!   reads any more), and wcls when unshared.
//! - **v1** (`version1_export`): a 256-byte header — u32 magic `0x616b3432` ("ak42"),
//!   i32 version = 1, the same 7 i32 (vocab_size positive), u8 shared_classifier, zeros —
//!   then the norms first: rms_att (all layers), rms_ffn (all layers), rms_final,
//!   token_embedding, wq, wk, wv, wo, w1, w2, w3 (all layers each), wcls when unshared.
//!   No freq_cis.
//!
//! Reading checks the header and the file length before allocating anything, so a
//! corrupt or truncated file gives an error that says which field or how many bytes,
//! never a huge allocation or a short read halfway through.
//!
//! The formats record neither RMSNorm ε nor RoPE θ (run.c hard-codes 1e-5 and 10000)
//! nor QKV biases; writing a model that needs them is an error rather than a silent
//! change of model.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::Path;

use crate::config::{Config, DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA};
use crate::error::{err, thousands, Error, Result};
use crate::params::{Layout, Params, TensorKind};

/// First u32 of a v1+ file: the ASCII bytes "ak42" read as a little-endian u32.
pub const MAGIC: u32 = 0x616b_3432;
/// Bytes before the first tensor in a v0 file: 7 × i32.
pub const V0_HEADER_BYTES: u64 = 7 * 4;
/// Bytes before the first tensor in a v1 file (export.py pads the header to 256).
pub const V1_HEADER_BYTES: u64 = 256;

/// Which `model.bin` layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The legacy layout `run.c` reads.
    V0,
    /// The 256-byte-header layout with the norms first.
    V1,
}

/// One stretch of a model.bin body.
#[derive(Clone, Copy, Debug)]
enum Chunk {
    /// A tensor of the model: its index in [`Layout::specs`](crate::params::Layout::specs).
    Tensor(usize),
    /// v0's RoPE tables, `[seq_len, head_dim/2]` each: cos, then sin.
    FreqCisReal,
    FreqCisImag,
}

/// The body of a file of `version` for `config`, in file order.
fn file_order(layout: &Layout, config: &Config, version: Version) -> Vec<Chunk> {
    use TensorKind::*;
    let index = |kind: TensorKind, layer: Option<usize>| {
        layout.index_of(kind, layer).expect("every llama2.c tensor exists in the layout of its config")
    };
    let all_layers = |kind: TensorKind| (0..config.n_layers).map(move |l| Chunk::Tensor(index(kind, Some(l))));
    let mut order = Vec::new();
    match version {
        Version::V0 => {
            order.push(Chunk::Tensor(index(TokenEmbedding, None)));
            for kind in [RmsAtt, Wq, Wk, Wv, Wo, RmsFfn, W1, W2, W3] {
                order.extend(all_layers(kind));
            }
            order.push(Chunk::Tensor(index(RmsFinal, None)));
            order.push(Chunk::FreqCisReal);
            order.push(Chunk::FreqCisImag);
        }
        Version::V1 => {
            order.extend(all_layers(RmsAtt));
            order.extend(all_layers(RmsFfn));
            order.push(Chunk::Tensor(index(RmsFinal, None)));
            order.push(Chunk::Tensor(index(TokenEmbedding, None)));
            for kind in [Wq, Wk, Wv, Wo, W1, W2, W3] {
                order.extend(all_layers(kind));
            }
        }
    }
    if !config.shared_classifier {
        order.push(Chunk::Tensor(index(Wcls, None)));
    }
    order
}

/// Size in bytes of a `version` file holding a model of `config` (which must be valid
/// and bias-free).
pub fn file_size(config: &Config, version: Version) -> u64 {
    let header = match version {
        Version::V0 => V0_HEADER_BYTES,
        Version::V1 => V1_HEADER_BYTES,
    };
    let freq_cis = match version {
        Version::V0 => config.seq_len * config.head_dim(),
        Version::V1 => 0,
    };
    header + 4 * (config.n_params() + freq_cis) as u64
}

/// Reads a v0 or v1 `model.bin` (the version is detected from the magic number).
pub fn read_model(path: impl AsRef<Path>) -> Result<Params> {
    read_model_with_version(path).map(|(params, _)| params)
}

/// Like [`read_model`], also saying which version the file was.
pub fn read_model_with_version(path: impl AsRef<Path>) -> Result<(Params, Version)> {
    let path = path.as_ref();
    read(path).map_err(|e| e.in_file(path))
}

const FIELD_NAMES: [&str; 7] = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"];

fn read(path: &Path) -> Result<(Params, Version)> {
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, "cannot stat", e))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);

    // The header: at most 256 bytes, and never more than the file holds.
    let mut head = vec![0u8; file_len.min(V1_HEADER_BYTES) as usize];
    reader.read_exact(&mut head).map_err(|e| Error::io(path, "cannot read the header", e))?;
    let i32_at = |i: usize| i32::from_le_bytes(head[i..i + 4].try_into().unwrap());
    if head.len() < 4 {
        return Err(err!(Format, "file is {file_len} bytes; a model.bin starts with a 28-byte header"));
    }
    let magic = u32::from_le_bytes(head[0..4].try_into().unwrap());
    let (version, fields, shared) = if magic == MAGIC {
        if file_len < V1_HEADER_BYTES {
            return Err(err!(Format, "file is {file_len} bytes, shorter than the 256-byte v1 header"));
        }
        let version = i32_at(4);
        if version != 1 {
            return Err(err!(
                Unsupported,
                "model.bin format version {version} is not supported (only v0 and v1, fp32; \
                 v2 is llama2.c's int8-quantized export)"
            ));
        }
        let fields: [i32; 7] = std::array::from_fn(|i| i32_at(8 + 4 * i));
        let shared = match head[36] {
            0 => false,
            1 => true,
            flag => return Err(err!(Format, "header field shared_classifier is {flag}; it must be 0 or 1")),
        };
        if fields[5] < 0 {
            return Err(err!(Format, "header field vocab_size is {}; it must be positive in a v1 file", fields[5]));
        }
        (Version::V1, fields, shared)
    } else {
        if file_len < V0_HEADER_BYTES {
            return Err(err!(Format, "file is {file_len} bytes, shorter than the 28-byte model.bin header"));
        }
        let mut fields: [i32; 7] = std::array::from_fn(|i| i32_at(4 * i));
        // v0 marks an unshared classifier with a negative vocabulary size.
        let shared = fields[5] > 0;
        fields[5] = fields[5].checked_abs().unwrap_or(i32::MIN);
        (Version::V0, fields, shared)
    };
    for (name, value) in FIELD_NAMES.iter().zip(fields) {
        if value <= 0 {
            return Err(err!(Format, "header field {name} is {value}; it must be positive"));
        }
    }
    let [dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len] = fields.map(|v| v as usize);
    let mut config = Config::new(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len);
    config.shared_classifier = shared;
    config.validate().map_err(|e| err!(Format, "header: {}", e.message))?;

    let needed = file_size(&config, version);
    if file_len != needed {
        return Err(err!(
            Format,
            "header says {}: a {} file needs {} bytes, file has {}{}",
            describe(&config),
            version_name(version),
            thousands(needed),
            thousands(file_len),
            if file_len < needed { " (truncated?)" } else { "" }
        ));
    }

    // Sizes agree: allocate and fill.
    let mut params = Params::zeros(&config)?;
    let header_bytes = match version {
        Version::V0 => V0_HEADER_BYTES,
        Version::V1 => V1_HEADER_BYTES,
    };
    reader.seek(std::io::SeekFrom::Start(header_bytes)).map_err(|e| Error::io(path, "cannot seek", e))?;
    let freq_cis_bytes = 4 * (config.seq_len * config.head_dim() / 2) as i64;
    let order = file_order(params.layout(), &config, version);
    let specs = params.layout().specs().to_vec();
    for chunk in order {
        match chunk {
            Chunk::Tensor(i) => {
                let spec = &specs[i];
                read_f32s(&mut reader, params.get_mut(spec))
                    .map_err(|e| Error::io(path, &format!("cannot read tensor {}", spec.name), e))?;
            }
            Chunk::FreqCisReal | Chunk::FreqCisImag => {
                reader.seek_relative(freq_cis_bytes).map_err(|e| Error::io(path, "cannot skip freq_cis", e))?;
            }
        }
    }
    params.check_finite()?;
    Ok((params, version))
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::V0 => "v0",
        Version::V1 => "v1",
    }
}

fn describe(c: &Config) -> String {
    format!(
        "dim {}, hidden_dim {}, n_layers {}, n_heads {}, n_kv_heads {}, vocab_size {} ({} classifier), seq_len {}",
        c.dim,
        c.hidden_dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        if c.shared_classifier { "shared" } else { "separate" },
        c.seq_len
    )
}

/// Fills `dst` with little-endian f32s from `reader`.
fn read_f32s(reader: &mut impl Read, dst: &mut [f32]) -> std::io::Result<()> {
    let mut bytes = vec![0u8; 4 * dst.len().min(1 << 16)];
    for chunk in dst.chunks_mut(1 << 16) {
        let bytes = &mut bytes[..4 * chunk.len()];
        reader.read_exact(bytes)?;
        for (value, b) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            *value = f32::from_le_bytes(b.try_into().unwrap());
        }
    }
    Ok(())
}

fn write_f32s(writer: &mut impl Write, src: &[f32]) -> std::io::Result<()> {
    for value in src {
        writer.write_all(&value.to_le_bytes())?;
    }
    Ok(())
}

/// The RoPE tables v0 files carry, as llama2.c `model.py` `precompute_freqs_cis` makes
/// them in fp32: `real[pos][i] = cos(pos · θ^(-2i/head_dim))`, `imag` the sine;
/// each `[seq_len, head_dim/2]`.
pub fn freq_cis(config: &Config) -> (Vec<f32>, Vec<f32>) {
    let half = config.head_dim() / 2;
    let mut real = Vec::with_capacity(config.seq_len * half);
    let mut imag = Vec::with_capacity(config.seq_len * half);
    for pos in 0..config.seq_len {
        for i in 0..half {
            let freq = 1.0 / config.rope_theta.powf((2 * i) as f32 / config.head_dim() as f32);
            let angle = pos as f32 * freq;
            real.push(angle.cos());
            imag.push(angle.sin());
        }
    }
    (real, imag)
}

/// Writes `params` as a `model.bin` of `version`. Errors if the model has QKV biases or
/// a non-default ε or θ, which llama2.c files cannot record.
pub fn write_model(params: &Params, path: impl AsRef<Path>, version: Version) -> Result<()> {
    let path = path.as_ref();
    let config = params.config();
    if config.qkv_bias {
        return Err(err!(Unsupported, "llama2.c model.bin files have no place for QKV biases").in_file(path));
    }
    if let Err(what) = config.llama2c_compatible() {
        return Err(err!(Unsupported, "llama2.c model.bin files have no place for {what}").in_file(path));
    }
    if config.norm_eps != DEFAULT_NORM_EPS || config.rope_theta != DEFAULT_ROPE_THETA {
        return Err(err!(
            Unsupported,
            "llama2.c model.bin files imply norm_eps {DEFAULT_NORM_EPS} and rope_theta {DEFAULT_ROPE_THETA}; \
             this model has norm_eps {} and rope_theta {}",
            config.norm_eps,
            config.rope_theta
        )
        .in_file(path));
    }
    let file = File::create(path).map_err(|e| Error::io(path, "cannot create", e))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    write_body(&mut writer, params, version).map_err(|e| Error::io(path, "cannot write", e))?;
    writer.flush().map_err(|e| Error::io(path, "cannot write", e))?;
    Ok(())
}

fn write_body(writer: &mut impl Write, params: &Params, version: Version) -> std::io::Result<()> {
    let c = params.config();
    let fields = [c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len];
    // Config::validate bounds every field far below i32::MAX, so the casts are exact.
    let mut fields = fields.map(|v| v as i32);
    match version {
        Version::V0 => {
            if !c.shared_classifier {
                fields[5] = -fields[5];
            }
            for v in fields {
                writer.write_all(&v.to_le_bytes())?;
            }
        }
        Version::V1 => {
            let mut header = Vec::with_capacity(V1_HEADER_BYTES as usize);
            header.extend_from_slice(&MAGIC.to_le_bytes());
            header.extend_from_slice(&1i32.to_le_bytes());
            for v in fields {
                header.extend_from_slice(&v.to_le_bytes());
            }
            header.push(c.shared_classifier as u8);
            header.resize(V1_HEADER_BYTES as usize, 0);
            writer.write_all(&header)?;
        }
    }
    let (real, imag) = match version {
        Version::V0 => freq_cis(c),
        Version::V1 => (Vec::new(), Vec::new()),
    };
    let specs = params.layout().specs();
    for chunk in file_order(params.layout(), c, version) {
        match chunk {
            Chunk::Tensor(i) => write_f32s(writer, params.get(&specs[i]))?,
            Chunk::FreqCisReal => write_f32s(writer, &real)?,
            Chunk::FreqCisImag => write_f32s(writer, &imag)?,
        }
    }
    Ok(())
}

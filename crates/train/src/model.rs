//! A Llama model on a device: prefill and KV-cached decoding with the kernels of
//! [`crate::kernels`] (the layers, and the classifier for the last token, split into
//! parts of at most [`HEAD_PART_ROWS`] vocabulary rows for the ANE's dimension limit);
//! embedding, RMSNorm and RoPE on the CPU.
//!
//! Weights are packed into each layer's input surfaces once, when the decoder is built:
//! inference weights never change, so every later step writes only activations into the
//! surfaces (the weights already sit after them) and the kernels stay compiled.
//!
//! ## Padding
//! [`token_padding`] is the one place that pads shapes for a device: the ANE is reported
//! to want a spatial width that is a multiple of 16 (DESIGN.md), so on the ANE the
//! number of tokens a kernel processes at once is rounded up to a multiple of 16 (the
//! extra columns are zeros and their results are dropped; their attention rows are fully
//! masked). The CPU device needs no padding.

use std::collections::HashMap;

use device::{Device, Kernel, Surface};
use rayon::prelude::*;

use crate::binding::KernelIo;
use crate::kernels::{self, KernelDef, LayerDims, MASK_NEG};
use crate::linalg;

/// Model hyperparameters the device model needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelDims {
    pub layer: LayerDims,
    pub n_layers: usize,
    pub vocab: usize,
    pub seq_len: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    /// RoPE's frequency scaling (Llama 3.1/3.2), if any.
    pub rope_scaling: Option<llama::RopeScaling>,
}

/// One layer's weights, row-major `[out, in]` as in llama2.c.
#[derive(Clone, Copy, Debug)]
pub struct LayerRef<'a> {
    pub rms_att: &'a [f32],
    pub wq: &'a [f32],
    pub wk: &'a [f32],
    pub wv: &'a [f32],
    pub wo: &'a [f32],
    pub rms_ffn: &'a [f32],
    pub w1: &'a [f32],
    pub w2: &'a [f32],
    pub w3: &'a [f32],
    /// Optional QKV biases (Qwen2): `[Q]`, `[KV]`, `[KV]`.
    pub bq: Option<&'a [f32]>,
    pub bk: Option<&'a [f32]>,
    pub bv: Option<&'a [f32]>,
    /// Optional per-head RMSNorm gains of the queries and keys (Qwen3): `[head_dim]` each.
    pub q_norm: Option<&'a [f32]>,
    pub k_norm: Option<&'a [f32]>,
}

/// What a device model reads its weights from. `Sync`, so that a forward pass can run
/// on a rayon worker (see [`Decoder::forward`]).
pub trait ModelWeights: Sync {
    fn dims(&self) -> ModelDims;
    /// `[vocab, dim]`.
    fn token_embedding(&self) -> &[f32];
    fn layer(&self, l: usize) -> LayerRef<'_>;
    /// `[dim]`.
    fn rms_final(&self) -> &[f32];
    /// `[vocab, dim]` (the embedding table when the classifier is shared).
    fn classifier(&self) -> &[f32];
}

/// How many token columns a kernel should process for `t` real tokens on `device`
/// (see the module docs).
pub fn token_padding(device: &dyn Device, t: usize) -> usize {
    /// Reported by the 2026 ANE experiments: spatial widths that are not a multiple of
    /// 16 fail or slow down on the ANE.
    const ANE_WIDTH_MULTIPLE: usize = 16;
    if device.name() == "ane" {
        t.div_ceil(ANE_WIDTH_MULTIPLE) * ANE_WIDTH_MULTIPLE
    } else {
        t
    }
}

/// Writes `W [out, in]` transposed into a surface block (`[in, out]` at `c0 = 0`,
/// positions `s0..s0+out`): row `i` of the block holds column `i` of W.
///
/// fp32 surfaces are written in place, 8 × 8 tile by tile ([`linalg::transpose_block`]),
/// so that both W's rows and the surface's are read and written a cache line at a time,
/// with the surface's rows split between threads in blocks of 32. (Column by column,
/// every read of a 768 × 2048 weight touched a new cache line: the copies took 9 % of a
/// Stories110M training step; in scalar 32 × 32 tiles they still took 4.8 ms per layer,
/// 1.3 ms with the tiles transposed in registers.)
pub fn write_transposed(surface: &mut Surface, s0: usize, w: &[f32], out: usize, inp: usize) {
    const ROWS: usize = 32;
    assert_eq!(w.len(), out * inp, "write_transposed: W must be [{out}, {inp}]");
    let width = *surface.shape().last().expect("surface has a shape");
    assert!(s0 + out <= width, "write_transposed: positions {s0}..{} past width {width}", s0 + out);
    let Some(dst) = surface.as_f32_mut() else {
        let mut row = vec![0.0f32; out];
        for i in 0..inp {
            for (o, r) in row.iter_mut().enumerate() {
                *r = w[o * inp + i];
            }
            surface.write_f32_at(i * width + s0, &row);
        }
        return;
    };
    assert!(dst.len() >= inp * width, "write_transposed: the surface has fewer than {inp} channels");
    dst[..inp * width].par_chunks_mut(ROWS * width).enumerate().for_each(|(block, rows)| {
        // Surface rows i0.. take W's columns i0..: W's rows, from column i0 on, transposed.
        let (i0, n) = (block * ROWS, rows.len() / width);
        linalg::transpose_block::<false>(&w[i0..], inp, &mut rows[s0..], width, out, n);
    });
}

/// One compiled kernel with its layout, and its output surfaces.
struct Compiled {
    kernel: Box<dyn Kernel>,
    io: KernelIo,
    outputs: Vec<Surface>,
}

impl Compiled {
    fn new(device: &dyn Device, def: &KernelDef) -> device::Result<Compiled> {
        let kernel = device.compile(&def.program, &def.weights)?;
        let outputs = kernel.outputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect();
        Ok(Compiled { kernel, io: def.io.clone(), outputs })
    }

    /// Fresh input surfaces for this kernel.
    fn input_surfaces(&self) -> Vec<Surface> {
        self.kernel.inputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect()
    }

    fn eval(&mut self, inputs: &[Surface]) -> device::Result<()> {
        let ins: Vec<&Surface> = inputs.iter().collect();
        let mut outs: Vec<&mut Surface> = self.outputs.iter_mut().collect();
        self.kernel.eval(&ins, &mut outs)
    }

    /// Output `name` into `dst` (a `[C, t]` matrix).
    fn read(&self, name: &str, dst: &mut [f32]) {
        self.io.read_into(&self.outputs, name, dst);
    }
}

/// Writes `W [out, in]` transposed into block `block` of a kernel's input surfaces, at
/// column `col` of the block.
fn write_block_t(io: &KernelIo, surfaces: &mut [Surface], block: &str, col: usize, w: &[f32], out: usize, inp: usize) {
    let (i, b) = io.block(block);
    write_transposed(&mut surfaces[i], b.s0 + col, w, out, inp);
}

/// Kernels compiled for one token count.
struct KernelSet {
    qkv: Compiled,
    attn: Compiled,
    ffn: Compiled,
    /// Per layer: each kernel's input surfaces (weights written once; the attention
    /// kernel's also hold this layer's KV cache and the mask).
    qkv_in: Vec<Vec<Surface>>,
    attn_in: Vec<Vec<Surface>>,
    ffn_in: Vec<Vec<Surface>>,
}

/// The classifier as device kernels, one per part of the vocabulary (see
/// [`kernels::classifier_parts`]), for the last token of a forward pass.
struct Head {
    /// Token columns of the head kernels (1, or the ANE's padded width).
    t: usize,
    parts: Vec<HeadPart>,
}

struct HeadPart {
    rows: (usize, usize),
    kernel: Compiled,
    /// The normed activation, then `W_pᵀ` (written once).
    input: Vec<Surface>,
}

/// Rows per classifier kernel: the surface `[D, t + rows]`, padded to an odd multiple of
/// 32 positions ([`device::padded_width`]), stays within the ANE's per-dimension limit
/// for a token width up to 32; and a multiple of 16.
pub const HEAD_PART_ROWS: usize = mil::lint::MAX_DIMENSION - 64;

/// Prefill and decode on a device, with a KV cache in the attention kernels' surfaces.
pub struct Decoder<'w, W: ModelWeights> {
    weights: &'w W,
    dims: ModelDims,
    device: &'w dyn Device,
    sets: HashMap<usize, KernelSet>,
    /// Per layer: the keys and the values so far, `[KV, seq_len]` each. Every kernel
    /// set's attention surfaces hold a copy (each kernel reads one packed surface); this
    /// one fills the surfaces of a set compiled later.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    pos: usize,
    /// How many tokens prefill processes per kernel call: every prefill call runs at
    /// this width (capped at the context), a shorter chunk padded with zero columns, so
    /// that prompts of any length share one compiled kernel set whose weights
    /// [`prepare`](Self::prepare) packs before the first prompt.
    pub prefill_chunk: usize,
    /// Seconds spent compiling kernels so far.
    pub compile_seconds: f64,
    /// Vocabulary rows per classifier kernel (default [`HEAD_PART_ROWS`]); set before
    /// the first forward pass.
    pub head_part_rows: usize,
    head: Option<Head>,
}

impl<'w, W: ModelWeights> Decoder<'w, W> {
    pub fn new(device: &'w dyn Device, weights: &'w W) -> device::Result<Self> {
        let dims = weights.dims();
        let cache = dims.layer.kv_dim() * dims.seq_len;
        Ok(Decoder {
            weights,
            dims,
            device,
            sets: HashMap::new(),
            k_cache: vec![vec![0.0; cache]; dims.n_layers],
            v_cache: vec![vec![0.0; cache]; dims.n_layers],
            pos: 0,
            prefill_chunk: 32,
            compile_seconds: 0.0,
            head_part_rows: HEAD_PART_ROWS,
            head: None,
        })
    }

    /// Number of classifier kernels (parts of the vocabulary) compiled so far: 0 before
    /// the first forward pass.
    pub fn head_kernels(&self) -> usize {
        self.head.as_ref().map_or(0, |h| h.parts.len())
    }

    /// Compiles the classifier kernels and writes their weights, once.
    fn compile_head(&mut self) -> device::Result<()> {
        if self.head.is_some() {
            return Ok(());
        }
        let start = std::time::Instant::now();
        let (dim, vocab) = (self.dims.layer.dim, self.dims.vocab);
        let t = token_padding(self.device, 1);
        let dialect = self.device.dialect();
        let wcls = self.weights.classifier();
        let mut parts = Vec::new();
        for (lo, hi) in kernels::classifier_parts(vocab, self.head_part_rows) {
            let def = kernels::classifier_part(dim, hi - lo, t, dialect)?;
            let kernel = Compiled::new(self.device, &def)?;
            let mut input = kernel.input_surfaces();
            write_block_t(&def.io, &mut input, "wcls", 0, &wcls[lo * dim..hi * dim], hi - lo, dim);
            parts.push(HeadPart { rows: (lo, hi), kernel, input });
        }
        self.head = Some(Head { t, parts });
        self.compile_seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Logits `[vocab]` of one normed activation `[D]`, from the classifier kernels.
    fn head_logits(&mut self, normed: &[f32]) -> device::Result<Vec<f32>> {
        self.compile_head()?;
        let head = self.head.as_mut().expect("compiled just above");
        let mut logits = vec![0.0f32; self.dims.vocab];
        // Column 0 holds the token; padded columns stay zero.
        let mut xn = vec![0.0f32; normed.len() * head.t];
        for (c, &v) in normed.iter().enumerate() {
            xn[c * head.t] = v;
        }
        let mut out = Vec::new();
        for part in &mut head.parts {
            part.kernel.io.write(&mut part.input, "xn", &xn);
            part.kernel.eval(&part.input)?;
            let (lo, hi) = part.rows;
            out.resize((hi - lo) * head.t, 0.0);
            part.kernel.read("logits", &mut out);
            for (v, l) in logits[lo..hi].iter_mut().enumerate() {
                *l = out[v * head.t];
            }
        }
        Ok(logits)
    }

    /// Compiles the decode kernels (one token), the prefill kernels
    /// ([`prefill_chunk`](Self::prefill_chunk) tokens) and the classifier, and packs
    /// their weights, so that no forward pass pays for it (the time goes to
    /// [`compile_seconds`](Self::compile_seconds)). Idempotent; [`forward`](Self::forward)
    /// compiles what is missing if this was not called.
    pub fn prepare(&mut self) -> device::Result<()> {
        self.compile(token_padding(self.device, 1))?;
        if self.dims.seq_len > 1 {
            self.compile(self.prefill_width())?;
        }
        self.compile_head()
    }

    /// Token columns of a prefill kernel call (see [`prefill_chunk`](Self::prefill_chunk)).
    fn prefill_width(&self) -> usize {
        token_padding(self.device, self.prefill_chunk.clamp(1, self.dims.seq_len.max(1)))
    }

    /// The next position to fill.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Forgets the cache: the next token goes to position 0.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    fn compile(&mut self, t: usize) -> device::Result<()> {
        if self.sets.contains_key(&t) {
            return Ok(());
        }
        let start = std::time::Instant::now();
        let (d, dialect) = (self.dims.layer, self.device.dialect());
        let cache = self.dims.seq_len;
        let qkv = kernels::qkv_forward(&d, t, dialect)?;
        let attn = kernels::attention_decode(&d, t, cache, dialect)?;
        let ffn = kernels::ffn_forward(&d, t, dialect)?;
        let (qkv, attn, ffn) =
            (Compiled::new(self.device, &qkv)?, Compiled::new(self.device, &attn)?, Compiled::new(self.device, &ffn)?);
        let (mut qkv_in, mut attn_in, mut ffn_in) = (Vec::new(), Vec::new(), Vec::new());
        let (dim, q_dim, kvd, hid) = (d.dim, d.q_dim(), d.kv_dim(), d.hidden);
        for l in 0..self.dims.n_layers {
            let w = self.weights.layer(l);
            let mut s = qkv.input_surfaces();
            write_block_t(&qkv.io, &mut s, "wqkv", 0, w.wq, q_dim, dim);
            write_block_t(&qkv.io, &mut s, "wqkv", q_dim, w.wk, kvd, dim);
            write_block_t(&qkv.io, &mut s, "wqkv", q_dim + kvd, w.wv, kvd, dim);
            qkv_in.push(s);
            let mut s = attn.input_surfaces();
            write_block_t(&attn.io, &mut s, "wo", 0, w.wo, dim, q_dim);
            // The keys and values so far (a set compiled after some decoding).
            attn.io.write(&mut s, "k", &self.k_cache[l]);
            attn.io.write(&mut s, "v", &self.v_cache[l]);
            attn_in.push(s);
            let mut s = ffn.input_surfaces();
            write_block_t(&ffn.io, &mut s, "w13", 0, w.w1, hid, dim);
            write_block_t(&ffn.io, &mut s, "w13", hid, w.w3, hid, dim);
            ffn.io.write(&mut s, "w2", w.w2);
            ffn_in.push(s);
        }
        let set = KernelSet { qkv, attn, ffn, qkv_in, attn_in, ffn_in };
        self.sets.insert(t, set);
        self.compile_seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Runs `tokens` at positions `pos..pos + n` and returns the logits of the last one.
    /// Prompts are processed in chunks of [`prefill_chunk`](Self::prefill_chunk).
    pub fn forward(&mut self, tokens: &[u32]) -> device::Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(device::Error::new(device::ErrorKind::Binding, "forward needs at least one token"));
        }
        if self.pos + tokens.len() > self.dims.seq_len {
            return Err(device::Error::new(
                device::ErrorKind::Binding,
                format!(
                    "positions {}..{} pass the model's context of {} tokens",
                    self.pos,
                    self.pos + tokens.len(),
                    self.dims.seq_len
                ),
            ));
        }
        // On a rayon worker: the kernels' parallel loops then split their work with the
        // other workers (a worker that finds its half not yet taken does it itself),
        // instead of this thread handing each loop to the pool and sleeping until it is
        // done (two thread wake-ups per loop, dozens of loops per token).
        rayon::scope(|_| {
            let mut last = Vec::new();
            for chunk in tokens.chunks(if tokens.len() == 1 { 1 } else { self.prefill_chunk }) {
                last = self.forward_chunk(chunk)?;
            }
            Ok(last)
        })
    }

    fn forward_chunk(&mut self, tokens: &[u32]) -> device::Result<Vec<f32>> {
        let n = tokens.len();
        let t = if n == 1 { token_padding(self.device, 1) } else { self.prefill_width().max(n) };
        self.compile(t)?;
        let dims = self.dims;
        let d = dims.layer;
        let (dim, q_dim, kvd) = (d.dim, d.q_dim(), d.kv_dim());
        let pos0 = self.pos;
        let cache = dims.seq_len;

        // x: [D, t] residual stream, channel-major; padded columns stay zero.
        let mut x = vec![0.0f32; dim * t];
        let emb = self.weights.token_embedding();
        for (j, &tok) in tokens.iter().enumerate() {
            let row = &emb[tok as usize * dim..(tok as usize + 1) * dim];
            for c in 0..dim {
                x[c * t + j] = row[c];
            }
        }
        // mask: [t, cache], query j sees cache positions 0..=pos0+j.
        let mut mask = vec![MASK_NEG; t * cache];
        for (j, row) in mask.chunks_mut(cache).enumerate().take(n) {
            row[..pos0 + j + 1].fill(0.0);
        }

        let mut xn = vec![0.0f32; dim * t];
        let mut q = vec![0.0f32; q_dim * t];
        let mut k = vec![0.0f32; kvd * t];
        let mut v = vec![0.0f32; kvd * t];
        let mut y = vec![0.0f32; dim * t];
        let (mut k_new, mut v_new) = (vec![0.0f32; kvd * n], vec![0.0f32; kvd * n]);
        for l in 0..dims.n_layers {
            let w = self.weights.layer(l);
            rmsnorm_cols(&x, w.rms_att, dims.norm_eps, dim, t, &mut xn);
            let set = self.sets.get_mut(&t).expect("compiled above");
            set.qkv.io.write(&mut set.qkv_in[l], "xn", &xn);
            set.qkv.eval(&set.qkv_in[l])?;
            set.qkv.read("q", &mut q);
            set.qkv.read("k", &mut k);
            set.qkv.read("v", &mut v);
            add_bias(&mut q, w.bq, t);
            add_bias(&mut k, w.bk, t);
            add_bias(&mut v, w.bv, t);
            if let (Some(q_norm), Some(k_norm)) = (w.q_norm, w.k_norm) {
                head_rmsnorm_cols(&mut q, q_norm, dims.norm_eps, t);
                head_rmsnorm_cols(&mut k, k_norm, dims.norm_eps, t);
            }
            rope_cols(&mut q, d.head_dim(), t, pos0, dims.rope_theta, dims.rope_scaling);
            rope_cols(&mut k, d.head_dim(), t, pos0, dims.rope_theta, dims.rope_scaling);
            // New keys and values go into the cache at their positions: the host copy
            // and every compiled set's attention surfaces.
            for c in 0..kvd {
                k_new[c * n..(c + 1) * n].copy_from_slice(&k[c * t..c * t + n]);
                v_new[c * n..(c + 1) * n].copy_from_slice(&v[c * t..c * t + n]);
                self.k_cache[l][c * cache + pos0..c * cache + pos0 + n].copy_from_slice(&k_new[c * n..(c + 1) * n]);
                self.v_cache[l][c * cache + pos0..c * cache + pos0 + n].copy_from_slice(&v_new[c * n..(c + 1) * n]);
            }
            for s in self.sets.values_mut() {
                s.attn.io.write_at(&mut s.attn_in[l], "k", pos0, kvd, n, &k_new);
                s.attn.io.write_at(&mut s.attn_in[l], "v", pos0, kvd, n, &v_new);
            }
            let set = self.sets.get_mut(&t).expect("compiled above");
            let attn_in = &mut set.attn_in[l];
            set.attn.io.write(attn_in, "q", &q);
            set.attn.io.write(attn_in, "mask", &mask);
            set.attn.eval(attn_in)?;
            set.attn.read("y", &mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);

            rmsnorm_cols(&x, w.rms_ffn, dims.norm_eps, dim, t, &mut xn);
            set.ffn.io.write(&mut set.ffn_in[l], "xn", &xn);
            set.ffn.eval(&set.ffn_in[l])?;
            set.ffn.read("y", &mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        self.pos += n;

        // Final norm and classifier for the last real token only.
        let last: Vec<f32> = (0..dim).map(|c| x[c * t + n - 1]).collect();
        let mut normed = vec![0.0f32; dim];
        rmsnorm_cols(&last, self.weights.rms_final(), dims.norm_eps, dim, 1, &mut normed);
        self.head_logits(&normed)
    }
}

/// RMSNorm of each column of `x: [C, T]`, as llama2.c computes it (f32, ε inside the root).
fn rmsnorm_cols(x: &[f32], w: &[f32], eps: f32, c: usize, t: usize, out: &mut [f32]) {
    let mut ss = vec![0.0f32; t];
    for ch in 0..c {
        for (j, s) in ss.iter_mut().enumerate() {
            let v = x[ch * t + j];
            *s += v * v;
        }
    }
    for s in &mut ss {
        *s = 1.0 / (*s / c as f32 + eps).sqrt();
    }
    for ch in 0..c {
        for j in 0..t {
            out[ch * t + j] = w[ch] * (ss[j] * x[ch * t + j]);
        }
    }
}

/// QK-norm: [`rmsnorm_cols`] of every head of `x: [heads·hd, T]` in place, with the
/// gain `w: [hd]` shared by the heads.
fn head_rmsnorm_cols(x: &mut [f32], w: &[f32], eps: f32, t: usize) {
    let head = w.len() * t;
    let mut normed = vec![0.0f32; head];
    for chunk in x.chunks_mut(head) {
        rmsnorm_cols(chunk, w, eps, w.len(), t, &mut normed);
        chunk.copy_from_slice(&normed);
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>, t: usize) {
    if let Some(b) = bias {
        for (row, &bv) in x.chunks_mut(t).zip(b) {
            row.iter_mut().for_each(|v| *v += bv);
        }
    }
}

/// RoPE on interleaved pairs of channels `(2i, 2i+1)` of `x: [C, T]`, column j at
/// position `pos0 + j`, exactly as llama2.c's run.c computes the angles (in f32), with
/// the frequencies rescaled as [`llama::Config::rope_freqs`] does when there is a scaling.
fn rope_cols(x: &mut [f32], head_dim: usize, t: usize, pos0: usize, theta: f32, scaling: Option<llama::RopeScaling>) {
    let c = x.len() / t;
    for i in (0..c).step_by(2) {
        let hd = (i % head_dim) as f32;
        let freq = 1.0 / theta.powf(hd / head_dim as f32);
        let freq = scaling.map_or(freq, |s| s.apply(f64::from(freq)) as f32);
        for j in 0..t {
            let val = (pos0 + j) as f32 * freq;
            let (fci, fcr) = val.sin_cos();
            let (a, b) = (x[i * t + j], x[(i + 1) * t + j]);
            x[i * t + j] = a * fcr - b * fci;
            x[(i + 1) * t + j] = a * fci + b * fcr;
        }
    }
}

impl ModelWeights for llama::Params {
    fn dims(&self) -> ModelDims {
        let c = self.config();
        ModelDims {
            layer: LayerDims::of(c),
            n_layers: c.n_layers,
            vocab: c.vocab_size,
            seq_len: c.seq_len,
            norm_eps: c.norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling: c.rope_scaling,
        }
    }

    fn token_embedding(&self) -> &[f32] {
        llama::Params::token_embedding(self)
    }

    fn layer(&self, l: usize) -> LayerRef<'_> {
        let w = llama::Params::layer(self, l);
        let bias = w.qkv_bias();
        let qk_norm = w.qk_norm();
        LayerRef {
            rms_att: w.rms_att(),
            wq: w.wq(),
            wk: w.wk(),
            wv: w.wv(),
            wo: w.wo(),
            rms_ffn: w.rms_ffn(),
            w1: w.w1(),
            w2: w.w2(),
            w3: w.w3(),
            bq: bias.map(|b| b.0),
            bk: bias.map(|b| b.1),
            bv: bias.map(|b| b.2),
            q_norm: qk_norm.map(|n| n.0),
            k_norm: qk_norm.map(|n| n.1),
        }
    }

    fn rms_final(&self) -> &[f32] {
        llama::Params::rms_final(self)
    }

    fn classifier(&self) -> &[f32] {
        llama::Params::classifier(self)
    }
}

/// Timing of one [`generate`] call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenerateStats {
    /// Tokens run through the prefill (the prompt, BOS included).
    pub prefill_tokens: usize,
    pub prefill_seconds: f64,
    /// Tokens produced one at a time after the prompt.
    pub decode_tokens: usize,
    pub decode_seconds: f64,
}

/// llama2.c's generation loop on a device: `prompt` (BOS first) is prefilled in chunks,
/// then tokens are sampled one position at a time until `steps` positions have run or
/// the model produces BOS (id 1). `steps` counts positions, prompt included, as
/// llama2.c's `-n`. `emit(prev, next)` receives every token after BOS as it is known —
/// the prompt's too, as llama2.c prints them. Returns the tokens (BOS, prompt,
/// generated).
pub fn generate<W: ModelWeights>(
    decoder: &mut Decoder<'_, W>,
    prompt: &[u32],
    steps: usize,
    mut sample: impl FnMut(&[f32]) -> u32,
    mut emit: impl FnMut(u32, u32),
) -> device::Result<(Vec<u32>, GenerateStats)> {
    /// llama2.c's BOS id: the model predicting it ends the text.
    const BOS: u32 = 1;
    let mut stats = GenerateStats::default();
    let mut tokens = prompt.to_vec();
    let n_pre = prompt.len().min(steps);
    if n_pre == 0 {
        return Ok((tokens, stats));
    }
    decoder.reset();
    decoder.prepare()?;
    let start = std::time::Instant::now();
    let mut logits = decoder.forward(&prompt[..n_pre])?;
    stats.prefill_tokens = n_pre;
    stats.prefill_seconds = start.elapsed().as_secs_f64();
    for pos in 0..n_pre {
        if pos + 1 < prompt.len() {
            emit(prompt[pos], prompt[pos + 1]);
        }
    }
    if n_pre < prompt.len() {
        tokens.truncate(n_pre + 1);
        return Ok((tokens, stats));
    }
    let start = std::time::Instant::now();
    let mut pos = prompt.len() - 1;
    let mut token = prompt[pos];
    loop {
        let next = sample(&logits);
        if next == BOS {
            break;
        }
        emit(token, next);
        tokens.push(next);
        token = next;
        pos += 1;
        if pos >= steps {
            break;
        }
        logits = decoder.forward(&[token])?;
        stats.decode_tokens += 1;
    }
    stats.decode_seconds = start.elapsed().as_secs_f64();
    Ok((tokens, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mil::DType;

    /// The tiled, threaded copy against the definition, at sizes that are not multiples
    /// of the tile, beside other data in the surface (which must be left alone).
    #[test]
    fn write_transposed_matches_the_definition() {
        for dtype in [DType::Fp32, DType::Fp16] {
            for (out, inp, s0, channels, width) in [(70, 45, 3, 50, 80), (32, 32, 0, 32, 32), (1, 100, 7, 100, 9)] {
                let w: Vec<f32> = (0..out * inp).map(|i| (i % 251) as f32 - 100.0).collect();
                let mut s = Surface::from_f32(dtype, &[1, channels, 1, width], &vec![0.5; channels * width]);
                write_transposed(&mut s, s0, &w, out, inp);
                let got = s.to_f32();
                for c in 0..channels {
                    for p in 0..width {
                        let want = if c < inp && (s0..s0 + out).contains(&p) { w[(p - s0) * inp + c] } else { 0.5 };
                        assert_eq!(got[c * width + p], want, "{dtype:?} {out}x{inp}: channel {c}, position {p}");
                    }
                }
            }
        }
    }
}

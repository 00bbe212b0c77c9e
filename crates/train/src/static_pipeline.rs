//! The static pipeline: every layer has its own kernels with its weights **baked in**
//! (BLOBFILE constants, [`crate::static_kernels`]), recompiled after every optimizer step.
//!
//! This is how the ANE was first trained: weights given as constants are fixed at compile
//! time (DESIGN.md), so new weights need new kernels. It costs `5·L` compiles per step
//! (plus `1 + vocabulary chunks` with the ANE extras) against the dynamic pipeline's 6 per
//! run, and it runs into the ANE's per-process compile budget, which the trainer meets
//! by checkpointing and `exec()`-ing itself. In exchange the kernels fuse more (RMSNorm,
//! RoPE and attention in one kernel) and carry no weight bytes through surfaces.
//!
//! A [`KernelSet`] is one version of the weight-bearing kernels; [`KernelSet::compile`]
//! needs only the device, the [`StaticShape`] and the parameters, so it can run on
//! another thread while the current set trains — the double-buffered pipeline
//! (`crate::double_buffer`) does exactly that. Two kernels carry no weights and are
//! compiled once per run: the weight-free part of attention backward and, with the
//! extras, the RMSNorm backward.
//!
//! Per layer and micro-batch: 2 forward evaluations (attention with RMSNorm and RoPE; the
//! FFN with RMSNorm) and 4 backward ones (FFN; Woᵀ; the weight-free attention backward
//! with RoPE's backward; QKV). On the CPU: embedding, residuals, QKV-bias gradients, every
//! weight gradient as a GEMM and, without the extras, the final RMSNorm, the classifier
//! with the cross-entropy and all RMSNorm backwards.
//!
//! The kernels' parameters are rounded to fp16 when baked, so on the fp32 CPU device the
//! static pipeline differs from the dynamic one (whose fp32 surfaces carry the weights
//! unrounded) by that rounding, and by nothing else when the weights are fp16 numbers.

use std::ops::Range;
use std::time::Instant;

use device::{Device, Kernel, Surface};
use llama::{Config, Params};

use crate::binding::{IoConvention, KernelIo, Target};
use crate::cpu_ops::{self, ClassifierLoss};
use crate::data::IGNORE_TARGET;
use crate::kernels::{KernelDef, LayerDims};
use crate::linalg::{matmul_acc, MatMut, MatRef};
use crate::pipeline::{LayerActs, PhaseTimes};
use crate::static_kernels::{self as sk, AttentionWeights, FfnWeights};

/// Adds the time since `*t` to `slot` in milliseconds and restarts `*t`.
fn lap(t: &mut Instant, slot: &mut f64) {
    let now = Instant::now();
    *slot += (now - *t).as_secs_f64() * 1e3;
    *t = now;
}

/// Choices of the static pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticOptions {
    /// Run the final RMSNorm, the classifier with its softmax, and every RMSNorm backward
    /// as device kernels (`--ane-extras`); otherwise they run on the CPU.
    pub ane_extras: bool,
    /// Largest vocabulary chunk of one classifier kernel: [`mil::lint::MAX_DIMENSION`]
    /// for the ANE; smaller in tests, to exercise the chunked softmax.
    pub vocab_chunk: usize,
    /// How the kernels bind their surfaces (`--ane-io`).
    pub io: IoConvention,
}

impl Default for StaticOptions {
    fn default() -> StaticOptions {
        StaticOptions { ane_extras: false, vocab_chunk: mil::lint::MAX_DIMENSION, io: IoConvention::Packed }
    }
}

/// Everything that shapes the static kernels, independent of the weights' values.
#[derive(Clone, Debug)]
pub struct StaticShape {
    pub config: Config,
    pub dims: LayerDims,
    pub batch: usize,
    pub seq: usize,
    pub dialect: mil::Dialect,
    pub io: IoConvention,
    pub ane_extras: bool,
    /// Vocabulary rows of each classifier kernel (extras only).
    pub vocab_chunks: Vec<Range<usize>>,
}

impl StaticShape {
    pub fn new(device: &dyn Device, config: &Config, batch: usize, seq: usize, options: StaticOptions) -> StaticShape {
        StaticShape {
            dims: LayerDims::of(config),
            config: config.clone(),
            batch,
            seq,
            dialect: device.dialect(),
            io: options.io,
            ane_extras: options.ane_extras,
            vocab_chunks: sk::vocab_chunks(config.vocab_size, options.vocab_chunk),
        }
    }

    /// The dialect and I/O convention the kernels are generated for.
    pub fn target(&self) -> Target {
        Target::new(self.dialect, self.io)
    }

    /// Tokens per micro-batch.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Kernels of one [`KernelSet`]: compiled after every optimizer step.
    pub fn kernels_per_set(&self) -> usize {
        5 * self.config.n_layers + if self.ane_extras { 1 + self.vocab_chunks.len() } else { 0 }
    }

    /// Weight-free kernels, compiled once per run.
    pub fn weight_free_kernels(&self) -> usize {
        1 + usize::from(self.ane_extras)
    }

    fn attention_weights<'p>(&self, params: &'p Params, l: usize) -> AttentionWeights<'p> {
        let w = params.layer(l);
        AttentionWeights { rms: w.rms_att(), wq: w.wq(), wk: w.wk(), wv: w.wv(), wo: w.wo(), bias: w.qkv_bias() }
    }

    fn ffn_weights<'p>(&self, params: &'p Params, l: usize) -> FfnWeights<'p> {
        let w = params.layer(l);
        FfnWeights { rms: w.rms_ffn(), w1: w.w1(), w2: w.w2(), w3: w.w3() }
    }

    /// Every weight-bearing kernel's program for `params`, in [`KernelSet`] order: per
    /// layer attention forward, FFN forward, FFN backward, Woᵀ, QKV backward; then, with
    /// the extras, the final RMSNorm and the classifier chunks.
    pub fn weight_kernels(&self, params: &Params) -> mil::Result<Vec<KernelDef>> {
        let (d, t, eps, dialect) = (&self.dims, self.tokens(), self.config.norm_eps, self.target());
        let mut defs = Vec::with_capacity(self.kernels_per_set());
        for l in 0..self.config.n_layers {
            let aw = self.attention_weights(params, l);
            let fw = self.ffn_weights(params, l);
            defs.push(sk::attention_forward(d, self.batch, self.seq, eps, &aw, dialect)?);
            defs.push(sk::ffn_forward(d, t, eps, &fw, dialect)?);
            defs.push(sk::ffn_backward(d, t, &fw, dialect)?);
            defs.push(sk::attention_backward_wo(d, t, aw.wo, dialect)?);
            defs.push(sk::qkv_backward(d, t, &aw, dialect)?);
        }
        if self.ane_extras {
            defs.push(sk::rmsnorm(d.dim, t, eps, params.rms_final(), dialect)?);
            let with_lse = self.vocab_chunks.len() > 1;
            let wcls = params.classifier();
            for r in &self.vocab_chunks {
                let rows = &wcls[r.start * d.dim..r.end * d.dim];
                defs.push(sk::classifier_softmax(d.dim, t, r.len(), rows, with_lse, dialect)?);
            }
        }
        Ok(defs)
    }

    /// The weight-free kernels' programs: attention backward, and with the extras the
    /// RMSNorm backward.
    pub fn weight_free_kernel_defs(&self) -> mil::Result<Vec<KernelDef>> {
        let mut defs = vec![sk::attention_backward_free(&self.dims, self.batch, self.seq, self.target())?];
        if self.ane_extras {
            defs.push(sk::rmsnorm_backward(self.dims.dim, self.tokens(), self.config.norm_eps, self.target())?);
        }
        Ok(defs)
    }
}

/// One layer's weight-bearing kernels.
struct LayerKernels {
    attn_fwd: Box<dyn Kernel>,
    ffn_fwd: Box<dyn Kernel>,
    ffn_bwd: Box<dyn Kernel>,
    attn_bwd_wo: Box<dyn Kernel>,
    qkv_bwd: Box<dyn Kernel>,
}

/// The surface layouts of a set's kernels (the same for every layer and every version).
#[derive(Clone, Debug)]
struct SetLayouts {
    attn_fwd: KernelIo,
    ffn_fwd: KernelIo,
    ffn_bwd: KernelIo,
    attn_bwd_wo: KernelIo,
    qkv_bwd: KernelIo,
    final_norm: Option<KernelIo>,
    classifier: Vec<KernelIo>,
}

/// One version of the weight-bearing kernels: what a recompile produces.
pub struct KernelSet {
    layers: Vec<LayerKernels>,
    final_norm: Option<Box<dyn Kernel>>,
    classifier: Vec<Box<dyn Kernel>>,
    layouts: SetLayouts,
    /// Seconds spent generating and compiling the set.
    pub compile_seconds: f64,
}

impl KernelSet {
    /// Generates the programs for `params` and compiles them. Safe to call from another
    /// thread while a previous set trains (the device is `Sync`).
    pub fn compile(device: &dyn Device, shape: &StaticShape, params: &Params) -> device::Result<KernelSet> {
        let start = Instant::now();
        let defs = shape.weight_kernels(params)?;
        let mut layouts = SetLayouts {
            attn_fwd: defs[0].io.clone(),
            ffn_fwd: defs[1].io.clone(),
            ffn_bwd: defs[2].io.clone(),
            attn_bwd_wo: defs[3].io.clone(),
            qkv_bwd: defs[4].io.clone(),
            final_norm: None,
            classifier: Vec::new(),
        };
        let mut kernels = Vec::with_capacity(defs.len());
        let n_layer_kernels = 5 * shape.config.n_layers;
        for (i, def) in defs.into_iter().enumerate() {
            if i == n_layer_kernels {
                layouts.final_norm = Some(def.io.clone());
            } else if i > n_layer_kernels {
                layouts.classifier.push(def.io.clone());
            }
            kernels.push(device.compile(&def.program, &def.weights)?);
        }
        let mut it = kernels.into_iter();
        let mut layers = Vec::with_capacity(shape.config.n_layers);
        for _ in 0..shape.config.n_layers {
            let mut next = || it.next().expect("five kernels per layer");
            layers.push(LayerKernels {
                attn_fwd: next(),
                ffn_fwd: next(),
                ffn_bwd: next(),
                attn_bwd_wo: next(),
                qkv_bwd: next(),
            });
        }
        let final_norm = if shape.ane_extras { it.next() } else { None };
        let classifier = it.collect();
        Ok(KernelSet { layers, final_norm, classifier, layouts, compile_seconds: start.elapsed().as_secs_f64() })
    }

    /// Number of kernels in the set.
    pub fn len(&self) -> usize {
        5 * self.layers.len() + usize::from(self.final_norm.is_some()) + self.classifier.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The surfaces of one kernel signature, shared by every layer's kernel of that kind
/// (also the LoRA pipeline's).
pub(crate) struct Slot {
    pub(crate) io: KernelIo,
    pub(crate) inputs: Vec<Surface>,
    pub(crate) outputs: Vec<Surface>,
}

impl Slot {
    pub(crate) fn new(io: &KernelIo, kernel: &dyn Kernel) -> Slot {
        Slot {
            io: io.clone(),
            inputs: kernel.inputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect(),
            outputs: kernel.outputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect(),
        }
    }

    /// Whether one of the input surfaces has block `block`.
    pub(crate) fn has(&self, block: &str) -> bool {
        self.io.inputs.iter().any(|s| s.find(block).is_some())
    }

    /// Writes a `[rows, width]` row-major matrix into block `block`.
    pub(crate) fn write(&mut self, block: &str, data: &[f32]) {
        self.io.write(&mut self.inputs, block, data);
    }

    pub(crate) fn eval(&mut self, kernel: &mut dyn Kernel) -> device::Result<()> {
        let ins: Vec<&Surface> = self.inputs.iter().collect();
        let mut outs: Vec<&mut Surface> = self.outputs.iter_mut().collect();
        kernel.eval(&ins, &mut outs)
    }

    /// Output `output` into `dst`, which has its exact size.
    pub(crate) fn read(&self, output: &str, dst: &mut [f32]) {
        self.io.read_into(&self.outputs, output, dst);
    }

    /// Output `output` into a whole buffer, without a copy where the output has a
    /// surface of its own ([`KernelIo::take`]).
    pub(crate) fn take(&mut self, output: &str, dst: &mut Vec<f32>) {
        self.io.take(&mut self.outputs, output, dst);
    }
}

/// Surfaces for every kernel kind.
struct Slots {
    attn_fwd: Slot,
    ffn_fwd: Slot,
    ffn_bwd: Slot,
    attn_bwd_wo: Slot,
    attn_bwd_free: Slot,
    qkv_bwd: Slot,
    final_norm: Option<Slot>,
    classifier: Vec<Slot>,
    rms_bwd: Option<Slot>,
}

/// Gradient scratch buffers (one set, reused per layer).
struct Scratch {
    dx: Vec<f32>,
    dxn: Vec<f32>,
    d_o: Vec<f32>,
    dh1: Vec<f32>,
    dh3: Vec<f32>,
    gate: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    row: Vec<f32>,
    y: Vec<f32>,
    /// Extras: one RMSNorm-backward kernel's results, `[D, T]` and `[D]`.
    norm_dx: Vec<f32>,
    dgain: Vec<f32>,
    x_final: Vec<f32>,
    xn_final: Vec<f32>,
    r_final: Vec<f32>,
    /// Extras: the softmax over the vocabulary `[V, T]`, turned into `dlogits` in place.
    probs: Vec<f32>,
    /// Extras with several vocabulary chunks: each chunk's log-sum-exp `[chunks, T]`.
    lse: Vec<f32>,
}

/// Probabilities below this are taken as this when the loss takes their logarithm: an
/// fp16 device can round a tiny probability to 0, and `-ln 0` would stop training on a
/// loss that is merely large (−ln 1e-30 ≈ 69, far above any real loss here).
const MIN_PROB: f32 = 1e-30;

/// The static pipeline for one model shape and batch shape.
pub struct StaticPipeline {
    shape: StaticShape,
    set: KernelSet,
    attn_bwd_free: Box<dyn Kernel>,
    rms_bwd: Option<Box<dyn Kernel>>,
    slots: Slots,
    acts: Vec<LayerActs>,
    scratch: Scratch,
    classifier: ClassifierLoss,
    /// Which parameter version (the trainer's step count) the set in service bakes.
    version: Option<u64>,
    /// Time per phase since the last `times.take()`.
    pub times: PhaseTimes,
    /// Seconds of the initial compile (weight-free kernels and the first set).
    pub compile_seconds: f64,
}

impl StaticPipeline {
    /// Compiles the weight-free kernels and a first set for `params` (taken as version
    /// `version`).
    pub fn new(
        device: &dyn Device,
        params: &Params,
        version: u64,
        batch: usize,
        seq: usize,
        options: StaticOptions,
    ) -> device::Result<StaticPipeline> {
        let shape = StaticShape::new(device, params.config(), batch, seq, options);
        let set = KernelSet::compile(device, &shape, params)?;
        StaticPipeline::with_set(device, shape, set, version)
    }

    /// Builds the pipeline around an already compiled first set.
    pub fn with_set(
        device: &dyn Device,
        shape: StaticShape,
        set: KernelSet,
        version: u64,
    ) -> device::Result<StaticPipeline> {
        let start = Instant::now();
        let free = shape.weight_free_kernel_defs()?;
        let attn_bwd_free = device.compile(&free[0].program, &free[0].weights)?;
        let rms_bwd = match free.get(1) {
            Some(def) => Some(device.compile(&def.program, &def.weights)?),
            None => None,
        };
        let l0 = &set.layers[0];
        let lay = &set.layouts;
        let mut slots = Slots {
            attn_fwd: Slot::new(&lay.attn_fwd, l0.attn_fwd.as_ref()),
            ffn_fwd: Slot::new(&lay.ffn_fwd, l0.ffn_fwd.as_ref()),
            ffn_bwd: Slot::new(&lay.ffn_bwd, l0.ffn_bwd.as_ref()),
            attn_bwd_wo: Slot::new(&lay.attn_bwd_wo, l0.attn_bwd_wo.as_ref()),
            attn_bwd_free: Slot::new(&free[0].io, attn_bwd_free.as_ref()),
            qkv_bwd: Slot::new(&lay.qkv_bwd, l0.qkv_bwd.as_ref()),
            final_norm: match (&set.final_norm, &lay.final_norm) {
                (Some(k), Some(l)) => Some(Slot::new(l, k.as_ref())),
                _ => None,
            },
            classifier: set.classifier.iter().zip(&lay.classifier).map(|(k, l)| Slot::new(l, k.as_ref())).collect(),
            rms_bwd: rms_bwd.as_ref().map(|k| Slot::new(&free[1].io, k.as_ref())),
        };
        // The RoPE tables never change: written once into the surfaces that carry them.
        let (cos, sin) = rope_tables(
            shape.dims.head_dim(),
            shape.batch,
            shape.seq,
            shape.config.rope_theta,
            shape.config.rope_scaling,
        );
        for slot in [&mut slots.attn_fwd, &mut slots.attn_bwd_free] {
            slot.write("cos", &cos);
            slot.write("sin", &sin);
        }
        let (d, t) = (shape.dims, shape.tokens());
        let (dim, kv, hid, vocab) = (d.dim, d.kv_dim(), d.hidden, shape.config.vocab_size);
        let extras = shape.ane_extras;
        let compile_seconds = set.compile_seconds + start.elapsed().as_secs_f64();
        Ok(StaticPipeline {
            acts: (0..shape.config.n_layers).map(|_| LayerActs::new(&d, t)).collect(),
            scratch: Scratch {
                dx: vec![0.0; dim * t],
                dxn: vec![0.0; dim * t],
                d_o: vec![0.0; dim * t],
                dh1: vec![0.0; hid * t],
                dh3: vec![0.0; hid * t],
                gate: vec![0.0; hid * t],
                dq: vec![0.0; dim * t],
                dk: vec![0.0; kv * t],
                dv: vec![0.0; kv * t],
                row: vec![0.0; t],
                y: vec![0.0; dim * t],
                norm_dx: if extras { vec![0.0; dim * t] } else { Vec::new() },
                dgain: vec![0.0; dim],
                x_final: vec![0.0; dim * t],
                xn_final: vec![0.0; dim * t],
                r_final: vec![0.0; t],
                probs: if extras { vec![0.0; vocab * t] } else { Vec::new() },
                lse: if extras { vec![0.0; shape.vocab_chunks.len() * t] } else { Vec::new() },
            },
            classifier: ClassifierLoss::new(vocab, dim, cpu_ops::DEFAULT_CLASSIFIER_CHUNK.min(t)),
            shape,
            set,
            attn_bwd_free,
            rms_bwd,
            slots,
            version: Some(version),
            times: PhaseTimes::default(),
            compile_seconds,
        })
    }

    pub fn shape(&self) -> &StaticShape {
        &self.shape
    }

    /// Kernels compiled by each recompile.
    pub fn kernels_per_compile(&self) -> usize {
        self.shape.kernels_per_set()
    }

    /// Kernels compiled at construction: the first set and the weight-free kernels.
    pub fn initial_kernels(&self) -> usize {
        self.shape.kernels_per_set() + self.shape.weight_free_kernels()
    }

    /// The parameter version the kernels in service bake.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Puts a new set in service; the old one is dropped.
    pub fn install(&mut self, set: KernelSet, version: u64) {
        self.set = set;
        self.version = Some(version);
    }

    /// Recompiles the set for `params` unless the set in service already bakes
    /// `version`. Returns the seconds spent (0 when nothing was compiled).
    pub fn ensure(&mut self, device: &dyn Device, params: &Params, version: u64) -> device::Result<f64> {
        if self.version == Some(version) {
            return Ok(0.0);
        }
        // Marked stale first: if the compile fails (a spent budget), the set in service
        // matches no version any more and the next call compiles again.
        self.version = None;
        let set = KernelSet::compile(device, &self.shape, params)?;
        let secs = set.compile_seconds;
        self.install(set, version);
        Ok(secs)
    }

    /// Tokens per micro-batch.
    pub fn tokens(&self) -> usize {
        self.shape.tokens()
    }

    /// Mean cross-entropy of `params` on `inputs → targets` (`[B·S]` each), without
    /// gradients. `params` must be the weights the kernels in service were compiled from.
    pub fn loss(&mut self, params: &Params, inputs: &[u32], targets: &[u32]) -> device::Result<f32> {
        self.forward(params, inputs)?;
        let mut t = Instant::now();
        let loss = if self.shape.ane_extras {
            self.device_softmax()?;
            lap(&mut t, &mut self.times.device_forward);
            self.extras_loss(targets, None)
        } else {
            self.classifier.forward(&self.scratch.xn_final, params.classifier(), targets)
        };
        lap(&mut t, &mut self.times.classifier);
        Ok(loss)
    }

    /// Mean cross-entropy and its gradients times `grad_scale`, accumulated into `grads`.
    /// `params` must be the weights the kernels in service were compiled from.
    pub fn forward_backward(
        &mut self,
        params: &Params,
        grads: &mut Params,
        inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32> {
        self.forward(params, inputs)?;
        self.backward(params, grads, inputs, targets, grad_scale)
    }

    fn forward(&mut self, params: &Params, inputs: &[u32]) -> device::Result<()> {
        let t_len = self.tokens();
        assert_eq!(inputs.len(), t_len, "inputs must be [B·S = {t_len}]");
        let dim = self.shape.dims.dim;
        let times = &mut self.times;
        let slots = &mut self.slots;
        let mut t = Instant::now();

        let mut x = std::mem::take(&mut self.scratch.x_final);
        cpu_ops::embedding_forward(&mut x, params.token_embedding(), inputs, dim);
        lap(&mut t, &mut times.other_cpu);
        for (l, kernels) in self.set.layers.iter_mut().enumerate() {
            let a = &mut self.acts[l];
            a.x_in.copy_from_slice(&x);
            // RMSNorm, QKV, RoPE, attention, Wo.
            let s = &mut slots.attn_fwd;
            s.write("x", &a.x_in);
            lap(&mut t, &mut times.surface_io);
            s.eval(kernels.attn_fwd.as_mut())?;
            lap(&mut t, &mut times.device_forward);
            s.take("xn", &mut a.xn1);
            s.take("r", &mut a.inv_rms1);
            s.take("q", &mut a.q);
            s.take("k", &mut a.k);
            s.take("v", &mut a.v);
            s.take("o", &mut a.o);
            s.take("y", &mut self.scratch.y);
            lap(&mut t, &mut times.surface_io);
            for ((xm, xi), y) in a.x_mid.iter_mut().zip(&a.x_in).zip(&self.scratch.y) {
                *xm = xi + y;
            }
            lap(&mut t, &mut times.other_cpu);
            // RMSNorm and SwiGLU FFN.
            let s = &mut slots.ffn_fwd;
            s.write("x", &a.x_mid);
            lap(&mut t, &mut times.surface_io);
            s.eval(kernels.ffn_fwd.as_mut())?;
            lap(&mut t, &mut times.device_forward);
            s.take("xn", &mut a.xn2);
            s.take("r", &mut a.inv_rms2);
            s.take("h1", &mut a.h1);
            s.take("h3", &mut a.h3);
            s.take("y", &mut self.scratch.y);
            lap(&mut t, &mut times.surface_io);
            for ((xo, xm), y) in x.iter_mut().zip(&a.x_mid).zip(&self.scratch.y) {
                *xo = xm + y;
            }
            lap(&mut t, &mut times.other_cpu);
        }
        let sc = &mut self.scratch;
        match (&mut slots.final_norm, &mut self.set.final_norm) {
            (Some(s), Some(k)) => {
                s.write("x", &x);
                lap(&mut t, &mut times.surface_io);
                s.eval(k.as_mut())?;
                lap(&mut t, &mut times.device_forward);
                s.take("xn", &mut sc.xn_final);
                s.take("r", &mut sc.r_final);
                lap(&mut t, &mut times.surface_io);
            }
            _ => {
                let eps = self.shape.config.norm_eps;
                cpu_ops::rmsnorm_forward(&mut sc.xn_final, &mut sc.r_final, &x, params.rms_final(), eps);
                lap(&mut t, &mut times.rmsnorm);
            }
        }
        sc.x_final = x;
        Ok(())
    }

    /// Extras: the classifier kernels, each chunk's softmax into `scratch.probs` `[V, T]`
    /// (and its log-sum-exp into `scratch.lse`).
    fn device_softmax(&mut self) -> device::Result<()> {
        let t_len = self.tokens();
        let several = self.shape.vocab_chunks.len() > 1;
        for (c, (range, (slot, kernel))) in self
            .shape
            .vocab_chunks
            .iter()
            .zip(self.slots.classifier.iter_mut().zip(&mut self.set.classifier))
            .enumerate()
        {
            slot.write("x", &self.scratch.xn_final);
            slot.eval(kernel.as_mut())?;
            slot.read("p", &mut self.scratch.probs[range.start * t_len..range.end * t_len]);
            if several {
                slot.read("lse", &mut self.scratch.lse[c * t_len..(c + 1) * t_len]);
            }
        }
        Ok(())
    }

    /// Extras: from the device's chunk softmaxes, the mean cross-entropy over the
    /// targets that are not [`IGNORE_TARGET`]; with `dlogits_scale`, also turns
    /// `scratch.probs` into `scale · (softmax − onehot)`, and 0 at ignored targets.
    fn extras_loss(&mut self, targets: &[u32], dlogits_scale: Option<f32>) -> f32 {
        let t_len = self.tokens();
        let chunks = &self.shape.vocab_chunks;
        let probs = &mut self.scratch.probs;
        if chunks.len() > 1 {
            // Chunk c holds softmax_c = exp(z − lse_c); over the whole vocabulary the
            // softmax is softmax_c · exp(lse_c − lse) with lse = log Σ_c exp(lse_c).
            let lse = &self.scratch.lse;
            for t in 0..t_len {
                let col = |c: usize| f64::from(lse[c * t_len + t]);
                let max = (0..chunks.len()).map(col).fold(f64::NEG_INFINITY, f64::max);
                let total = max + (0..chunks.len()).map(|c| (col(c) - max).exp()).sum::<f64>().ln();
                for (c, range) in chunks.iter().enumerate() {
                    let factor = (col(c) - total).exp() as f32;
                    for v in range.clone() {
                        probs[v * t_len + t] *= factor;
                    }
                }
            }
        }
        let mut loss = 0.0f64;
        for (t, &target) in targets.iter().enumerate().filter(|(_, &target)| target != IGNORE_TARGET) {
            let p = probs[target as usize * t_len + t].max(MIN_PROB);
            loss -= f64::from(p).ln();
        }
        if let Some(scale) = dlogits_scale {
            probs.iter_mut().for_each(|p| *p *= scale);
            for (t, &target) in targets.iter().enumerate() {
                if target == IGNORE_TARGET {
                    // probs: [V, T]; a masked position has no gradient.
                    (0..probs.len() / t_len).for_each(|v| probs[v * t_len + t] = 0.0);
                } else {
                    probs[target as usize * t_len + t] -= scale;
                }
            }
        }
        (loss / crate::data::loss_tokens(targets).max(1) as f64) as f32
    }

    /// The backward of an RMSNorm: `dx += ∂/∂x`, `dgain += ∂/∂gain`, on the device with
    /// the extras, else on the CPU. `dy` is the gradient at the norm's output, `x` its
    /// input, `r` its inverse RMS `[T]`.
    #[allow(clippy::too_many_arguments)] // the gradients, the inputs, the saved statistic, the buffers
    fn norm_backward(
        rms_bwd: &mut Option<(&mut Slot, &mut Box<dyn Kernel>)>,
        times: &mut PhaseTimes,
        dx: &mut [f32],
        dgain: &mut [f32],
        dy: &[f32],
        x: &[f32],
        gain: &[f32],
        r: &[f32],
        row: &mut [f32],
        tmp_dx: &mut [f32],
        tmp_dgain: &mut [f32],
    ) -> device::Result<()> {
        let mut t = Instant::now();
        match rms_bwd {
            Some((slot, kernel)) => {
                slot.write("dy", dy);
                slot.write("x", x);
                slot.write("gain", gain);
                lap(&mut t, &mut times.surface_io);
                slot.eval(kernel.as_mut())?;
                lap(&mut t, &mut times.device_backward);
                slot.read("dx", tmp_dx);
                slot.read("dgain", tmp_dgain);
                lap(&mut t, &mut times.surface_io);
                dx.iter_mut().zip(tmp_dx.iter()).for_each(|(a, b)| *a += b);
                dgain.iter_mut().zip(tmp_dgain.iter()).for_each(|(a, b)| *a += b);
                lap(&mut t, &mut times.rmsnorm);
            }
            None => {
                cpu_ops::rmsnorm_backward(dx, dgain, dy, x, gain, r, row);
                lap(&mut t, &mut times.rmsnorm);
            }
        }
        Ok(())
    }

    fn backward(
        &mut self,
        params: &Params,
        grads: &mut Params,
        inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32> {
        let t_len = self.tokens();
        assert_eq!(targets.len(), t_len, "targets must be [B·S = {t_len}]");
        let (dim, kv, hid) = (self.shape.dims.dim, self.shape.dims.kv_dim(), self.shape.dims.hidden);
        let vocab = self.shape.config.vocab_size;
        let mut t = Instant::now();

        // Classifier and loss: dxn_final into s.dxn, dWcls into its gradient.
        self.scratch.dxn.fill(0.0);
        let loss = if self.shape.ane_extras {
            self.device_softmax()?;
            lap(&mut t, &mut self.times.device_forward);
            let n_loss = crate::data::loss_tokens(targets);
            let loss = self.extras_loss(targets, Some(grad_scale / n_loss.max(1) as f32));
            let s = &mut self.scratch;
            let dlogits = MatRef::new(&s.probs, vocab, t_len);
            // dx [D, T] += Wclsᵀ [D, V] · dlogits [V, T]
            matmul_acc(MatMut::new(&mut s.dxn, dim, t_len), MatRef::new(params.classifier(), vocab, dim).t(), dlogits);
            // dWcls [V, D] += dlogits [V, T] · xnᵀ [T, D]
            let dwcls = classifier_grad(grads);
            matmul_acc(MatMut::new(dwcls, vocab, dim), dlogits, MatRef::new(&s.xn_final, dim, t_len).t());
            loss
        } else {
            let s = &mut self.scratch;
            let dwcls = classifier_grad(grads);
            self.classifier.forward_backward(&s.xn_final, params.classifier(), targets, grad_scale, &mut s.dxn, dwcls)
        };
        lap(&mut t, &mut self.times.classifier);

        let s = &mut self.scratch;
        let times = &mut self.times;
        let slots = &mut self.slots;
        let mut rms_bwd = match (&mut slots.rms_bwd, &mut self.rms_bwd) {
            (Some(slot), Some(k)) => Some((slot, k)),
            _ => None,
        };
        s.dx.fill(0.0);
        Self::norm_backward(
            &mut rms_bwd,
            times,
            &mut s.dx,
            grads.rms_final_mut(),
            &s.dxn,
            &s.x_final,
            params.rms_final(),
            &s.r_final,
            &mut s.row,
            &mut s.norm_dx,
            &mut s.dgain,
        )?;
        t = Instant::now();

        for l in (0..self.shape.config.n_layers).rev() {
            let w = params.layer(l);
            let a = &self.acts[l];
            let kernels = &mut self.set.layers[l];
            let mut g = grads.layer_mut(l);

            // FFN backward: s.dx is the gradient at the layer's output.
            let k = &mut slots.ffn_bwd;
            k.write("dy", &s.dx);
            k.write("h1", &a.h1);
            k.write("h3", &a.h3);
            lap(&mut t, &mut times.surface_io);
            k.eval(kernels.ffn_bwd.as_mut())?;
            lap(&mut t, &mut times.device_backward);
            k.take("dx", &mut s.dxn);
            k.take("dh1", &mut s.dh1);
            k.take("dh3", &mut s.dh3);
            k.take("gate", &mut s.gate);
            lap(&mut t, &mut times.surface_io);
            // dW2 [D, H] += dy [D, T] · gateᵀ ; dW1, dW3 [H, D] += dh [H, T] · xn2ᵀ
            matmul_acc(
                MatMut::new(g.w2_mut(), dim, hid),
                MatRef::new(&s.dx, dim, t_len),
                MatRef::new(&s.gate, hid, t_len).t(),
            );
            let xn2 = MatRef::new(&a.xn2, dim, t_len).t();
            matmul_acc(MatMut::new(g.w1_mut(), hid, dim), MatRef::new(&s.dh1, hid, t_len), xn2);
            matmul_acc(MatMut::new(g.w3_mut(), hid, dim), MatRef::new(&s.dh3, hid, t_len), xn2);
            lap(&mut t, &mut times.dw);
            Self::norm_backward(
                &mut rms_bwd,
                times,
                &mut s.dx,
                g.rms_ffn_mut(),
                &s.dxn,
                &a.x_mid,
                w.rms_ffn(),
                &a.inv_rms2,
                &mut s.row,
                &mut s.norm_dx,
                &mut s.dgain,
            )?;
            t = Instant::now();

            // Attention backward, weight-bearing part: do = Woᵀ · dy.
            let k = &mut slots.attn_bwd_wo;
            k.write("dy", &s.dx);
            lap(&mut t, &mut times.surface_io);
            k.eval(kernels.attn_bwd_wo.as_mut())?;
            lap(&mut t, &mut times.device_backward);
            k.take("do", &mut s.d_o);
            lap(&mut t, &mut times.surface_io);
            // dWo [D, D] += dy [D, T] · oᵀ
            matmul_acc(
                MatMut::new(g.wo_mut(), dim, dim),
                MatRef::new(&s.dx, dim, t_len),
                MatRef::new(&a.o, dim, t_len).t(),
            );
            lap(&mut t, &mut times.dw);

            // Weight-free part: softmax backward, dQ, dK, dV, and RoPE's backward.
            let k = &mut slots.attn_bwd_free;
            k.write("do", &s.d_o);
            k.write("q", &a.q);
            k.write("o", &a.o);
            k.write("k", &a.k);
            k.write("v", &a.v);
            lap(&mut t, &mut times.surface_io);
            k.eval(self.attn_bwd_free.as_mut())?;
            lap(&mut t, &mut times.device_backward);
            k.take("dq", &mut s.dq);
            k.take("dk", &mut s.dk);
            k.take("dv", &mut s.dv);
            lap(&mut t, &mut times.surface_io);
            bias_grads(&mut g, &s.dq, &s.dk, &s.dv, t_len);
            lap(&mut t, &mut times.other_cpu);

            // QKV backward.
            let k = &mut slots.qkv_bwd;
            k.write("dq", &s.dq);
            k.write("dk", &s.dk);
            k.write("dv", &s.dv);
            lap(&mut t, &mut times.surface_io);
            k.eval(kernels.qkv_bwd.as_mut())?;
            lap(&mut t, &mut times.device_backward);
            k.take("dx", &mut s.dxn);
            lap(&mut t, &mut times.surface_io);
            // dWq [D, D] += dq · xn1ᵀ ; dWk, dWv [KV, D] += dk/dv · xn1ᵀ
            let xn1 = MatRef::new(&a.xn1, dim, t_len).t();
            matmul_acc(MatMut::new(g.wq_mut(), dim, dim), MatRef::new(&s.dq, dim, t_len), xn1);
            matmul_acc(MatMut::new(g.wk_mut(), kv, dim), MatRef::new(&s.dk, kv, t_len), xn1);
            matmul_acc(MatMut::new(g.wv_mut(), kv, dim), MatRef::new(&s.dv, kv, t_len), xn1);
            lap(&mut t, &mut times.dw);
            Self::norm_backward(
                &mut rms_bwd,
                times,
                &mut s.dx,
                g.rms_att_mut(),
                &s.dxn,
                &a.x_in,
                w.rms_att(),
                &a.inv_rms1,
                &mut s.row,
                &mut s.norm_dx,
                &mut s.dgain,
            )?;
            t = Instant::now();
        }
        cpu_ops::embedding_backward(grads.token_embedding_mut(), &s.dx, inputs, dim);
        lap(&mut t, &mut times.other_cpu);
        Ok(loss)
    }
}

/// The gradient slot of the classifier: its own matrix, or the shared embedding.
fn classifier_grad(grads: &mut Params) -> &mut [f32] {
    if grads.wcls().is_some() {
        grads.wcls_mut().expect("checked just above")
    } else {
        grads.token_embedding_mut()
    }
}

/// Bias gradients (when the model has QKV biases): the sum of each row's gradient.
fn bias_grads(g: &mut llama::LayerMut<'_>, dq: &[f32], dk: &[f32], dv: &[f32], t_len: usize) {
    for (which, d) in [dq, dk, dv].into_iter().enumerate() {
        if let Some(db) = g.qkv_bias_mut(which) {
            for (b, row) in db.iter_mut().zip(d.chunks(t_len)) {
                *b += row.iter().sum::<f32>();
            }
        }
    }
}

/// RoPE's cosines and sines as `[head_dim/2, B·S]` (column `t` at position `t % seq`),
/// computed exactly as `cpu_ops::RopeTable` does (f64 angles, rounded once to f32), so
/// the kernels rotate by the same numbers as the dynamic pipeline's CPU RoPE.
pub fn rope_tables(
    head_dim: usize,
    batch: usize,
    seq: usize,
    theta: f32,
    scaling: Option<llama::RopeScaling>,
) -> (Vec<f32>, Vec<f32>) {
    let pairs = head_dim / 2;
    let mut cos = Vec::with_capacity(pairs * batch * seq);
    let mut sin = Vec::with_capacity(pairs * batch * seq);
    for i in 0..pairs {
        let freq = 1.0 / f64::from(theta).powf((2 * i) as f64 / head_dim as f64);
        let freq = scaling.map_or(freq, |s| s.apply(freq));
        for _ in 0..batch {
            for pos in 0..seq {
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    (cos, sin)
}

//! Every kernel every pipeline emits, as the ANE would get it: one input surface, one
//! output surface, rank 4 throughout, no padding beyond the spatial multiple, and no
//! lint error — at a tiny shape, Stories110M and a Qwen-like shape with grouped-query
//! attention. Also: the packed surfaces' layouts as the host reads them.

use device::{cpu::CpuDevice, Device, Precision, Surface};
use mil::lint::{self, Severity};
use mil::Dialect;
use train::kernels::{self, IoConvention, KernelDef, LayerDims, Target};
use train::lora::LoraTarget;
use train::lora_kernels as lk;
use train::model::HEAD_PART_ROWS;
use train::static_kernels as sk;

/// The rules the packed convention exists to satisfy, and the surface rules that only
/// apply to several surfaces.
const IO_RULES: [&str; 6] =
    ["several-inputs", "several-outputs", "rank", "padding", "small-surface", "unequal-surface-sizes"];

struct Shape {
    name: &'static str,
    d: LayerDims,
    batch: usize,
    seq: usize,
    vocab: usize,
}

fn shapes() -> Vec<Shape> {
    vec![
        Shape { name: "tiny", d: LayerDims::new(64, 172, 8, 4), batch: 2, seq: 32, vocab: 256 },
        Shape { name: "stories110m", d: LayerDims::new(768, 2048, 12, 12), batch: 1, seq: 256, vocab: 32_000 },
        Shape { name: "qwen-like", d: LayerDims::new(1024, 3072, 16, 8), batch: 1, seq: 256, vocab: 151_936 },
        // Qwen3-0.6B: 16/8 heads of 128, so the queries are 2048 wide against dim 1024
        // (the dynamic pipeline and the decoder; the static pipeline refuses it).
        Shape {
            name: "qwen3-0.6b",
            d: LayerDims { head_dim: 128, ..LayerDims::new(1024, 3072, 16, 8) },
            batch: 1,
            seq: 256,
            vocab: 151_936,
        },
    ]
}

/// Dynamic (and double-buffer's training step uses static's), static with extras, and
/// decode kernels at one shape.
fn every_kernel(s: &Shape, dialect: Dialect) -> Vec<KernelDef> {
    let (d, batch, seq) = (&s.d, s.batch, s.seq);
    let t = batch * seq;
    let (dim, kv, hid) = (d.dim, d.kv_dim(), d.hidden);
    let mut v = vec![
        kernels::qkv_forward(d, t, dialect).unwrap(),
        kernels::attention_forward(d, batch, seq, dialect).unwrap(),
        kernels::ffn_forward(d, t, dialect).unwrap(),
        kernels::ffn_backward(d, t, dialect).unwrap(),
        kernels::attention_backward(d, batch, seq, dialect).unwrap(),
        kernels::qkv_backward(d, t, dialect).unwrap(),
    ];
    // Decode: the ANE pads the tokens per call to 16 (`model::token_padding`).
    for t in [16, 32] {
        v.push(kernels::qkv_forward(d, t, dialect).unwrap());
        v.push(kernels::attention_decode(d, t, seq, dialect).unwrap());
        v.push(kernels::ffn_forward(d, t, dialect).unwrap());
    }
    for (lo, hi) in kernels::classifier_parts(s.vocab, HEAD_PART_ROWS) {
        v.push(kernels::classifier_part(dim, hi - lo, 16, dialect).unwrap());
    }
    if d.q_dim() != dim {
        return v;
    }
    // Static (also what the double-buffered pipeline compiles) and the extras.
    let w = |n: usize| vec![0.01f32; n];
    let (rms, wq, wk, wv, wo) = (w(dim), w(dim * dim), w(kv * dim), w(kv * dim), w(dim * dim));
    let (bq, bk, bv) = (w(dim), w(kv), w(kv));
    let (w1, w2, w3) = (w(hid * dim), w(dim * hid), w(hid * dim));
    let aw = sk::AttentionWeights { rms: &rms, wq: &wq, wk: &wk, wv: &wv, wo: &wo, bias: Some((&bq, &bk, &bv)) };
    let fw = sk::FfnWeights { rms: &rms, w1: &w1, w2: &w2, w3: &w3 };
    v.extend([
        sk::attention_forward(d, batch, seq, 1e-5, &aw, dialect).unwrap(),
        sk::ffn_forward(d, t, 1e-5, &fw, dialect).unwrap(),
        sk::ffn_backward(d, t, &fw, dialect).unwrap(),
        sk::attention_backward_wo(d, t, &wo, dialect).unwrap(),
        sk::attention_backward_free(d, batch, seq, dialect).unwrap(),
        sk::qkv_backward(d, t, &aw, dialect).unwrap(),
        sk::rmsnorm(dim, t, 1e-5, &rms, dialect).unwrap(),
        sk::rmsnorm_backward(dim, t, 1e-5, dialect).unwrap(),
    ]);
    let chunks = sk::vocab_chunks(s.vocab, lint::MAX_DIMENSION);
    let rows = chunks[0].len();
    v.push(sk::classifier_softmax(dim, t, rows, &w(rows * dim), chunks.len() > 1, dialect).unwrap());
    // LoRA: the baked kernels with adapters in the surface, and the weight-free gradient
    // kernels (all targets at rank 8 with dropout masks; PEFT's default q,v at rank 16).
    for (targets, rank, dropout) in
        [(LoraTarget::ALL.to_vec(), 8, true), (vec![LoraTarget::Q, LoraTarget::V], 16, false)]
    {
        let ad = lk::Adapters::new(&targets, rank).with_dropout(dropout);
        v.extend([
            lk::attention_forward(d, batch, seq, 1e-5, &aw, &ad, dialect).unwrap(),
            lk::ffn_forward(d, t, 1e-5, &fw, &ad, dialect).unwrap(),
            lk::ffn_backward(d, t, &fw, &ad, dialect).unwrap(),
            lk::attention_backward_wo(d, t, &wo, &ad, dialect).unwrap(),
            lk::qkv_backward(d, t, &aw, &ad, dialect).unwrap(),
        ]);
        let (attn, ffn): (Vec<LoraTarget>, Vec<LoraTarget>) = targets.iter().partition(|t| t.is_attention());
        for group in [attn, ffn].into_iter().filter(|g| !g.is_empty()) {
            v.push(lk::adapter_grads(d, t, &lk::Adapters { targets: &group, ..ad }, dialect).unwrap());
        }
    }
    v
}

#[test]
fn every_kernel_of_every_pipeline_is_single_surface_rank_4_and_lints_clean_for_the_ane() {
    for s in shapes() {
        for dialect in [Dialect::Ios18, Dialect::Ios16] {
            for k in every_kernel(&s, dialect) {
                let main = k.program.main().unwrap();
                assert_eq!((main.inputs.len(), main.outputs.len()), (1, 1), "{} at {}", k.name, s.name);
                let bad: Vec<String> = lint::lint(&k.program)
                    .iter()
                    .filter(|f| f.severity == Severity::Error || IO_RULES.contains(&f.rule))
                    .map(|f| f.to_string())
                    .collect();
                assert!(bad.is_empty(), "{} at {} ({dialect}): {bad:#?}", k.name, s.name);
                if s.name == "tiny" {
                    mil::validate(&k.program).unwrap_or_else(|e| panic!("{}: {e}", k.name));
                    let text = mil::text::print(&k.program);
                    assert_eq!(mil::text::parse(&text).unwrap(), k.program, "{} does not parse back", k.name);
                }
            }
        }
    }
}

#[test]
fn the_multi_surface_convention_is_what_the_lint_warns_about() {
    let d = LayerDims::new(64, 172, 8, 4);
    let k = kernels::ffn_backward(&d, 64, Target::new(Dialect::Ios18, IoConvention::Multi)).unwrap();
    let main = k.program.main().unwrap();
    assert_eq!((main.inputs.len(), main.outputs.len()), (2, 4));
    let rules: Vec<&str> = lint::lint(&k.program).iter().map(|f| f.rule).collect();
    assert!(rules.contains(&"several-inputs") && rules.contains(&"several-outputs"), "{rules:?}");
    assert!(!rules.contains(&"rank"), "{rules:?}");
}

/// A kernel generator for one target.
type Generator = dyn Fn(Target) -> KernelDef;

/// The same kernel in both conventions gives the same outputs on the CPU device, read
/// through the layouts (a check of the packed offsets against the multi-surface ones,
/// which have one block or output per surface at offset 0).
#[test]
fn packed_and_multi_conventions_agree_through_their_layouts() {
    let d = LayerDims::new(32, 48, 4, 2);
    let (batch, seq) = (2, 16);
    let t = batch * seq;
    for precision in [Precision::Fp32, Precision::Fp16] {
        let cpu = CpuDevice::new(precision);
        let gens: Vec<(&str, Box<Generator>)> = vec![
            ("qkv_forward", Box::new(move |g| kernels::qkv_forward(&d, t, g).unwrap())),
            ("attention_forward", Box::new(move |g| kernels::attention_forward(&d, batch, seq, g).unwrap())),
            ("ffn_forward", Box::new(move |g| kernels::ffn_forward(&d, t, g).unwrap())),
            ("ffn_backward", Box::new(move |g| kernels::ffn_backward(&d, t, g).unwrap())),
            ("attention_backward", Box::new(move |g| kernels::attention_backward(&d, batch, seq, g).unwrap())),
            ("qkv_backward", Box::new(move |g| kernels::qkv_backward(&d, t, g).unwrap())),
            ("rmsnorm_backward", Box::new(move |g| sk::rmsnorm_backward(32, t, 1e-5, g).unwrap())),
        ];
        for (name, gen) in gens {
            let mut results = Vec::new();
            for io in [IoConvention::Packed, IoConvention::Multi] {
                let def = gen(Target::new(Dialect::Ios18, io));
                let mut kernel = cpu.compile(&def.program, &def.weights).unwrap();
                let mut ins: Vec<Surface> =
                    kernel.inputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect();
                for (i, layout) in def.io.inputs.iter().enumerate() {
                    for b in &layout.blocks {
                        // The same data for a block in either convention: a function of
                        // the block's name and the element's position.
                        let seed = b.name.bytes().fold(7u32, |h, c| h.wrapping_mul(31).wrapping_add(c as u32));
                        let data: Vec<f32> = (0..b.rows * b.width)
                            .map(|j| {
                                (((j as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 2001) as f32 / 2000.0
                                    - 0.5
                            })
                            .collect();
                        ins[i].write_block(0, b.s0, b.rows, b.width, &data);
                    }
                }
                let mut outs: Vec<Surface> =
                    kernel.outputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect();
                kernel.eval(&ins.iter().collect::<Vec<_>>(), &mut outs.iter_mut().collect::<Vec<_>>()).unwrap();
                let mut per_output = Vec::new();
                for o in &def.io.outputs {
                    let mut v = Vec::new();
                    def.io.read(&outs, &o.name, &mut v);
                    per_output.push((o.name.clone(), v));
                }
                results.push(per_output);
            }
            assert_eq!(results[0].len(), results[1].len(), "{name}");
            for ((na, a), (nb, b)) in results[0].iter().zip(&results[1]) {
                assert_eq!(na, nb, "{name}: outputs in the same order");
                assert_eq!(a, b, "{name} ({precision:?}): output `{na}` differs between the conventions");
            }
        }
    }
}

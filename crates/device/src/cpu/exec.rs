//! The compiled kernel: a list of steps over planned storages, run in order.
//!
//! Storages are the input surfaces (fp32 ones are read in place), the output surfaces
//! (fp32 ones are written in place), the constants read at compile time, and
//! temporaries, which all live in one arena laid out at compile time. An eval binds the
//! surfaces' addresses into a table allocated at compile time and runs the steps: in the
//! steady state it allocates nothing (the `gemm` crate's packing buffers aside).

use half::slice::HalfFloatSliceExt;
use mil::Var;

use super::attention::ScoresSoftmax;
use super::elementwise::{binary, for_rows, par_split, unary, Binary, Map, Par, Ptr, Unary};
use super::linalg::{Conv, Matmul};
use super::reduce::{Reduce, Softmax};
use super::view::{span, StorageId};
use crate::{check_binding, Error, ErrorKind, Kernel, Result, Surface};

/// Where a storage lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StorageKind {
    /// fp32 input surface `i`, read in place (never written).
    Input(usize),
    /// fp32 output surface `j`, written in place.
    Output(usize),
    /// Constant `k`, read from the program and its weights at compile time.
    Const(usize),
    /// A temporary of `len` elements in the arena.
    Temp { len: usize },
}

/// `gather` on a packed `[outer, dim, inner]` source with packed indices.
#[derive(Clone, Debug)]
pub(crate) struct Gather {
    pub op: String,
    pub axis: usize,
    pub x: (StorageId, usize),
    pub outer: usize,
    pub dim: usize,
    pub inner: usize,
    pub indices: (StorageId, usize),
    pub n_indices: usize,
    /// Packed `[outer, n_indices, inner]`.
    pub dst: (StorageId, usize),
}

/// One unit of work.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    /// fp16 input surface `input` converted to f32 at `dst` (packed).
    LoadF16 {
        input: usize,
        dst: (StorageId, usize),
    },
    Unary {
        kind: Unary,
        round: bool,
        map: Map<1>,
    },
    Binary {
        kind: Binary,
        round: bool,
        map: Map<2>,
    },
    Softmax(Softmax),
    Reduce(Reduce),
    Matmul(Matmul),
    /// `softmax(x·y + mask)`: a matmul, a constant mask added and a softmax, fused.
    ScoresSoftmax(ScoresSoftmax),
    /// Steps that all split into the same `entries` batch entries (attention's heads),
    /// each entry reading only what the earlier steps wrote for that entry: run entry by
    /// entry, every step in turn, so that an entry's intermediates (a `[S, S]` score
    /// block) are still in cache when the next step reads them. Entries run in parallel.
    Region {
        entries: usize,
        steps: Vec<Step>,
    },
    Conv(Conv),
    Gather(Gather),
    /// A value written to fp16 output surface `output`; `map.dst` describes the packed
    /// surface (its storage id is unused).
    StoreF16 {
        output: usize,
        map: Map<1>,
    },
}

impl Step {
    /// Every window the step touches: `(storage, lo..hi)` address ranges, for the
    /// planner's bounds check.
    pub fn visit_spans(&self, f: &mut dyn FnMut(StorageId, (isize, isize))) {
        let packed = |st: StorageId, offset: usize, len: usize| (st, (offset as isize, (offset + len) as isize));
        let map =
            |m_shape: &[usize], op: &super::elementwise::Operand| (op.storage, span(op.offset, m_shape, &op.strides));
        match self {
            Step::LoadF16 { .. } => {} // checked with its input's size when planned
            Step::Unary { map: m, .. } => {
                let (a, b) = (map(&m.shape, &m.dst), map(&m.shape, &m.src[0]));
                f(a.0, a.1);
                f(b.0, b.1);
            }
            Step::Binary { map: m, .. } => {
                for op in [&m.dst, &m.src[0], &m.src[1]] {
                    let (st, r) = map(&m.shape, op);
                    f(st, r);
                }
            }
            Step::Softmax(s) => {
                let n = s.outer * s.len * s.inner;
                let (a, b) = (packed(s.src.0, s.src.1, n), packed(s.dst.0, s.dst.1, n));
                f(a.0, a.1);
                f(b.0, b.1);
            }
            Step::Reduce(r) => {
                let (src, dst) = r.spans();
                f(r.src.0, src);
                f(r.dst.0, dst);
            }
            Step::Matmul(m) | Step::ScoresSoftmax(ScoresSoftmax { matmul: m, .. }) => {
                let mut shape = m.batch_shape.clone();
                shape.extend([m.m, m.k]);
                let mut strides = m.x_batch.clone();
                strides.extend([m.x.row_stride, m.x.col_stride]);
                f(m.x.storage, span(m.x.offset, &shape, &strides));
                let r = shape.len();
                shape[r - 2..].copy_from_slice(&[m.k, m.n]);
                strides = m.y_batch.clone();
                strides.extend([m.y.row_stride, m.y.col_stride]);
                f(m.y.storage, span(m.y.offset, &shape, &strides));
                let n: usize = m.batch_shape.iter().product::<usize>() * m.m * m.n;
                let d = packed(m.dst.0, m.dst.1, n);
                f(d.0, d.1);
            }
            Step::Conv(c) => {
                for (st, r) in c.spans() {
                    f(st, r);
                }
            }
            Step::Gather(g) => {
                let x = packed(g.x.0, g.x.1, g.outer * g.dim * g.inner);
                let i = packed(g.indices.0, g.indices.1, g.n_indices);
                let d = packed(g.dst.0, g.dst.1, g.outer * g.n_indices * g.inner);
                for (st, r) in [x, i, d] {
                    f(st, r);
                }
            }
            Step::StoreF16 { map: m, .. } => {
                let (st, r) = map(&m.shape, &m.src[0]);
                f(st, r);
            }
            Step::Region { steps, .. } => steps.iter().for_each(|s| s.visit_spans(f)),
        }
    }

    /// Every storage the step reads or writes.
    pub fn visit_storages(&self, f: &mut dyn FnMut(StorageId)) {
        match self {
            Step::LoadF16 { dst, .. } => f(dst.0),
            Step::Unary { map, .. } => {
                f(map.dst.storage);
                f(map.src[0].storage);
            }
            Step::Binary { map, .. } => {
                f(map.dst.storage);
                f(map.src[0].storage);
                f(map.src[1].storage);
            }
            Step::Softmax(s) => {
                f(s.src.0);
                f(s.dst.0);
            }
            Step::Reduce(r) => {
                f(r.src.0);
                f(r.dst.0);
            }
            Step::Matmul(m) | Step::ScoresSoftmax(ScoresSoftmax { matmul: m, .. }) => {
                f(m.x.storage);
                f(m.y.storage);
                f(m.dst.0);
            }
            Step::Conv(c) => {
                f(c.x.0);
                f(c.w.storage);
                if let Some(b) = c.bias {
                    f(b.0);
                }
                if let Some(s) = c.scratch {
                    f(s.0);
                }
                f(c.dst.0);
            }
            Step::Gather(g) => {
                f(g.x.0);
                f(g.indices.0);
                f(g.dst.0);
            }
            Step::StoreF16 { map, .. } => f(map.src[0].storage),
            Step::Region { steps, .. } => steps.iter().for_each(|s| s.visit_storages(f)),
        }
    }
}

/// A compiled program on the CPU.
pub(crate) struct CpuKernel {
    pub inputs: Vec<Var>,
    pub outputs: Vec<Var>,
    pub steps: Vec<Step>,
    pub threads: usize,
    /// For each input, the storage that reads it in place (fp32 surfaces).
    pub input_storage: Vec<Option<StorageId>>,
    /// For each output, the storage that writes it in place (fp32 surfaces).
    pub output_storage: Vec<Option<StorageId>>,
    /// Constant data. Only `ptrs` reads it: the field keeps the memory alive.
    #[allow(dead_code)]
    pub consts: Vec<Vec<f32>>,
    /// All temporaries. Only `ptrs` reads it: the field keeps the memory alive.
    #[allow(dead_code)]
    pub arena: Vec<f32>,
    /// Address of every storage. Constants and temporaries are fixed (their buffers never
    /// grow); surfaces are entered at each eval.
    pub ptrs: Vec<Ptr>,
}

impl CpuKernel {
    fn bind(&mut self, inputs: &[&Surface], outputs: &mut [&mut Surface]) -> Result<()> {
        check_binding("input", &self.inputs, inputs)?;
        if outputs.len() != self.outputs.len() {
            let names: Vec<&str> = self.outputs.iter().map(|v| v.name.as_str()).collect();
            return Err(Error::new(
                ErrorKind::Binding,
                format!("kernel takes {} outputs ({}), {} given", self.outputs.len(), names.join(", "), outputs.len()),
            ));
        }
        for (var, s) in self.outputs.iter().zip(outputs.iter()) {
            check_binding("output", std::slice::from_ref(var), &[&**s])?;
        }
        for (i, s) in inputs.iter().enumerate() {
            if let Some(st) = self.input_storage[i] {
                // Read only: the planner never makes an input storage a destination.
                self.ptrs[st] = Ptr(s.as_f32().expect("binding checked fp32").as_ptr() as *mut f32);
            }
        }
        for (j, s) in outputs.iter_mut().enumerate() {
            if let Some(st) = self.output_storage[j] {
                self.ptrs[st] = Ptr(s.as_f32_mut().expect("binding checked fp32").as_mut_ptr());
            }
        }
        Ok(())
    }

    fn run(&self, step: &Step, inputs: &[&Surface], outputs: &mut [&mut Surface]) -> Result<()> {
        let p = |s: StorageId| self.ptrs[s];
        // SAFETY (every arm): the planner gives each step storages that cover the
        // addresses it touches, and a destination that overlaps none of its sources
        // (distinct surfaces, constants, or arena ranges whose lifetimes overlap).
        unsafe {
            match step {
                Step::LoadF16 { input, dst } => {
                    let src = inputs[*input].as_f16().expect("binding checked fp16");
                    let out = std::slice::from_raw_parts_mut(p(dst.0).0.add(dst.1), src.len());
                    src.convert_to_f32_slice(out);
                }
                Step::Gather(g) => gather(g, p(g.x.0), p(g.indices.0), p(g.dst.0))?,
                Step::StoreF16 { output, map } => {
                    let out = outputs[*output].as_f16_mut().expect("binding checked fp16");
                    let src = p(map.src[0].storage);
                    let rank = map.shape.len();
                    let ss = map.src[0].strides[rank - 1];
                    let strides = [map.dst.strides.as_slice(), &map.src[0].strides];
                    for_rows(&map.shape, strides, [0, map.src[0].offset], 0, map.numel(), |o, n| {
                        let d = &mut out[o[0] as usize..o[0] as usize + n];
                        let s = src.0.offset(o[1]) as *const f32;
                        if ss == 1 {
                            d.convert_from_f32_slice(std::slice::from_raw_parts(s, n));
                        } else {
                            for (i, v) in d.iter_mut().enumerate() {
                                *v = half::f16::from_f32(*s.offset(i as isize * ss));
                            }
                        }
                    });
                }
                Step::Region { entries, steps } => {
                    // Entries split between the threads; every step of an entry in turn.
                    par_split(*entries, usize::MAX, Par::Threads(self.threads), |lo, hi| {
                        for index in lo..hi {
                            for s in steps {
                                self.compute(s, Par::Entry { index, of: *entries });
                            }
                        }
                    });
                }
                _ => self.compute(step, Par::Threads(self.threads)),
            }
        }
        Ok(())
    }

    /// Runs a step that only computes (no surface conversion, nothing that can fail).
    ///
    /// # Safety
    /// As [`CpuKernel::run`]; with [`Par::Entry`], the planner checked that the step's
    /// share reads only what earlier steps of its region wrote for the same entry.
    unsafe fn compute(&self, step: &Step, par: Par) {
        let p = |s: StorageId| self.ptrs[s];
        match step {
            Step::Unary { kind, round, map } => {
                unary(*kind, *round, map, p(map.dst.storage), p(map.src[0].storage), par)
            }
            Step::Binary { kind, round, map } => {
                binary(*kind, *round, map, p(map.dst.storage), p(map.src[0].storage), p(map.src[1].storage), par)
            }
            Step::Softmax(s) => s.run(p(s.src.0), p(s.dst.0), par),
            Step::Reduce(r) => r.run(p(r.src.0), p(r.dst.0), par),
            Step::Matmul(m) => m.run(p(m.x.storage), p(m.y.storage), p(m.dst.0), par),
            Step::ScoresSoftmax(a) => {
                let m = &a.matmul;
                a.run(p(m.x.storage), p(m.y.storage), p(m.dst.0), par)
            }
            Step::Conv(c) => {
                let threads = if let Par::Threads(t) = par { t } else { 1 };
                c.run(p(c.x.0), p(c.w.storage), c.bias.map(|b| p(b.0)), c.scratch.map(|s| p(s.0)), p(c.dst.0), threads)
            }
            Step::LoadF16 { .. } | Step::StoreF16 { .. } | Step::Gather(_) | Step::Region { .. } => {
                unreachable!("the planner keeps surface conversions, gathers and regions out of regions")
            }
        }
    }
}

/// # Safety
/// As [`CpuKernel::run`].
unsafe fn gather(g: &Gather, x: Ptr, idx: Ptr, dst: Ptr) -> Result<()> {
    let indices = std::slice::from_raw_parts(idx.0.add(g.indices.1) as *const f32, g.n_indices);
    // Check every index before writing, so a bad one reads nothing out of bounds.
    for (p, &v) in indices.iter().enumerate() {
        let dim = g.dim as f32;
        if v.trunc() != v || v < -dim || v >= dim {
            return Err(Error::new(
                ErrorKind::Eval,
                format!(
                    "op `{}`: gather index {v} (position {p}) is out of range for axis {} of size {}: \
                     expected an integer in -{}..{}",
                    g.op, g.axis, g.dim, g.dim, g.dim
                ),
            ));
        }
    }
    let src = x.0.add(g.x.1) as *const f32;
    let out = dst.0.add(g.dst.1);
    for o in 0..g.outer {
        for (p, &v) in indices.iter().enumerate() {
            let i = if v < 0.0 { (v + g.dim as f32) as usize } else { v as usize };
            let from = std::slice::from_raw_parts(src.add((o * g.dim + i) * g.inner), g.inner);
            let to = std::slice::from_raw_parts_mut(out.add((o * g.n_indices + p) * g.inner), g.inner);
            to.copy_from_slice(from);
        }
    }
    Ok(())
}

impl Kernel for CpuKernel {
    fn inputs(&self) -> &[Var] {
        &self.inputs
    }

    fn outputs(&self) -> &[Var] {
        &self.outputs
    }

    fn eval(&mut self, inputs: &[&Surface], outputs: &mut [&mut Surface]) -> Result<()> {
        self.bind(inputs, outputs)?;
        for step in &self.steps {
            self.run(step, inputs, outputs)?;
        }
        Ok(())
    }
}

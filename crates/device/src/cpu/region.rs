//! Regions: runs of steps executed batch entry by batch entry ([`Step::Region`]).
//!
//! Attention works on `[batch, heads, S, S]` blocks: for Stories15M at batch 8, every
//! such tensor is 50 MB, and the backward writes and reads four of them (probabilities,
//! their gradient, the centred gradient, the score gradient), each far out of cache.
//! Per head they are 256 KB. A region runs its steps for one (batch, head) entry, then
//! the next, so that what a step writes for an entry is read by the next step while it is
//! still in the core's cache; entries are shared between the threads. A chain of
//! elementwise maps is split the same way, into chunks of positions, so that each
//! intermediate is read back from cache.
//!
//! That is only allowed when it computes the same thing: every step of the region must
//! split into the same number of entries (its work items `n·e/N .. n·(e+1)/N` for entry
//! `e`, see [`Par::Entry`](super::elementwise::Par)), and whatever a step reads of a
//! value written inside the region must lie in the addresses written for the same entry.
//! [`form_regions`] checks both, with the exact address ranges of every entry, before
//! grouping steps.

use std::collections::HashMap;

use super::elementwise::{for_rows, Operand};
use super::exec::Step;
use super::view::{span, StorageId};

/// An address range `[lo, hi)` in a storage (empty when `lo >= hi`).
type Span = (isize, isize);

/// What a step reads and writes, entry by entry, when split into `n` entries.
struct Access {
    dst: StorageId,
    /// Per entry, the range written.
    writes: Vec<Span>,
    /// Whether each entry writes every address of its range (then no two entries'
    /// ranges overlap, and reading inside an entry's range reads only that entry).
    dense: bool,
    /// Per source: its storage and, per entry, the range read.
    reads: Vec<(StorageId, Vec<Span>)>,
}

fn hull(a: Span, b: Span) -> Span {
    if a.0 >= a.1 {
        b
    } else if b.0 >= b.1 {
        a
    } else {
        (a.0.min(b.0), a.1.max(b.1))
    }
}

const EMPTY: Span = (0, 0);

/// Per entry, the addresses a map operand touches for output positions
/// `e·E .. (e+1)·E`: the hull of its rows.
fn map_spans(shape: &[usize], op: &Operand, n: usize) -> Vec<Span> {
    let per = shape.iter().product::<usize>() / n;
    let inner = op.strides[shape.len() - 1];
    (0..n)
        .map(|e| {
            let mut h = EMPTY;
            for_rows(shape, [&op.strides], [op.offset], e * per, (e + 1) * per, |o, len| {
                h = hull(h, span(o[0] as usize, &[len], &[inner]));
            });
            h
        })
        .collect()
}

fn access(step: &Step, n: usize) -> Option<Access> {
    match step {
        Step::Matmul(m) | Step::ScoresSoftmax(super::attention::ScoresSoftmax { matmul: m, .. }) => {
            let batches: usize = m.batch_shape.iter().product();
            if !batches.is_multiple_of(n) {
                return None;
            }
            let per = batches / n;
            let x = span(0, &[m.m, m.k], &[m.x.row_stride, m.x.col_stride]);
            let y = span(0, &[m.k, m.n], &[m.y.row_stride, m.y.col_stride]);
            let (mut xs, mut ys) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for e in 0..n {
                let (mut hx, mut hy) = (EMPTY, EMPTY);
                for b in e * per..(e + 1) * per {
                    let (xo, yo) = m.batch_offsets(b);
                    hx = hull(hx, (xo + x.0, xo + x.1));
                    hy = hull(hy, (yo + y.0, yo + y.1));
                }
                xs.push(hx);
                ys.push(hy);
            }
            let block = (per * m.m * m.n) as isize;
            let at = m.dst.1 as isize;
            Some(Access {
                dst: m.dst.0,
                writes: (0..n as isize).map(|e| (at + e * block, at + (e + 1) * block)).collect(),
                dense: true,
                reads: vec![(m.x.storage, xs), (m.y.storage, ys)],
            })
        }
        Step::Unary { map, .. } => map_access(&map.shape, &map.dst, &map.src, n),
        Step::Binary { map, .. } => map_access(&map.shape, &map.dst, &map.src, n),
        Step::Softmax(s) => {
            if s.inner != 1 || !s.outer.is_multiple_of(n) {
                return None;
            }
            let per = (s.outer / n * s.len) as isize;
            let spans =
                |at: usize| (0..n as isize).map(|e| (at as isize + e * per, at as isize + (e + 1) * per)).collect();
            Some(Access { dst: s.dst.0, writes: spans(s.dst.1), dense: true, reads: vec![(s.src.0, spans(s.src.1))] })
        }
        Step::Reduce(r) => {
            let n_out = r.n_out();
            if !n_out.is_multiple_of(n) {
                return None;
            }
            let per = n_out / n;
            let (mut ws, mut rs) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for e in 0..n {
                let (w, s) = r.spans_of(e * per, (e + 1) * per);
                ws.push(w);
                rs.push(s);
            }
            let dense = ws.iter().all(|w| (w.1 - w.0) as usize == per);
            Some(Access { dst: r.dst.0, writes: ws, dense, reads: vec![(r.src.0, rs)] })
        }
        Step::Conv(_) | Step::Gather(_) | Step::LoadF16 { .. } | Step::StoreF16 { .. } | Step::Region { .. } => None,
    }
}

/// A map's [`Access`], if its positions split into `n` equal entries.
fn map_access<const K: usize>(shape: &[usize], dst: &Operand, src: &[Operand; K], n: usize) -> Option<Access> {
    let numel: usize = shape.iter().product();
    if !numel.is_multiple_of(n) {
        return None;
    }
    let writes = map_spans(shape, dst, n);
    let per = numel / n;
    // A map writes distinct addresses: a range exactly as long as the entry is dense.
    let dense = writes.iter().all(|w| (w.1 - w.0) as usize == per);
    let reads = src.iter().map(|s| (s.storage, map_spans(shape, s, n))).collect();
    Some(Access { dst: dst.storage, writes, dense, reads })
}

/// The number of entries a region may start with at `step`, when there are enough to
/// keep `threads` busy (at least two each: whole entries are shared out, so fewer would
/// leave threads idle):
/// - a batched matmul's (or the fused scores') batch entries;
/// - an elementwise map's chunks of about [`MAP_ENTRY`] positions, so that a chain of
///   maps (the SwiGLU backward's ten, over `[hidden, T]`) runs chunk by chunk and each
///   intermediate is read back from cache rather than from memory.
fn seed(step: &Step, threads: usize) -> Option<usize> {
    let entries = match step {
        Step::Matmul(m) | Step::ScoresSoftmax(super::attention::ScoresSoftmax { matmul: m, .. }) => {
            m.batch_shape.iter().product()
        }
        Step::Unary { map, .. } => map_chunks(map.numel())?,
        Step::Binary { map, .. } => map_chunks(map.numel())?,
        _ => return None,
    };
    (entries >= 2 * threads.max(1)).then_some(entries)
}

/// Positions per entry of a region seeded by a map: 32 KB of f32 per operand, so that a
/// chain's live chunks stay in L2.
const MAP_ENTRY: usize = 8192;

/// Into how many equal chunks of `MAP_ENTRY / 2 ..= 2 · MAP_ENTRY` positions `numel`
/// splits (preferring sizes near `MAP_ENTRY`), if any.
fn map_chunks(numel: usize) -> Option<usize> {
    (0..=MAP_ENTRY)
        .flat_map(|d| [MAP_ENTRY - d / 2, MAP_ENTRY + d])
        .find(|&chunk| numel.is_multiple_of(chunk) && numel > chunk)
        .map(|chunk| numel / chunk)
}

/// Groups runs of steps into regions where that provably computes the same result (see
/// the module docs). A region only holds steps whose destination no other step of the
/// kernel writes.
pub(crate) fn form_regions(steps: Vec<Step>, threads: usize) -> Vec<Step> {
    let mut writers: HashMap<StorageId, usize> = HashMap::new();
    for s in &steps {
        if let Some(d) = destination(s) {
            *writers.entry(d).or_default() += 1;
        }
    }
    // Regions as `[start, end)` step ranges with their entry counts.
    let mut groups = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        let Some(n) = seed(&steps[i], threads) else {
            i += 1;
            continue;
        };
        // Storages written so far in the region: per entry ranges, if dense.
        let mut written: HashMap<StorageId, Option<Vec<Span>>> = HashMap::new();
        let mut j = i;
        while let Some(a) = steps.get(j).and_then(|s| access(s, n)) {
            let reads_own_entry = a.reads.iter().all(|(st, spans)| match written.get(st) {
                None => true, // written before the region, or never
                Some(None) => false,
                Some(Some(w)) => spans.iter().zip(w).all(|(r, w)| r.0 >= r.1 || (r.0 >= w.0 && r.1 <= w.1)),
            });
            if writers.get(&a.dst) != Some(&1) || !reads_own_entry {
                break;
            }
            written.insert(a.dst, a.dense.then_some(a.writes));
            j += 1;
        }
        if j - i >= 2 {
            groups.push((i, j, n));
            i = j;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(steps.len());
    let mut steps = steps.into_iter().enumerate().peekable();
    for (start, end, entries) in groups {
        while steps.next_if(|(k, _)| *k < start).map(|(_, s)| out.push(s)).is_some() {}
        let region: Vec<Step> = steps.by_ref().take(end - start).map(|(_, s)| s).collect();
        out.push(Step::Region { entries, steps: region });
    }
    out.extend(steps.map(|(_, s)| s));
    out
}

/// The storage a step writes (`None` for fp16 stores, which write a surface).
fn destination(step: &Step) -> Option<StorageId> {
    match step {
        Step::LoadF16 { dst, .. } => Some(dst.0),
        Step::Unary { map, .. } => Some(map.dst.storage),
        Step::Binary { map, .. } => Some(map.dst.storage),
        Step::Softmax(s) => Some(s.dst.0),
        Step::Reduce(r) => Some(r.dst.0),
        Step::Matmul(m) => Some(m.dst.0),
        Step::ScoresSoftmax(a) => Some(a.matmul.dst.0),
        Step::Conv(c) => Some(c.dst.0),
        Step::Gather(g) => Some(g.dst.0),
        Step::StoreF16 { .. } => None,
        Step::Region { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use mil::builder::FunctionBuilder;
    use mil::{DType, Dialect, Program, TensorType, Var};

    use crate::cpu::attention::tests::probabilities;
    use crate::cpu::bench::values;
    use crate::cpu::exec::Step;
    use crate::cpu::plan::plan_program;
    use crate::cpu::CpuDevice;
    use crate::{Device, Precision, Surface, Weights};

    const B: usize = 3;
    const H: usize = 2;
    const S: usize = 40;
    const D: usize = 8;

    /// A program over inputs `q, k, v, g: [B, H, S, D]` built by `body`.
    fn program(body: impl FnOnce(&mut FunctionBuilder, &mut Weights, [Var; 4]) -> Vec<Var>) -> (Program, Weights) {
        let mut f = FunctionBuilder::new("main", Dialect::Ios18);
        let ty = TensorType::new(DType::Fp32, [B, H, S, D]);
        let ins = ["q", "k", "v", "g"].map(|n| f.input(n, ty.clone()));
        let mut weights = Weights::new();
        for out in body(&mut f, &mut weights, ins) {
            f.output(&out);
        }
        (Program::new(Dialect::Ios18, f.finish().unwrap()), weights)
    }

    /// `p = softmax(q·kᵀ + causal mask)` and attention's backward on it with upstream
    /// gradient `g`: `dv = pᵀ·g`, `ds = p ⊙ (g·vᵀ − rowsum(g·vᵀ ⊙ p))`, `dq = ds·k`,
    /// `dk = dsᵀ·q`.
    fn attention_backward(f: &mut FunctionBuilder, w: &mut Weights, [q, k, v, g]: [Var; 4]) -> Vec<Var> {
        let mask: Vec<f32> = (0..S * S).map(|e| if e % S > e / S { -30000.0 } else { 0.0 }).collect();
        let p = probabilities(f, w, [&q, &k], &[S, S], &mask);
        let dv = f.matmul("dv", &p, &g, true, false);
        let dp = f.matmul("dp", &g, &v, false, true);
        let dpp = f.mul("dpp", &dp, &p);
        let rowsum = f.reduce_sum("rowsum", &dpp, &[-1], true);
        let centered = f.sub("centered", &dp, &rowsum);
        let ds = f.mul("ds", &p, &centered);
        let dq = f.matmul("dq", &ds, &k, false, false);
        let dk = f.matmul("dk", &ds, &q, true, false);
        vec![dq, dk, dv]
    }

    /// The kind of a step inside a region.
    fn kind(step: &Step) -> &'static str {
        match step {
            Step::Matmul(_) => "matmul",
            Step::ScoresSoftmax(_) => "scores",
            Step::Unary { .. } => "unary",
            Step::Binary { .. } => "binary",
            Step::Reduce(_) => "reduce",
            _ => "other",
        }
    }

    /// The kernel's outputs, fused or not, and the steps of each of its regions.
    fn run(program: &Program, weights: &Weights, fuse: bool) -> (Vec<Vec<f32>>, Vec<Vec<&'static str>>) {
        let device = CpuDevice::new(Precision::Fp32).with_threads(2).with_fusion(fuse);
        let plan = plan_program(program, weights, Precision::Fp32, 2, fuse);
        let regions = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Region { steps, .. } => Some(steps.iter().map(kind).collect()),
                _ => None,
            })
            .collect();
        let mut kernel = device.compile(program, weights).unwrap();
        let inputs: Vec<Surface> = (kernel.inputs().iter().enumerate())
            .map(|(i, v)| Surface::from_f32(DType::Fp32, &v.ty.shape, &values(v.ty.numel(), i as u64 + 1)))
            .collect();
        let inputs: Vec<&Surface> = inputs.iter().collect();
        let mut outputs: Vec<Surface> = kernel
            .outputs()
            .iter()
            .map(|o| Surface::from_f32(DType::Fp32, &o.ty.shape, &vec![0.0; o.ty.numel()]))
            .collect();
        kernel.eval(&inputs, &mut outputs.iter_mut().collect::<Vec<_>>()).unwrap();
        (outputs.iter().map(Surface::to_f32).collect(), regions)
    }

    fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>]) {
        for (x, y) in a.iter().zip(b) {
            let scale = y.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            // Same operations in the same order per element, but GEMMs over fewer columns
            // may sum in another order: f32 rounding on sums of ≤ S terms.
            assert!(diff <= 1e-5 * scale, "fused and unfused differ by {diff} (values up to {scale})");
        }
    }

    /// Attention's whole backward after the probabilities runs head by head as one
    /// region (scores, the four GEMMs, the elementwise steps and the row sum), with the
    /// result of running every step over all heads.
    #[test]
    fn attention_backward_is_one_region_and_unchanged() {
        let (p, w) = program(attention_backward);
        let (fused, regions) = run(&p, &w, true);
        let (plain, none) = run(&p, &w, false);
        assert!(none.is_empty());
        let steps = ["scores", "matmul", "matmul", "binary", "reduce", "binary", "binary", "matmul", "matmul"];
        assert_eq!(regions, vec![steps.to_vec()], "scores, dv, dp, dp⊙p, rowsum, centred, ds, dq, dk");
        assert_close(&fused, &plain);
    }

    /// Steps that read another entry's data stay out: a consumer of the probabilities
    /// with batch and head axes swapped (entry (b, h) reads entry (h, b)), and a
    /// reduction over the batch axis.
    #[test]
    fn steps_reading_other_entries_stay_out() {
        let (p, w) = program(|f, w, [q, k, v, g]| {
            let p = probabilities(f, w, [&q, &k], &[S, S], &vec![0.0; S * S]);
            let pt = f.transpose("pt", &p, &[1, 0, 2, 3]); // [H, B, S, S]
            let vt = f.transpose("vt", &v, &[1, 0, 2, 3]);
            let swapped = f.matmul("swapped", &pt, &vt, false, false);
            let gp = f.matmul("gp", &p, &g, false, false);
            let total = f.reduce_sum("total", &gp, &[0], true);
            vec![swapped, total]
        });
        let (fused, regions) = run(&p, &w, true);
        let (plain, _) = run(&p, &w, false);
        // The swapped product may not follow the scores (it would read heads not yet
        // computed); it starts a region of its own with g·p, which reads nothing of it.
        // The reduction over the batch does not split into entries.
        assert_eq!(regions, vec![vec!["matmul", "matmul"]]);
        assert_close(&fused, &plain);
    }

    /// A chain of elementwise maps over a large tensor (the SwiGLU backward's pattern)
    /// runs chunk by chunk as one region, with the result of running each map over the
    /// whole tensor. A map reading a chain value transposed (other chunks' positions)
    /// stays out.
    #[test]
    fn elementwise_chains_run_chunk_by_chunk() {
        // 64 × 1024 positions: 8 chunks of 8192.
        let mut f = FunctionBuilder::new("main", Dialect::Ios18);
        let ty = TensorType::new(DType::Fp32, [64, 1024]);
        let [h1, h3, g] = ["h1", "h3", "g"].map(|n| f.input(n, ty.clone()));
        let sig = f.sigmoid("sig", &h1);
        let act = f.mul("act", &h1, &sig);
        let gate = f.mul("gate", &act, &h3);
        let one = f.scalar(DType::Fp32, 1.0);
        let one_minus = f.sub("one_minus", &one, &sig);
        let dh1 = f.mul("dh1", &g, &one_minus);
        let square = f.reshape("square", &dh1, &[256, 256]);
        let crossed = f.transpose("crossed", &square, &[1, 0]);
        let mixed = f.add("mixed", &crossed, &square);
        for out in [&gate, &dh1, &mixed] {
            f.output(out);
        }
        let program = Program::new(Dialect::Ios18, f.finish().unwrap());
        let weights = Weights::new();
        let (fused, regions) = run(&program, &weights, true);
        let (plain, none) = run(&program, &weights, false);
        assert!(none.is_empty());
        assert_eq!(
            regions,
            vec![vec!["unary", "binary", "binary", "binary", "binary"]],
            "sig, act, gate, 1 − sig, dh1"
        );
        assert_close(&fused, &plain);
    }
}

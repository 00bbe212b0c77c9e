//! Elementwise work: unary and binary ops, copies (materialising a view), casts.
//!
//! Every map walks a coalesced iteration shape (see [`super::view::coalesce`]): the
//! innermost axis is a "row" processed by a tight loop with the operands' inner strides
//! known (1, 0 = broadcast, or anything), so the common cases — packed rows, a row
//! against a scalar or a per-channel value — are straight loops the compiler
//! vectorises. Large maps are split into contiguous ranges of the output and run on
//! rayon; small ones run inline, so a one-element op costs well under a microsecond.

use rayon::prelude::*;

use super::math::{exp, round_f16, sigmoid};
use super::view::{coalesce, StorageId, View};

/// Below this many elements a map runs on the calling thread: splitting costs more
/// than it saves (rayon's fork/join is a few microseconds).
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;
/// The smallest piece of work handed to one rayon task.
const PAR_MIN_CHUNK: usize = 1 << 13;

/// A raw pointer that may cross threads. Each task writes a disjoint part of the
/// destination, and sources are only read; see the planner's aliasing rules.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ptr(pub *mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// The address. (A method, so that closures capture the whole `Ptr`, which is
    /// `Sync`, rather than its raw-pointer field, which is not.)
    #[inline(always)]
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// One-input elementwise functions (MIL unary ops, plus the casts).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Unary {
    Identity,
    Sqrt,
    /// `1 / sqrt(x + epsilon)`.
    Rsqrt(f32),
    Exp,
    /// `ln(x + epsilon)`.
    Log(f32),
    Relu,
    Sigmoid,
    Silu,
    Tanh,
    Square,
    Abs,
    /// `1 / (x + epsilon)`.
    Inverse(f32),
    /// `cast` to int32: toward zero, as NumPy's `astype`.
    Trunc,
    /// `cast` to bool: 1 where x ≠ 0.
    NonZero,
}

/// Two-input elementwise functions with NumPy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    /// `real_div` on int32 values: the quotient truncated toward zero.
    DivInt,
    Pow,
    /// NaN-propagating, as NumPy's `maximum`.
    Max,
    Min,
}

impl Unary {
    pub fn from_op(op: &str, epsilon: f32) -> Option<Unary> {
        Some(match op {
            "identity" => Unary::Identity,
            "sqrt" => Unary::Sqrt,
            "rsqrt" => Unary::Rsqrt(epsilon),
            "exp" => Unary::Exp,
            "log" => Unary::Log(epsilon),
            "relu" => Unary::Relu,
            "sigmoid" => Unary::Sigmoid,
            "silu" => Unary::Silu,
            "tanh" => Unary::Tanh,
            "square" => Unary::Square,
            "abs" => Unary::Abs,
            "inverse" => Unary::Inverse(epsilon),
            _ => return None,
        })
    }
}

impl Binary {
    pub fn from_op(op: &str, int: bool) -> Option<Binary> {
        Some(match op {
            "add" => Binary::Add,
            "sub" => Binary::Sub,
            "mul" => Binary::Mul,
            "real_div" if int => Binary::DivInt,
            "real_div" => Binary::Div,
            "pow" => Binary::Pow,
            "maximum" => Binary::Max,
            "minimum" => Binary::Min,
            _ => return None,
        })
    }
}

/// An operand of a map, as the iteration sees it: base offset and strides over the
/// (coalesced) iteration shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Operand {
    pub storage: StorageId,
    pub offset: usize,
    pub strides: Vec<isize>,
}

/// A planned elementwise map: `dst[i] = f(src₀[i], …)` over `shape`.
#[derive(Clone, Debug)]
pub(crate) struct Map<const N: usize> {
    pub shape: Vec<usize>,
    pub dst: Operand,
    pub src: [Operand; N],
}

impl<const N: usize> Map<N> {
    /// Plans a map writing `dst` from `src` (all of `dst`'s shape; sources already
    /// broadcast to it).
    pub fn new(dst: &View, src: [&View; N]) -> Map<N> {
        let mut strides: Vec<&[isize]> = vec![&dst.strides];
        strides.extend(src.iter().map(|v| v.strides.as_slice()));
        let c = coalesce(&dst.shape, &strides);
        let mut it = c.strides.into_iter();
        let dst_op = Operand { storage: dst.storage, offset: dst.offset, strides: it.next().unwrap() };
        let src = std::array::from_fn(|i| Operand {
            storage: src[i].storage,
            offset: src[i].offset,
            strides: it.next().unwrap(),
        });
        Map { shape: c.shape, dst: dst_op, src }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How a step's work is shared out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Par {
    /// Over at most this many rayon tasks (1: the calling thread).
    Threads(usize),
    /// Only batch entry `index` of `of`, on the calling thread: the step's work items
    /// `n·index/of .. n·(index + 1)/of` (see `Step::Region`).
    Entry { index: usize, of: usize },
}

/// Splits `0..n` into contiguous ranges and runs `f` on each, in parallel when `n` is
/// large enough and more than one thread is allowed.
pub(crate) fn par_ranges(n: usize, par: Par, f: impl Fn(usize, usize) + Sync) {
    par_split(n, n, par, f)
}

/// As [`par_ranges`] for `n` items that together cost `work` element-operations. Each
/// range runs under [`simd`].
pub(crate) fn par_split(n: usize, work: usize, par: Par, f: impl Fn(usize, usize) + Sync) {
    let threads = match par {
        Par::Threads(t) => t,
        Par::Entry { index, of } => {
            return simd(
                #[inline(always)]
                || f(n * index / of, n * (index + 1) / of),
            )
        }
    };
    let tasks = if threads > 1 && work >= PAR_MIN_ELEMS { threads.min(work / PAR_MIN_CHUNK).min(n).max(1) } else { 1 };
    if tasks == 1 {
        simd(
            #[inline(always)]
            || f(0, n),
        );
    } else {
        (0..tasks).into_par_iter().for_each(|t| {
            simd(
                #[inline(always)]
                || f(n * t / tasks, n * (t + 1) / tasks),
            )
        });
    }
}

/// Runs `f` compiled for AVX2 and FMA when the CPU has them (checked once, then a
/// cached load), else as built. The element loops are plain Rust that the compiler
/// vectorises; the default x86-64 target allows only SSE2, which halves their speed
/// (and more for `exp`, whose selects SSE2 cannot blend). The `gemm` crate does its own
/// dispatch.
///
/// Public for the training crate's CPU ops. Only code inlined into `f` gets the
/// features: closures passed here, and the functions they call, are `#[inline(always)]`.
/// Results are bit-identical to the baseline build: Rust never contracts `a·b + c` into
/// an FMA, and vector lanes do the same IEEE operations as scalar code.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected on this CPU.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Walks flat output positions `lo..hi` of an iteration `shape` row by row, calling
/// `row(offsets, len)` with each operand's address for the row's first element.
#[inline(always)]
pub(crate) fn for_rows<const K: usize>(
    shape: &[usize],
    strides: [&[isize]; K],
    base: [usize; K],
    lo: usize,
    hi: usize,
    mut row: impl FnMut([isize; K], usize),
) {
    let rank = shape.len();
    let inner = shape[rank - 1];
    let mut i = lo;
    while i < hi {
        let mut r = i / inner;
        let col = i % inner;
        let len = (inner - col).min(hi - i);
        let mut offs = [0isize; K];
        for k in 0..K {
            offs[k] = base[k] as isize + col as isize * strides[k][rank - 1];
        }
        for d in (0..rank - 1).rev() {
            let idx = r % shape[d];
            r /= shape[d];
            for k in 0..K {
                offs[k] += idx as isize * strides[k][d];
            }
        }
        row(offs, len);
        i += len;
    }
}

/// Runs a unary map with `f` on each element.
///
/// # Safety
/// `dst` and `src` point at storages covering every address the map touches, and the
/// destination does not overlap the source.
pub(crate) unsafe fn run_unary(m: &Map<1>, dst: Ptr, src: Ptr, par: Par, f: impl Fn(f32) -> f32 + Sync) {
    let rank = m.shape.len();
    let (ds, ss) = (m.dst.strides[rank - 1], m.src[0].strides[rank - 1]);
    par_ranges(
        m.numel(),
        par,
        #[inline(always)]
        |lo, hi| {
            for_rows(
                &m.shape,
                [&m.dst.strides, &m.src[0].strides],
                [m.dst.offset, m.src[0].offset],
                lo,
                hi,
                #[inline(always)]
                |o, n| {
                    let d = dst.get().offset(o[0]);
                    let s = src.get().offset(o[1]) as *const f32;
                    if ds == 1 && ss == 1 {
                        let (d, s) = (std::slice::from_raw_parts_mut(d, n), std::slice::from_raw_parts(s, n));
                        for (y, &x) in d.iter_mut().zip(s) {
                            *y = f(x);
                        }
                    } else if ds == 1 && ss == 0 {
                        std::slice::from_raw_parts_mut(d, n).fill(f(*s));
                    } else {
                        for i in 0..n as isize {
                            *d.offset(i * ds) = f(*s.offset(i * ss));
                        }
                    }
                },
            );
        },
    );
}

/// Runs a binary map with `f` on each pair.
///
/// # Safety
/// As [`run_unary`].
pub(crate) unsafe fn run_binary(m: &Map<2>, dst: Ptr, a: Ptr, b: Ptr, par: Par, f: impl Fn(f32, f32) -> f32 + Sync) {
    let rank = m.shape.len();
    let (ds, sa, sb) = (m.dst.strides[rank - 1], m.src[0].strides[rank - 1], m.src[1].strides[rank - 1]);
    let strides = [m.dst.strides.as_slice(), &m.src[0].strides, &m.src[1].strides];
    par_ranges(
        m.numel(),
        par,
        #[inline(always)]
        |lo, hi| {
            for_rows(
                &m.shape,
                strides,
                [m.dst.offset, m.src[0].offset, m.src[1].offset],
                lo,
                hi,
                #[inline(always)]
                |o, n| {
                    let d = dst.get().offset(o[0]);
                    let pa = a.get().offset(o[1]) as *const f32;
                    let pb = b.get().offset(o[2]) as *const f32;
                    if ds == 1 {
                        let d = std::slice::from_raw_parts_mut(d, n);
                        match (sa, sb) {
                            (1, 1) => {
                                let (x, y) = (std::slice::from_raw_parts(pa, n), std::slice::from_raw_parts(pb, n));
                                for ((z, &x), &y) in d.iter_mut().zip(x).zip(y) {
                                    *z = f(x, y);
                                }
                                return;
                            }
                            (1, 0) => {
                                let (x, y) = (std::slice::from_raw_parts(pa, n), *pb);
                                for (z, &x) in d.iter_mut().zip(x) {
                                    *z = f(x, y);
                                }
                                return;
                            }
                            (0, 1) => {
                                let (x, y) = (*pa, std::slice::from_raw_parts(pb, n));
                                for (z, &y) in d.iter_mut().zip(y) {
                                    *z = f(x, y);
                                }
                                return;
                            }
                            _ => {}
                        }
                    }
                    for i in 0..n as isize {
                        *d.offset(i * ds) = f(*pa.offset(i * sa), *pb.offset(i * sb));
                    }
                },
            );
        },
    );
}

/// Runs `kind` on a unary map, rounding each result to fp16 when `round`.
///
/// # Safety
/// As [`run_unary`].
pub(crate) unsafe fn unary(kind: Unary, round: bool, m: &Map<1>, dst: Ptr, src: Ptr, par: Par) {
    macro_rules! go {
        ($f:expr) => {{
            let f = $f;
            if round {
                run_unary(m, dst, src, par, |x| round_f16(f(x)))
            } else {
                run_unary(m, dst, src, par, f)
            }
        }};
    }
    match kind {
        Unary::Identity => go!(|x: f32| x),
        Unary::Sqrt => go!(|x: f32| x.sqrt()),
        Unary::Rsqrt(eps) => go!(move |x: f32| 1.0 / (x + eps).sqrt()),
        Unary::Exp => go!(exp),
        Unary::Log(eps) => go!(move |x: f32| (x + eps).ln()),
        Unary::Relu => go!(|x: f32| if x < 0.0 { 0.0 } else { x }),
        Unary::Sigmoid => go!(sigmoid),
        Unary::Silu => go!(|x: f32| x * sigmoid(x)),
        Unary::Tanh => go!(|x: f32| x.tanh()),
        Unary::Square => go!(|x: f32| x * x),
        Unary::Abs => go!(|x: f32| x.abs()),
        Unary::Inverse(eps) => go!(move |x: f32| 1.0 / (x + eps)),
        Unary::Trunc => go!(|x: f32| x.trunc()),
        Unary::NonZero => go!(|x: f32| if x != 0.0 { 1.0 } else { 0.0 }),
    }
}

/// Runs `kind` on a binary map, rounding each result to fp16 when `round`.
///
/// # Safety
/// As [`run_unary`].
pub(crate) unsafe fn binary(kind: Binary, round: bool, m: &Map<2>, dst: Ptr, a: Ptr, b: Ptr, par: Par) {
    macro_rules! go {
        ($f:expr) => {{
            let f = $f;
            if round {
                run_binary(m, dst, a, b, par, |x, y| round_f16(f(x, y)))
            } else {
                run_binary(m, dst, a, b, par, f)
            }
        }};
    }
    match kind {
        Binary::Add => go!(|x: f32, y: f32| x + y),
        Binary::Sub => go!(|x: f32, y: f32| x - y),
        Binary::Mul => go!(|x: f32, y: f32| x * y),
        Binary::Div => go!(|x: f32, y: f32| x / y),
        Binary::DivInt => go!(|x: f32, y: f32| (x / y).trunc()),
        Binary::Pow => go!(pow),
        Binary::Max => go!(|x: f32, y: f32| if x >= y || x.is_nan() { x } else { y }),
        Binary::Min => go!(|x: f32, y: f32| if x <= y || x.is_nan() { x } else { y }),
    }
}

/// `x^y`, with the exponents kernels actually use (RMSNorm's `pow(·, -0.5)`, squares)
/// taken without `powf`.
#[inline(always)]
fn pow(x: f32, y: f32) -> f32 {
    if y == 2.0 {
        x * x
    } else if y == -0.5 {
        1.0 / x.sqrt()
    } else if y == 1.0 {
        x
    } else {
        x.powf(y)
    }
}

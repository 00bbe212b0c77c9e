//! Surfaces: the buffers kernels read and write. On the ANE they are IOSurfaces; here
//! they are plain memory with the same layout: row-major over the declared shape, which
//! for activations is channel-major `[1, C, 1, S]` (element (c, s) at `c*S + s`).

use half::f16;
use mil::DType;
use rayon::prelude::*;

/// Copies of at least this many elements are split between rayon's threads: the
/// dynamic-weight pipelines copy every layer's weights and activations through surfaces
/// each step (hundreds of MB at Stories110M), and one core's copy loop does not use all
/// of the memory bandwidth that two reach.
const PAR_COPY: usize = 1 << 18;

/// `f` over matching pieces of `dst` and `src` (the same length), in parallel when large.
fn copy_split<D: Send, S: Sync>(dst: &mut [D], src: &[S], f: impl Fn(&mut [D], &[S]) + Sync) {
    debug_assert_eq!(dst.len(), src.len());
    if dst.len() < PAR_COPY {
        return f(dst, src);
    }
    let piece = dst.len().div_ceil(4 * rayon::current_num_threads()).max(PAR_COPY / 4);
    dst.par_chunks_mut(piece).zip(src.par_chunks(piece)).for_each(|(d, s)| f(d, s));
}

/// `f(r, row)` on each row of `rows` (a whole number of surface rows of length `width`),
/// in parallel when the copy (`work` elements) is large.
fn for_rows<D: Send>(rows: &mut [D], width: usize, work: usize, f: impl Fn(usize, &mut [D]) + Sync) {
    if work < PAR_COPY {
        rows.chunks_mut(width).enumerate().for_each(|(r, row)| f(r, row));
    } else {
        rows.par_chunks_mut(width).enumerate().for_each(|(r, row)| f(r, row));
    }
}

/// The width (positions) to give a surface whose blocks fill `width` positions: the
/// next odd multiple of 32. A multiple of 32 meets both spatial multiples reported for the
/// ANE (16 and 32, see `mil::lint::SPATIAL_MULTIPLE`). An odd one keeps consecutive
/// channels from lying a multiple of 4 KiB apart: a dynamic-weight surface holding
/// `[activations | Wᵀ]` 256 + 768 positions wide has fp32 rows of exactly 4 KiB, so every
/// row of `Wᵀ` falls in the same L1 set and the GEMM's packing of it thrashes that set;
/// padded to 1056, its matmul measured 4–8 % faster (`anetrain bench gemm`). The padded
/// positions are never read.
pub fn padded_width(width: usize) -> usize {
    let units = width.div_ceil(32);
    32 * (units | 1)
}

#[derive(Clone, Debug, PartialEq)]
enum Data {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

/// A dense fp16 or fp32 buffer with a shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Surface {
    shape: Vec<usize>,
    data: Data,
}

impl Surface {
    /// A zero-filled surface. Panics on a dtype other than fp16/fp32: surfaces carry
    /// floats only, and that is a programming error, not a user's.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Surface {
        let n = shape.iter().product();
        let data = match dtype {
            DType::Fp16 => Data::F16(vec![f16::ZERO; n]),
            DType::Fp32 => Data::F32(vec![0.0; n]),
            other => panic!("surfaces hold fp16 or fp32, not {other}"),
        };
        Surface { shape: shape.to_vec(), data }
    }

    /// A `[1, C, 1, S]` activation surface.
    pub fn activation(dtype: DType, channels: usize, seq: usize) -> Surface {
        Surface::zeros(dtype, &[1, channels, 1, seq])
    }

    /// A surface of the given type holding `values` (rounded if fp16).
    pub fn from_f32(dtype: DType, shape: &[usize], values: &[f32]) -> Surface {
        let mut s = Surface::zeros(dtype, shape);
        s.write_f32(values);
        s
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F16(_) => DType::Fp16,
            Data::F32(_) => DType::Fp32,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::F16(v) => v.len(),
            Data::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the data takes (the IOSurface allocation before any padding).
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype().size_bytes()
    }

    /// Copies `src` into the surface from element 0, converting to its dtype.
    pub fn write_f32(&mut self, src: &[f32]) {
        self.write_f32_at(0, src);
    }

    /// Copies `src` into the surface from element `at`.
    pub fn write_f32_at(&mut self, at: usize, src: &[f32]) {
        match &mut self.data {
            Data::F16(v) => copy_split(&mut v[at..at + src.len()], src, |d, s| {
                d.iter_mut().zip(s).for_each(|(d, s)| *d = f16::from_f32(*s))
            }),
            Data::F32(v) => copy_split(&mut v[at..at + src.len()], src, |d, s| d.copy_from_slice(s)),
        }
    }

    /// Copies elements `at..at + dst.len()` out as f32.
    pub fn read_f32_at(&self, at: usize, dst: &mut [f32]) {
        let n = dst.len();
        match &self.data {
            Data::F16(v) => {
                copy_split(dst, &v[at..at + n], |d, s| d.iter_mut().zip(s).for_each(|(d, s)| *d = s.to_f32()))
            }
            Data::F32(v) => copy_split(dst, &v[at..at + n], |d, s| d.copy_from_slice(s)),
        }
    }

    /// The whole surface as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read_f32_at(0, &mut out);
        out
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::F16(_) => None,
        }
    }

    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.data {
            Data::F32(v) => Some(v),
            Data::F16(_) => None,
        }
    }

    /// Moves the surface's values into `buf` without copying, when the surface is fp32
    /// and exactly `buf.len()` long: the two exchange buffers, so the surface keeps
    /// `buf`'s old contents (for a kernel output, overwritten by the next evaluation).
    /// Returns whether it did; otherwise nothing changes.
    pub fn swap_f32(&mut self, buf: &mut Vec<f32>) -> bool {
        match &mut self.data {
            Data::F32(v) if v.len() == buf.len() => {
                std::mem::swap(v, buf);
                true
            }
            _ => false,
        }
    }

    /// All of the surface's values into `dst` (which is the surface's length): by
    /// exchanging buffers when [`swap_f32`](Self::swap_f32) can (the surface then holds
    /// `dst`'s old values: fit for a kernel output, which the next evaluation overwrites
    /// in full), else by a copy.
    pub fn take_f32(&mut self, dst: &mut Vec<f32>) {
        if !self.swap_f32(dst) {
            self.read_f32_at(0, dst);
        }
    }

    pub fn as_f16(&self) -> Option<&[f16]> {
        match &self.data {
            Data::F16(v) => Some(v),
            Data::F32(_) => None,
        }
    }

    pub fn as_f16_mut(&mut self) -> Option<&mut [f16]> {
        match &mut self.data {
            Data::F16(v) => Some(v),
            Data::F32(_) => None,
        }
    }

    /// Writes a `[rows, cols]` row-major block into a `[1, C, 1, S]` surface at channel
    /// `c0`, position `s0`: element (r, k) goes to channel `c0 + r`, position `s0 + k`.
    /// This is how activations and packed weights enter a dynamic-weight surface.
    pub fn write_block(&mut self, c0: usize, s0: usize, rows: usize, cols: usize, src: &[f32]) {
        assert_eq!(src.len(), rows * cols, "write_block: {rows}x{cols} block from {} values", src.len());
        let seq = *self.shape.last().expect("surface has a shape");
        assert!(s0 + cols <= seq, "write_block: positions {s0}..{} past width {seq}", s0 + cols);
        if rows == 0 || cols == 0 {
            return;
        }
        let (lo, hi) = (c0 * seq, (c0 + rows) * seq);
        let block_row = |r: usize| &src[r * cols..(r + 1) * cols];
        match &mut self.data {
            Data::F16(v) => for_rows(&mut v[lo..hi], seq, rows * cols, |r, row| {
                row[s0..s0 + cols].iter_mut().zip(block_row(r)).for_each(|(d, s)| *d = f16::from_f32(*s))
            }),
            // One column (a decode step's token): a strided store per row, not a copy call.
            Data::F32(v) if cols == 1 => v[lo + s0..hi].iter_mut().step_by(seq).zip(src).for_each(|(d, s)| *d = *s),
            Data::F32(v) => {
                for_rows(&mut v[lo..hi], seq, rows * cols, |r, row| row[s0..s0 + cols].copy_from_slice(block_row(r)))
            }
        }
    }

    /// Reads a `[rows, cols]` block at channel `c0`, position `s0` (see [`write_block`](Self::write_block)).
    pub fn read_block(&self, c0: usize, s0: usize, rows: usize, cols: usize, dst: &mut [f32]) {
        assert_eq!(dst.len(), rows * cols, "read_block: {rows}x{cols} block into {} values", dst.len());
        let seq = *self.shape.last().expect("surface has a shape");
        assert!(s0 + cols <= seq, "read_block: positions {s0}..{} past width {seq}", s0 + cols);
        for r in 0..rows {
            self.read_f32_at((c0 + r) * seq + s0, &mut dst[r * cols..(r + 1) * cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An fp32 surface of the buffer's length hands its values over by exchanging
    /// buffers; `swap_f32` leaves any other surface and buffer untouched, `take_f32`
    /// copies from it.
    #[test]
    fn swap_and_take_hand_over_fp32_values_of_the_same_length() {
        let mut s = Surface::from_f32(DType::Fp32, &[1, 2, 1, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut buf = vec![9.0; 6];
        assert!(s.swap_f32(&mut buf));
        assert_eq!((buf, s.to_f32()), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![9.0; 6]));
        let mut short = vec![0.0; 5];
        assert!(!s.swap_f32(&mut short));
        assert_eq!((short, s.to_f32()), (vec![0.0; 5], vec![9.0; 6]));
        let mut h = Surface::from_f32(DType::Fp16, &[1, 1, 1, 2], &[1.0, 2.0]);
        let mut two = vec![0.0; 2];
        assert!(!h.swap_f32(&mut two));
        assert_eq!((&two, h.to_f32()), (&vec![0.0; 2], vec![1.0, 2.0]));
        // take_f32: the exchange where it can, a copy where it cannot.
        h.take_f32(&mut two);
        assert_eq!((two, h.to_f32()), (vec![1.0, 2.0], vec![1.0, 2.0]));
        let mut six = vec![7.0; 6];
        s.take_f32(&mut six);
        assert_eq!((six, s.to_f32()), (vec![9.0; 6], vec![7.0; 6]));
    }

    /// Blocks and runs large enough to be copied by several threads land where the
    /// one-element-at-a-time definition puts them, in both dtypes.
    #[test]
    fn large_copies_match_the_definition() {
        let (channels, width, c0, s0, rows, cols) = (700, 1100, 50, 40, 600, 1000);
        assert!(rows * cols >= PAR_COPY);
        let block: Vec<f32> = (0..rows * cols).map(|i| (i % 1999) as f32 - 999.0).collect();
        for dtype in [DType::Fp32, DType::Fp16] {
            let mut s = Surface::from_f32(dtype, &[1, channels, 1, width], &vec![0.25; channels * width]);
            s.write_block(c0, s0, rows, cols, &block);
            let all = s.to_f32();
            for c in 0..channels {
                for p in 0..width {
                    let inside = (c0..c0 + rows).contains(&c) && (s0..s0 + cols).contains(&p);
                    let want = if inside { block[(c - c0) * cols + p - s0] } else { 0.25 };
                    assert_eq!(all[c * width + p], want, "{dtype:?}: channel {c}, position {p}");
                }
            }
            let mut back = vec![0.0; rows * cols];
            s.read_block(c0, s0, rows, cols, &mut back);
            assert_eq!(back, block, "{dtype:?}");
            let run: Vec<f32> = (0..PAR_COPY + 123).map(|i| (i % 777) as f32).collect();
            s.write_f32_at(5, &run);
            let mut got = vec![0.0; run.len()];
            s.read_f32_at(5, &mut got);
            assert_eq!(got, run, "{dtype:?}");
            assert_eq!(s.to_f32()[4], 0.25, "{dtype:?}: the element before the run is untouched");
        }
    }

    #[test]
    fn blocks_land_channel_major() {
        let mut s = Surface::activation(DType::Fp32, 3, 5);
        s.write_block(1, 2, 2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let v = s.to_f32();
        assert_eq!(&v[5..10], &[0.0, 0.0, 1.0, 2.0, 3.0]);
        assert_eq!(&v[10..15], &[0.0, 0.0, 4.0, 5.0, 6.0]);
        let mut back = [0.0; 6];
        s.read_block(1, 2, 2, 3, &mut back);
        assert_eq!(back, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    /// Against the definition by search: the smallest width ≥ `w` that is 32 times an
    /// odd number; and the dynamic-weight widths the benchmark measured.
    #[test]
    fn padded_widths_are_the_next_odd_multiple_of_32() {
        for w in 1..5000 {
            let want = (w..).find(|p| p % 32 == 0 && (p / 32) % 2 == 1).unwrap();
            assert_eq!(padded_width(w), want, "width {w}");
        }
        assert_eq!(padded_width(256 + 768), 1056);
        assert_eq!(padded_width(256 + 288), 544);
        assert_eq!(padded_width(1024 + 2 * 2048), 5152);
    }

    #[test]
    fn fp16_surfaces_round() {
        let s = Surface::from_f32(DType::Fp16, &[1, 1, 1, 2], &[1.0 / 3.0, 70000.0]);
        let v = s.to_f32();
        assert_eq!(v[0], f16::from_f32(1.0 / 3.0).to_f32());
        assert!(v[1].is_infinite());
    }
}

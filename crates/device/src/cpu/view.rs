//! Strided views: how the CPU device makes `reshape`, `transpose`, the slices,
//! `expand_dims`, `squeeze`, `split` and `identity` free. A value is a window on some
//! storage — element `idx` lives at `offset + Σ idx[d]·strides[d]` — and those ops only
//! compute a new window at compile time. Nothing is copied unless a consumer needs a
//! layout the window cannot describe (a reshape across non-mergeable axes), and then the
//! planner inserts one copy.

/// Index of a storage (an input surface, an output surface, a constant, a temporary).
pub(crate) type StorageId = usize;

/// A window on a storage. Strides are in elements and may be 0 (broadcast) or negative
/// (reversed slices); `offset` is where element `[0, 0, …]` lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct View {
    pub storage: StorageId,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub strides: Vec<isize>,
}

/// Row-major strides of a packed tensor.
pub(crate) fn packed_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for d in (0..shape.len()).rev() {
        strides[d] = acc;
        acc *= shape[d] as isize;
    }
    strides
}

impl View {
    /// The whole of a packed storage (or a packed region starting at `offset`).
    pub fn packed(storage: StorageId, offset: usize, shape: &[usize]) -> View {
        View { storage, offset, shape: shape.to_vec(), strides: packed_strides(shape) }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the window is a packed row-major block (size-1 axes may have any stride).
    pub fn is_packed(&self) -> bool {
        let mut expect = 1isize;
        for d in (0..self.shape.len()).rev() {
            if self.shape[d] == 1 {
                continue;
            }
            if self.strides[d] != expect {
                return false;
            }
            expect *= self.shape[d] as isize;
        }
        true
    }

    /// The same elements with another shape, without copying, if the strides allow it
    /// (NumPy's "attempt no-copy reshape": axes merged or split must be contiguous
    /// with respect to each other). `None` means a copy is needed first.
    pub fn reshape(&self, new_shape: &[usize]) -> Option<View> {
        let numel = self.numel();
        debug_assert_eq!(numel, new_shape.iter().product::<usize>());
        if numel == 0 || self.is_packed() {
            return Some(View {
                storage: self.storage,
                offset: self.offset,
                shape: new_shape.to_vec(),
                strides: packed_strides(new_shape),
            });
        }
        // Size-1 axes carry no layout information: drop them from the old window.
        let (old_dims, old_strides): (Vec<usize>, Vec<isize>) =
            self.shape.iter().zip(&self.strides).filter(|(&d, _)| d != 1).map(|(&d, &s)| (d, s)).unzip();
        let mut new_strides = vec![0isize; new_shape.len()];
        let (mut oi, mut oj, mut ni, mut nj) = (0, 1, 0, 1);
        while ni < new_shape.len() && oi < old_dims.len() {
            let mut np = new_shape[ni];
            let mut op = old_dims[oi];
            while np != op {
                if np < op {
                    np *= new_shape[nj];
                    nj += 1;
                } else {
                    op *= old_dims[oj];
                    oj += 1;
                }
            }
            // The old axes oi..oj become the new axes ni..nj: they must be contiguous.
            for ok in oi..oj - 1 {
                if old_strides[ok] != old_strides[ok + 1] * old_dims[ok + 1] as isize {
                    return None;
                }
            }
            new_strides[nj - 1] = old_strides[oj - 1];
            for nk in (ni + 1..nj).rev() {
                new_strides[nk - 1] = new_strides[nk] * new_shape[nk] as isize;
            }
            ni = nj;
            nj += 1;
            oi = oj;
            oj += 1;
        }
        // Trailing size-1 axes of the new shape: any stride will do.
        let last = if ni >= 1 { new_strides[ni - 1] } else { 1 };
        for s in new_strides.iter_mut().skip(ni) {
            *s = last;
        }
        Some(View { storage: self.storage, offset: self.offset, shape: new_shape.to_vec(), strides: new_strides })
    }

    /// Axes reordered: result axis `i` is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> View {
        View {
            storage: self.storage,
            offset: self.offset,
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
        }
    }

    /// A strided sub-window: on axis `d`, `extent[d]` elements from `start[d]`, every
    /// `step[d]`-th (negative steps walk backwards).
    pub fn slice(&self, start: &[usize], step: &[i64], extent: &[usize]) -> View {
        let mut offset = self.offset as isize;
        for d in 0..self.shape.len() {
            if extent[d] > 0 {
                offset += start[d] as isize * self.strides[d];
            }
        }
        View {
            storage: self.storage,
            offset: if self.shape.iter().zip(extent).any(|(_, &e)| e == 0) { self.offset } else { offset as usize },
            shape: extent.to_vec(),
            strides: self.strides.iter().zip(step).map(|(&s, &st)| s * st as isize).collect(),
        }
    }

    /// The window with the given axes (size 1) removed.
    pub fn drop_axes(&self, axes: &[usize]) -> View {
        let kept = || (0..self.shape.len()).filter(|d| !axes.contains(d));
        View {
            storage: self.storage,
            offset: self.offset,
            shape: kept().map(|d| self.shape[d]).collect(),
            strides: kept().map(|d| self.strides[d]).collect(),
        }
    }

    /// The window seen with `shape` (NumPy broadcasting: leading axes added, size-1 axes
    /// stretched with stride 0). The caller has checked that the shapes broadcast.
    pub fn broadcast_to(&self, shape: &[usize]) -> View {
        let lead = shape.len() - self.shape.len();
        let mut strides = vec![0isize; shape.len()];
        for d in 0..self.shape.len() {
            strides[lead + d] = if self.shape[d] == 1 && shape[lead + d] != 1 { 0 } else { self.strides[d] };
        }
        View { storage: self.storage, offset: self.offset, shape: shape.to_vec(), strides }
    }

    /// Address (in elements from the storage start) of a multi-index.
    #[cfg(test)]
    pub fn address(&self, idx: &[usize]) -> usize {
        let mut at = self.offset as isize;
        for (i, s) in idx.iter().zip(&self.strides) {
            at += *i as isize * s;
        }
        at as usize
    }
}

/// The addresses a window touches, as `lo..hi` (empty for an empty shape): the planner
/// checks every step's windows against their storages before a kernel exists.
pub(crate) fn span(offset: usize, shape: &[usize], strides: &[isize]) -> (isize, isize) {
    if shape.contains(&0) {
        return (offset as isize, offset as isize);
    }
    let (mut lo, mut hi) = (offset as isize, offset as isize);
    for (&d, &s) in shape.iter().zip(strides) {
        let reach = (d as isize - 1) * s;
        if reach < 0 {
            lo += reach;
        } else {
            hi += reach;
        }
    }
    (lo, hi + 1)
}

/// Several windows walked together over one shape, with the shape simplified: size-1
/// axes dropped and neighbouring axes merged wherever every operand is contiguous across
/// them. `[1, C, 1, S] + [1, C, 1, 1]` becomes shape `[C, S]`, strides `[S, 1]` and
/// `[1, 0]`: one broadcast row per channel, which the element loops vectorise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Coalesced {
    pub shape: Vec<usize>,
    pub strides: Vec<Vec<isize>>,
}

pub(crate) fn coalesce(shape: &[usize], strides: &[&[isize]]) -> Coalesced {
    let mut out_shape: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<isize>> = vec![Vec::new(); strides.len()];
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        let mergeable = !out_shape.is_empty()
            && strides.iter().zip(&out_strides).all(|(s, o)| *o.last().unwrap() == s[d] * shape[d] as isize);
        if mergeable {
            *out_shape.last_mut().unwrap() *= shape[d];
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                *o.last_mut().unwrap() = s[d];
            }
        } else {
            out_shape.push(shape[d]);
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o.push(s[d]);
            }
        }
    }
    if out_shape.is_empty() {
        out_shape.push(1);
        for o in out_strides.iter_mut() {
            o.push(0);
        }
    }
    Coalesced { shape: out_shape, strides: out_strides }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_weight_slice_reshapes_without_copy() {
        // x: [1, IC=4, 1, S+OC=3+5]; the weight block is positions 3..8.
        let x = View::packed(0, 0, &[1, 4, 1, 8]);
        let w = x.slice(&[0, 0, 0, 3], &[1, 1, 1, 1], &[1, 4, 1, 5]);
        let w2 = w.reshape(&[4, 5]).expect("mergeable");
        assert_eq!(w2.offset, 3);
        assert_eq!(w2.strides, vec![8, 1]);
        let wt = w2.permute(&[1, 0]);
        assert_eq!(wt.strides, vec![1, 8]);
        assert_eq!(wt.address(&[2, 3]), 3 + 3 * 8 + 2);
    }

    #[test]
    fn reshape_refuses_what_needs_a_copy() {
        let t = View::packed(0, 0, &[4, 6]).permute(&[1, 0]); // [6, 4], strides [1, 6]
        assert!(t.reshape(&[24]).is_none());
        // Splitting an axis is always possible.
        let s = t.reshape(&[2, 3, 4]).unwrap();
        assert_eq!(s.strides, vec![3, 1, 6]);
    }

    #[test]
    fn coalescing_merges_contiguous_axes() {
        let c = coalesce(&[1, 8, 1, 16], &[&[128, 16, 16, 1], &[8, 1, 1, 0]]);
        assert_eq!(c.shape, vec![8, 16]);
        assert_eq!(c.strides, vec![vec![16, 1], vec![1, 0]]);
        let c = coalesce(&[2, 3, 4], &[&[12, 4, 1]]);
        assert_eq!(c.shape, vec![24]);
    }
}

//! How a kernel's inputs and outputs map onto IOSurfaces: the order the ANE binds them
//! in, and how large each allocation must be. Every publicly reported binding rule is
//! applied here and nowhere else, so a rule that turns out wrong is one switch in
//! [`BindingRules`] (and the `io-order` probe can compare both settings on a Mac).
//!
//! Also the byte copies between a [`Surface`] and a locked IOSurface's memory, which
//! respect the IOSurface's bytes-per-row.

use mil::Var;

use crate::{Error, ErrorKind, Result, Surface};

/// The smallest allocation reported to evaluate: 48 KiB (49152 bytes). Smaller surfaces
/// reportedly fail at eval with status 0x1d. Reported publicly by the 2026 ANE training
/// experiments (the Orion paper, constraint #4: "~49 KB"); disputed by others.
pub const MIN_ALLOC_BYTES: usize = mil::lint::MIN_SURFACE_BYTES;

/// Allocations are rounded up to this. Reported publicly by the 2026 ANE training
/// experiments (the seed repository's M5 notes: "all IOSurface buffers use 128-byte
/// alignment"); harmless on chips that do not need it.
pub const ALLOC_ALIGN_BYTES: usize = 128;

/// The binding rules in force. [`Default`] applies every reported rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingRules {
    /// Surfaces are bound in alphabetical (byte-wise) order of their MIL names, not in
    /// declaration order. Reported publicly by the 2026 ANE training experiments (Orion
    /// paper, constraints #3 for outputs and #19 for inputs: "silent wrong data"
    /// otherwise); disputed by others, whose single-input kernels never see it.
    pub alphabetical_order: bool,
    /// All inputs share one allocation size (the largest), and so do all outputs.
    /// Reported publicly by the 2026 ANE training experiments (Orion paper, constraints
    /// #2 and #18: status 0x1d at eval otherwise); disputed by others.
    pub equal_sizes: bool,
    /// No allocation is smaller than this (see [`MIN_ALLOC_BYTES`]).
    pub min_alloc_bytes: usize,
    /// Allocations are a multiple of this (see [`ALLOC_ALIGN_BYTES`]); 1 for none.
    pub align_bytes: usize,
}

impl Default for BindingRules {
    fn default() -> BindingRules {
        BindingRules {
            alphabetical_order: true,
            equal_sizes: true,
            min_alloc_bytes: MIN_ALLOC_BYTES,
            align_bytes: ALLOC_ALIGN_BYTES,
        }
    }
}

impl BindingRules {
    /// No reported rule: declaration order, each surface exactly its data's size.
    pub fn none() -> BindingRules {
        BindingRules { alphabetical_order: false, equal_sizes: false, min_alloc_bytes: 0, align_bytes: 1 }
    }

    /// What training and decoding use: each surface exactly its data's size (as the
    /// seed's working bridge allocates them), aligned to [`ALLOC_ALIGN_BYTES`], several
    /// surfaces bound in declaration order or, with `alphabetical_order`, in
    /// alphabetical order (the io-convention probe decides which). Kernels with the
    /// packed convention have one input and one output, so the order does not arise.
    pub fn exact(alphabetical_order: bool) -> BindingRules {
        BindingRules { alphabetical_order, equal_sizes: false, min_alloc_bytes: 0, align_bytes: ALLOC_ALIGN_BYTES }
    }
}

/// One input or output surface of a kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The MIL name of the value.
    pub name: String,
    /// Its position in the function's declaration (and in `Kernel::eval`'s arguments).
    pub declared: usize,
    /// Bytes of packed data: elements × dtype size. The data always starts at byte 0:
    /// the ANE reportedly reads the flat buffer as packed `[1, C, 1, S]` whatever the
    /// allocation (Orion paper, constraint #20).
    pub data_bytes: usize,
    /// Bytes to allocate for its IOSurface.
    pub alloc_bytes: usize,
}

/// Inputs and outputs in the order the ANE binds them: `inputs[i]` is the surface passed
/// at index `i` of the request's `inputs:` array (with `inputIndices:` `@[@0 … @(n-1)]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SurfacePlan {
    pub inputs: Vec<Slot>,
    pub outputs: Vec<Slot>,
}

impl SurfacePlan {
    /// The plan for a kernel declaring `inputs` and `outputs` (in declaration order).
    pub fn new(inputs: &[Var], outputs: &[Var], rules: &BindingRules) -> SurfacePlan {
        SurfacePlan { inputs: group(inputs, rules), outputs: group(outputs, rules) }
    }
}

fn group(vars: &[Var], rules: &BindingRules) -> Vec<Slot> {
    let mut slots: Vec<Slot> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let data_bytes = v.ty.numel() * v.ty.dtype.size_bytes();
            Slot { name: v.name.clone(), declared: i, data_bytes, alloc_bytes: alloc_size(data_bytes, rules) }
        })
        .collect();
    if rules.alphabetical_order {
        // Byte-wise, as C's strcmp: `B` sorts before `a`. A stable sort, so equal names
        // (which validation rejects anyway) keep declaration order.
        slots.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    }
    if rules.equal_sizes {
        let max = slots.iter().map(|s| s.alloc_bytes).max().unwrap_or(0);
        slots.iter_mut().for_each(|s| s.alloc_bytes = max);
    }
    slots
}

/// The allocation for `data_bytes` of packed data under `rules`.
pub fn alloc_size(data_bytes: usize, rules: &BindingRules) -> usize {
    data_bytes.max(rules.min_alloc_bytes).max(1).next_multiple_of(rules.align_bytes.max(1))
}

/// Where a locked IOSurface's bytes are: `rows` rows of `row_bytes` usable bytes each,
/// `bytes_per_row` apart (bytes-per-row may exceed the width: padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    pub row_bytes: usize,
    pub bytes_per_row: usize,
    pub rows: usize,
}

impl RowLayout {
    /// One row holding all of `len` bytes (the layout [`super::ns::surface_properties`] asks for).
    pub fn flat(len: usize) -> RowLayout {
        RowLayout { row_bytes: len, bytes_per_row: len, rows: 1 }
    }

    /// Usable bytes: what the packed stream may fill.
    pub fn capacity(&self) -> usize {
        self.row_bytes * self.rows
    }

    /// Checks that memory of `len` bytes holds this layout.
    fn check(&self, len: usize, what: &str) -> Result<()> {
        let needed = if self.rows == 0 { 0 } else { (self.rows - 1) * self.bytes_per_row + self.row_bytes };
        if self.bytes_per_row < self.row_bytes || needed > len {
            return Err(Error::new(
                ErrorKind::Binding,
                format!(
                    "{what}: IOSurface layout of {} rows × {} bytes, {} bytes per row, does not fit its {len}-byte \
                     allocation",
                    self.rows, self.row_bytes, self.bytes_per_row
                ),
            ));
        }
        Ok(())
    }
}

/// Copies `packed` into IOSurface memory `dst` laid out as `layout`, from byte 0,
/// continuing row by row; bytes past the data are left as they are.
pub fn write_rows(packed: &[u8], dst: &mut [u8], layout: RowLayout, what: &str) -> Result<()> {
    layout.check(dst.len(), what)?;
    if packed.len() > layout.capacity() {
        return Err(too_small(what, packed.len(), layout));
    }
    for (r, chunk) in packed.chunks(layout.row_bytes.max(1)).enumerate() {
        let at = r * layout.bytes_per_row;
        dst[at..at + chunk.len()].copy_from_slice(chunk);
    }
    Ok(())
}

/// Copies `packed.len()` bytes out of IOSurface memory `src` laid out as `layout`.
pub fn read_rows(src: &[u8], layout: RowLayout, packed: &mut [u8], what: &str) -> Result<()> {
    layout.check(src.len(), what)?;
    if packed.len() > layout.capacity() {
        return Err(too_small(what, packed.len(), layout));
    }
    for (r, chunk) in packed.chunks_mut(layout.row_bytes.max(1)).enumerate() {
        let at = r * layout.bytes_per_row;
        chunk.copy_from_slice(&src[at..at + chunk.len()]);
    }
    Ok(())
}

fn too_small(what: &str, len: usize, layout: RowLayout) -> Error {
    Error::new(
        ErrorKind::Binding,
        format!("{what}: {len} bytes of data do not fit the IOSurface's {} usable bytes", layout.capacity()),
    )
}

/// The surface's elements as packed little-endian bytes (fp16 or fp32), appended to `out`
/// after clearing it. The buffer is reused across evals.
pub fn surface_bytes(s: &Surface, out: &mut Vec<u8>) {
    out.clear();
    if let Some(v) = s.as_f16() {
        out.reserve(v.len() * 2);
        v.iter().for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes()));
    } else if let Some(v) = s.as_f32() {
        out.reserve(v.len() * 4);
        v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
}

/// Fills the surface from packed little-endian bytes of its own dtype; `bytes` must be
/// exactly its [`Surface::byte_len`].
pub fn fill_surface(s: &mut Surface, bytes: &[u8]) -> Result<()> {
    if bytes.len() != s.byte_len() {
        return Err(Error::new(
            ErrorKind::Binding,
            format!("{} bytes given for a surface of {} bytes", bytes.len(), s.byte_len()),
        ));
    }
    if let Some(v) = s.as_f16_mut() {
        for (d, b) in v.iter_mut().zip(bytes.chunks_exact(2)) {
            *d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
        }
    } else if let Some(v) = s.as_f32_mut() {
        for (d, b) in v.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    Ok(())
}

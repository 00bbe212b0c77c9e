//! How a kernel's values sit in its surfaces, and the one place the host packs inputs
//! and unpacks outputs.
//!
//! A kernel generator ([`crate::kernels`]) declares named blocks (an activation, a
//! weight matrix) and named outputs as it builds the program; it records where each one
//! lands in a [`KernelIo`] at the same moment, so offsets are derived from the program
//! and never written twice. Two conventions ([`IoConvention`]):
//!
//! - **Packed** (the default, for every device): one input surface `[1, C, 1, W]` holding
//!   every block side by side on the spatial axis (`C` the most rows any block has), and
//!   one output surface, all outputs concatenated on the channel axis (or, when their
//!   channels agree and their widths do not, on the spatial axis). This is how the seed
//!   experiments' working dynamic pipeline runs on the ANE: its README reports that
//!   "multi-input ANE requests cause 0x1d error; inputs packed into spatial dimension
//!   instead" (maderix/ANE, README, limitations).
//! - **Multi**: one input surface per declared group of blocks and one output surface
//!   per output, as anetrain first did. Kept for probes and for chips where it is shown
//!   to work (`anetrain probe io-convention`); which order the ANE binds several
//!   surfaces in is the device's business (`device::ane::binding::BindingRules`).

use device::Surface;
use mil::Dialect;

/// How a kernel's inputs and outputs map to surfaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoConvention {
    /// One input surface, one output surface (the seed's working convention).
    #[default]
    Packed,
    /// One surface per declared input group and per output.
    Multi,
}

impl IoConvention {
    /// The name used on the command line and in probe reports.
    pub fn name(self) -> &'static str {
        match self {
            IoConvention::Packed => "packed",
            IoConvention::Multi => "multi",
        }
    }

    /// Parses [`IoConvention::name`].
    pub fn parse(s: &str) -> Option<IoConvention> {
        match s {
            "packed" => Some(IoConvention::Packed),
            "multi" => Some(IoConvention::Multi),
            _ => None,
        }
    }
}

impl std::fmt::Display for IoConvention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a generator emits for: the MIL dialect and the I/O convention. A bare
/// [`Dialect`] converts to the packed convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub dialect: Dialect,
    pub io: IoConvention,
}

impl Target {
    pub fn new(dialect: Dialect, io: IoConvention) -> Target {
        Target { dialect, io }
    }
}

impl From<Dialect> for Target {
    fn from(dialect: Dialect) -> Target {
        Target { dialect, io: IoConvention::Packed }
    }
}

/// One named block of an input surface: `rows` channels × `width` positions at position
/// `s0` (rows `0..rows`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub name: &'static str,
    pub rows: usize,
    pub s0: usize,
    pub width: usize,
}

/// One input surface `[1, channels, 1, width]` of a kernel and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SurfaceLayout {
    pub name: String,
    pub channels: usize,
    pub width: usize,
    pub blocks: Vec<Block>,
}

impl SurfaceLayout {
    /// The block with this name, if this surface holds it.
    pub fn find(&self, name: &str) -> Option<&Block> {
        self.blocks.iter().find(|b| b.name == name)
    }

    /// The block with this name. Panics on an unknown name: layouts are fixed by the
    /// generator, so a miss is a bug in the caller, not a user error.
    pub fn block(&self, name: &str) -> &Block {
        self.find(name).unwrap_or_else(|| panic!("surface `{}` has no block `{name}`", self.name))
    }
}

/// Where one output of a kernel lands: rows `c0..c0 + channels`, positions
/// `s0..s0 + width` of output surface `surface`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSlot {
    pub name: String,
    pub surface: usize,
    pub c0: usize,
    pub channels: usize,
    pub s0: usize,
    pub width: usize,
}

/// The shape of one output surface, `[1, channels, 1, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputSurface {
    pub channels: usize,
    pub width: usize,
}

/// Every surface of a kernel: the input layouts in binding order, the output slots in
/// declaration order, and the output surfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelIo {
    pub convention: IoConvention,
    pub inputs: Vec<SurfaceLayout>,
    pub outputs: Vec<OutputSlot>,
    pub output_surfaces: Vec<OutputSurface>,
}

impl KernelIo {
    /// The input surface holding block `name`, and the block. Panics on an unknown name
    /// (a bug in the caller: layouts are fixed by the generator).
    pub fn block(&self, name: &str) -> (usize, &Block) {
        self.inputs
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.find(name).map(|b| (i, b)))
            .unwrap_or_else(|| panic!("no input block `{name}`"))
    }

    /// The output slot `name`. Panics on an unknown name, as [`KernelIo::block`].
    pub fn output(&self, name: &str) -> &OutputSlot {
        self.outputs.iter().find(|o| o.name == name).unwrap_or_else(|| panic!("no output `{name}`"))
    }

    /// Writes a `[rows, width]` row-major matrix into block `name`.
    pub fn write(&self, surfaces: &mut [Surface], name: &str, data: &[f32]) {
        let (i, b) = self.block(name);
        surfaces[i].write_block(0, b.s0, b.rows, b.width, data);
    }

    /// Writes `data` (`[rows, cols]` row-major, `cols ≤ width`) at column `col` of block
    /// `name`.
    pub fn write_at(&self, surfaces: &mut [Surface], name: &str, col: usize, rows: usize, cols: usize, data: &[f32]) {
        let (i, b) = self.block(name);
        debug_assert!(rows <= b.rows && col + cols <= b.width, "block `{name}` is {}×{}", b.rows, b.width);
        surfaces[i].write_block(0, b.s0 + col, rows, cols, data);
    }

    /// Output `name` as a `[channels, width]` row-major matrix in `dst` (resized).
    pub fn read(&self, surfaces: &[Surface], name: &str, dst: &mut Vec<f32>) {
        let o = self.output(name);
        dst.resize(o.channels * o.width, 0.0);
        self.read_into(surfaces, name, dst);
    }

    /// Output `name` as a `[channels, width]` row-major matrix in `dst`, which must have
    /// exactly that length.
    pub fn read_into(&self, surfaces: &[Surface], name: &str, dst: &mut [f32]) {
        let o = self.output(name);
        assert_eq!(dst.len(), o.channels * o.width, "output `{name}` is {}×{}", o.channels, o.width);
        surfaces[o.surface].read_block(o.c0, o.s0, o.channels, o.width, dst);
    }

    /// Output `name` into `dst`, without a copy where the output has a surface of its
    /// own ([`Surface::take_f32`]); else as [`KernelIo::read`].
    pub fn take(&self, surfaces: &mut [Surface], name: &str, dst: &mut Vec<f32>) {
        let o = self.output(name);
        let whole = self.output_surfaces[o.surface];
        if o.c0 == 0 && o.s0 == 0 && o.channels == whole.channels && o.width == whole.width {
            surfaces[o.surface].take_f32(dst);
        } else {
            self.read(surfaces, name, dst);
        }
    }

    /// Output `name` as a slice of its surface, when the surface is fp32 and the output
    /// is a contiguous run of it (a channel range of full width): no copy.
    pub fn view<'s>(&self, surfaces: &'s [Surface], name: &str) -> Option<&'s [f32]> {
        let o = self.output(name);
        let whole = self.output_surfaces[o.surface];
        if o.s0 != 0 || o.width != whole.width {
            return None;
        }
        let data = surfaces[o.surface].as_f32()?;
        Some(&data[o.c0 * whole.width..(o.c0 + o.channels) * whole.width])
    }
}

//! Reading and writing `.npy` arrays (float32 and float16, C order) with `npyz`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use half::f16;
use mil::DType;
use npyz::WriterBuilder;

/// A dense array read from a `.npy` file, as f32 whatever its stored dtype.
pub struct Array {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).with_context(|| format!("{}: not a .npy file", path.display()))?;
    if npy.order() != npyz::Order::C {
        bail!("{}: Fortran-order arrays are not supported; save it in C order", path.display());
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => bail!("{}: dtype {other:?} is not supported: use float32 or float16", path.display()),
    };
    let (dtype, data) = match descr.as_str() {
        "<f4" => (DType::Fp32, npy.into_vec::<f32>().with_context(|| format!("{}: bad float32 data", path.display()))?),
        "<f2" => {
            let v = npy.into_vec::<f16>().with_context(|| format!("{}: bad float16 data", path.display()))?;
            (DType::Fp16, v.into_iter().map(f16::to_f32).collect())
        }
        other => bail!("{}: dtype `{other}` is not supported: use float32 or float16 (little-endian)", path.display()),
    };
    Ok(Array { dtype, shape, data })
}

pub fn write(path: &Path, dtype: DType, shape: &[usize], data: &[f32]) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = std::io::BufWriter::new(file);
    match dtype {
        DType::Fp16 => {
            let mut out = npyz::WriteOptions::<f16>::new().default_dtype().shape(&shape).writer(&mut w).begin_nd()?;
            out.extend(data.iter().map(|&x| f16::from_f32(x)))?;
            out.finish()?;
        }
        _ => {
            let mut out = npyz::WriteOptions::<f32>::new().default_dtype().shape(&shape).writer(&mut w).begin_nd()?;
            out.extend(data.iter().copied())?;
            out.finish()?;
        }
    }
    Ok(())
}

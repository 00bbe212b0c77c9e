//! Choosing and opening a device from the command line.

use anyhow::Result;
use clap::ValueEnum;
use device::ane::binding::BindingRules;
use device::{cpu::CpuDevice, Device, Precision};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU device (any machine).
    Cpu,
    /// The Apple Neural Engine (macOS on Apple Silicon).
    Ane,
    /// The ANE where there is one, else the CPU.
    Auto,
}

/// Opens the device asked for (the ANE with exact-size surfaces: the kernels have one
/// packed input and output each, see `train::binding`). `ane` where there is none is a system error (exit 2);
/// `auto` falls back to the CPU and says so on stderr.
pub fn open_device(which: DeviceArg, precision: Precision) -> Result<Box<dyn Device>> {
    match which {
        DeviceArg::Cpu => Ok(Box::new(CpuDevice::new(precision))),
        DeviceArg::Ane => Ok(Box::new(device::ane::AneDevice::open()?.with_binding(BindingRules::exact(false)))),
        DeviceArg::Auto => match device::ane::AneDevice::open() {
            Ok(ane) => Ok(Box::new(ane.with_binding(BindingRules::exact(false)))),
            Err(e) => {
                if std::env::var_os("ANETRAIN_QUIET").is_none() {
                    eprintln!("note: {e}; using the CPU device");
                }
                Ok(Box::new(CpuDevice::new(precision)))
            }
        },
    }
}

//! Opening the device a user asked for, or refusing: never a silent fallback to the CPU.

use crate::error::{Error, Result};
use candle_core::Device;

/// The device as the user named it, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::field(
                "command line",
                "--device",
                format!("{s:?}"),
                "expected cpu, cuda or cuda:N",
            )
        };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }

    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => open_cuda(n),
        }
    }

    pub fn label(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| {
        Error::field(
            "command line",
            "--device",
            format!("cuda:{n}"),
            format!("cannot open this CUDA device: {e}"),
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    Err(Error::field(
        "command line",
        "--device",
        format!("cuda:{n}"),
        "this truesize was built without CUDA; rebuild with `cargo build --release --features cuda` \
         (needs the CUDA toolkit, see scripts/check-cuda.sh)",
    ))
}

/// Free memory of a GPU, for the preflight; `None` when it cannot be read.
#[cfg(feature = "cuda")]
pub fn free_bytes(device: &Device) -> Option<u64> {
    super::cuda::free_bytes(device).ok()
}

#[cfg(not(feature = "cuda"))]
pub fn free_bytes(_device: &Device) -> Option<u64> {
    None
}

/// The memory probe of a non-CPU device.
#[cfg(feature = "cuda")]
pub fn cuda_probe(device: &Device) -> Result<Box<dyn super::probe::MemoryProbe>> {
    Ok(Box::new(super::cuda::CudaProbe::new(device)?))
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_probe(_device: &Device) -> Result<Box<dyn super::probe::MemoryProbe>> {
    Err(Error::Usage(
        "no memory probe for this device in a build without CUDA".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_devices() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:7").unwrap(), DeviceSpec::Cuda(7));
        assert!(DeviceSpec::parse("gpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }
}

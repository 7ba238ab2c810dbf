//! What this machine can run: GPUs (NVML, loaded at run time), CPU, memory, disk, and the
//! backends this binary was built with.
//!
//! NVML is `dlopen`ed when capabilities are read, so the same binary runs where the NVIDIA
//! driver is absent; the report then says CPU-only and why.

use std::ffi::OsStr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One NVIDIA GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML index.
    pub index: u32,
    /// Marketing name.
    pub name: String,
    /// Stable identifier (`GPU-…`).
    pub uuid: String,
    /// Memory in bytes.
    pub memory_total: u64,
    /// Free memory in bytes when read.
    pub memory_free: u64,
    /// CUDA compute capability, `major.minor`.
    pub compute_capability: String,
}

/// What the GPU probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuReport {
    /// NVML answered.
    Nvidia {
        /// Driver version.
        driver: String,
        /// The GPUs (possibly none).
        gpus: Vec<Gpu>,
    },
    /// No GPU is usable; the reason says why (library not found, driver error, ...).
    CpuOnly {
        /// Why.
        reason: String,
    },
}

/// The CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// Model name (`/proc/cpuinfo`), or the architecture when unknown.
    pub model: String,
    /// Logical cores available to this process.
    pub cores: usize,
    /// SIMD features the CPU has that candle's kernels use.
    pub simd: Vec<String>,
    /// SIMD features this binary was compiled to use (candle picks kernels at build time).
    pub simd_built: Vec<String>,
}

/// Everything the hive reports about its machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// GPUs, or why there are none.
    pub gpu: GpuReport,
    /// The CPU.
    pub cpu: Cpu,
    /// RAM in bytes.
    pub ram_total: u64,
    /// RAM available for new allocations, in bytes.
    pub ram_available: u64,
    /// Free bytes on the model store's file system.
    pub disk_free: u64,
    /// Backends compiled into this binary (`cpu`, `cuda`, `metal`).
    pub backends: Vec<String>,
}

/// The NVML library name the loader looks for by default.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// Reads the capabilities; `nvml_library` overrides the NVML library path (tests, odd
/// installs); `store` is where models are kept (for free disk).
pub fn probe(nvml_library: Option<&OsStr>, store: &Path) -> Capabilities {
    let (ram_total, ram_available) = probe_memory().unwrap_or((0, 0));
    Capabilities {
        gpu: probe_gpus(nvml_library),
        cpu: cpu(),
        ram_total,
        ram_available,
        disk_free: free_disk(store).unwrap_or(0),
        backends: built_backends(),
    }
}

/// GPUs through NVML.
pub fn probe_gpus(nvml_library: Option<&OsStr>) -> GpuReport {
    let mut builder = nvml_wrapper::Nvml::builder();
    if let Some(path) = nvml_library {
        builder.lib_path(path);
    }
    let library = nvml_library
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| NVML_LIBRARY.into());
    let nvml = match builder.init() {
        Ok(nvml) => nvml,
        Err(nvml_wrapper::error::NvmlError::LibloadingError(e)) => {
            return GpuReport::CpuOnly {
                reason: format!("NVML library {library} could not be loaded: {e}"),
            };
        }
        Err(e) => {
            return GpuReport::CpuOnly {
                reason: format!("NVML did not initialise: {e}"),
            };
        }
    };
    let read = || -> Result<GpuReport, nvml_wrapper::error::NvmlError> {
        let driver = nvml.sys_driver_version()?;
        let mut gpus = Vec::new();
        for index in 0..nvml.device_count()? {
            let device = nvml.device_by_index(index)?;
            let memory = device.memory_info()?;
            let cc = device.cuda_compute_capability()?;
            gpus.push(Gpu {
                index,
                name: device.name()?,
                uuid: device.uuid()?,
                memory_total: memory.total,
                memory_free: memory.free,
                compute_capability: format!("{}.{}", cc.major, cc.minor),
            });
        }
        Ok(GpuReport::Nvidia { driver, gpus })
    };
    read().unwrap_or_else(|e| GpuReport::CpuOnly {
        reason: format!("NVML failed to list the GPUs: {e}"),
    })
}

fn built_backends() -> Vec<String> {
    // cuda/metal arrive as cargo features passed through to candle; this build has neither.
    vec!["cpu".into()]
}

fn cpu() -> Cpu {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Cpu {
        model,
        cores,
        simd: simd_present(),
        simd_built: simd_built(),
    }
}

#[cfg(target_arch = "x86_64")]
fn simd_present() -> Vec<String> {
    let mut found = Vec::new();
    macro_rules! check {
        ($($f:tt),*) => {$(
            if std::arch::is_x86_feature_detected!($f) {
                found.push($f.to_string());
            }
        )*};
    }
    check!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f");
    found
}

#[cfg(not(target_arch = "x86_64"))]
fn simd_present() -> Vec<String> {
    if cfg!(target_feature = "neon") {
        vec!["neon".into()]
    } else {
        Vec::new()
    }
}

fn simd_built() -> Vec<String> {
    let mut built = Vec::new();
    macro_rules! built {
        ($($f:tt),*) => {$(
            if cfg!(target_feature = $f) {
                built.push($f.to_string());
            }
        )*};
    }
    built!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "neon");
    built
}

/// `(MemTotal, MemAvailable)` in bytes from `/proc/meminfo`.
pub fn probe_memory() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// Free bytes for an unprivileged user on the file system holding `path` (or its nearest
/// existing ancestor).
pub fn free_disk(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` is a properly sized
    // out-parameter that statvfs fills on success; it is read only then.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `stat`.
    let stat = unsafe { stat.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit targets).
    #[allow(clippy::unnecessary_cast)]
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_absent_means_cpu_only_with_the_reason() {
        let missing = OsStr::new("/nonexistent/libnvidia-ml.so.1");
        match probe_gpus(Some(missing)) {
            GpuReport::CpuOnly { reason } => {
                assert!(
                    reason.contains("/nonexistent/libnvidia-ml.so.1"),
                    "{reason}"
                );
                assert!(reason.contains("could not be loaded"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_machine_is_described() {
        let dir = tempfile::tempdir().unwrap();
        let caps = probe(None, &dir.path().join("not/yet/created"));
        assert!(caps.cpu.cores >= 1);
        assert!(!caps.cpu.model.is_empty());
        assert!(caps.ram_total >= caps.ram_available && caps.ram_total > 0);
        assert!(caps.disk_free > 0);
        assert_eq!(caps.backends, vec!["cpu".to_string()]);
        #[cfg(target_arch = "x86_64")]
        assert!(
            caps.cpu
                .simd_built
                .iter()
                .all(|f| caps.cpu.simd.contains(f) || f == "neon")
        );
        // Whatever NVML said, it is either GPUs or a reason.
        if let GpuReport::CpuOnly { reason } = &caps.gpu {
            assert!(!reason.is_empty());
        }
    }

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((24_000_000 * 1024, 12_000_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: x kB"), None);
    }
}

//! GPU enumeration: CUDA devices through the driver API (loaded at run time, `cuda` feature) and
//! Metal devices on macOS (`metal` feature). A missing driver means "no GPU", never an error.

use super::GpuInfo;

/// Every GPU of every backend compiled in. Blocking (driver initialisation): run it off the runtime.
pub(crate) fn detect_gpus() -> Vec<GpuInfo> {
    #[allow(unused_mut)] // Without any GPU feature nothing is pushed.
    let mut gpus = Vec::new();
    #[cfg(feature = "cuda")]
    gpus.extend(cuda::detect());
    #[cfg(feature = "metal")]
    gpus.extend(metal_devices::detect());
    gpus
}

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{result, sys};

    use super::super::{Backend, GpuInfo};

    /// CUDA devices visible to this process, or none (with a warning) when the driver is unusable.
    pub(super) fn detect() -> Vec<GpuInfo> {
        if !driver_present() {
            tracing::warn!(
                "this worker was built with CUDA support but the NVIDIA driver library (libcuda) \
                 could not be loaded or initialised, so no CUDA GPU is reported; install the NVIDIA driver or add \
                 its directory to LD_LIBRARY_PATH"
            );
            return Vec::new();
        }
        let count = match result::device::get_count() {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(%error, "cannot count CUDA devices; reporting no CUDA GPU");
                return Vec::new();
            }
        };
        let mut gpus = Vec::new();
        for ordinal in 0..count.max(0) {
            match device(ordinal) {
                Ok(gpu) => gpus.push(gpu),
                Err(error) => {
                    tracing::warn!(ordinal, %error, "cannot query CUDA device; leaving it out")
                }
            }
        }
        tracing::debug!(count = gpus.len(), "CUDA devices detected");
        gpus
    }

    /// Whether the driver library loads and initialises. candle's `cuda` feature links cudarc
    /// with `dynamic-linking` (the binary then cannot start without libcuda, so this is true
    /// whenever it runs); with cudarc's dynamic loading a missing library panics inside cudarc,
    /// which is caught here. (`sys::is_culib_present` exists only with dynamic loading.)
    pub(super) fn driver_present() -> bool {
        matches!(std::panic::catch_unwind(result::init), Ok(Ok(())))
    }

    /// Name, memory and compute capability of device `ordinal`.
    #[allow(unsafe_code)]
    fn device(ordinal: i32) -> Result<GpuInfo, cudarc::driver::DriverError> {
        use sys::CUdevice_attribute::{
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
        };
        let dev = result::device::get(ordinal)?;
        let name = result::device::get_name(dev)?;
        // SAFETY: `dev` was just returned by `cuDeviceGet` after a successful `cuInit`.
        let (memory, major, minor) = unsafe {
            (
                result::device::total_mem(dev)?,
                result::device::get_attribute(dev, MAJOR)?,
                result::device::get_attribute(dev, MINOR)?,
            )
        };
        Ok(GpuInfo {
            backend: Backend::Cuda,
            index: u32::try_from(ordinal).unwrap_or_default(),
            name,
            memory_bytes: u64::try_from(memory).unwrap_or(u64::MAX),
            compute_capability: Some((
                u32::try_from(major).unwrap_or_default(),
                u32::try_from(minor).unwrap_or_default(),
            )),
        })
    }
}

#[cfg(feature = "metal")]
mod metal_devices {
    use super::GpuInfo;

    /// Metal devices: each one's name and the memory Metal lets it use.
    #[cfg(target_os = "macos")]
    pub(super) fn detect() -> Vec<GpuInfo> {
        use super::super::Backend;
        let gpus: Vec<GpuInfo> = metal::Device::all()
            .iter()
            .enumerate()
            .map(|(index, device)| GpuInfo {
                backend: Backend::Metal,
                index: u32::try_from(index).unwrap_or(u32::MAX),
                name: device.name().to_string(),
                // On Apple silicon this is the share of unified memory the GPU may use.
                memory_bytes: device.recommended_max_working_set_size(),
                compute_capability: None,
            })
            .collect();
        if gpus.is_empty() {
            tracing::warn!("this worker was built with Metal support but Metal reports no device");
        }
        gpus
    }

    /// Metal exists only on macOS: report none, with a warning about the build.
    #[cfg(not(target_os = "macos"))]
    pub(super) fn detect() -> Vec<GpuInfo> {
        tracing::warn!(
            os = std::env::consts::OS,
            "this worker was built with the `metal` feature, which only works on macOS; \
             reporting no Metal GPU (build without `--features metal` here)"
        );
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_detection_never_panics_and_matches_the_build() {
        let gpus = detect_gpus();
        for gpu in &gpus {
            assert!(!gpu.name.is_empty());
            assert!(gpu.memory_bytes > 0);
        }
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(gpus.is_empty(), "no GPU backend compiled in: {gpus:?}");
        }
        if !cfg!(target_os = "macos") {
            assert!(gpus
                .iter()
                .all(|g| g.backend != super::super::Backend::Metal));
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_a_driver_warns_and_reports_none() {
        let logs = crate::capabilities::test_http::Logs::default();
        let guard = logs.capture();
        let gpus = cuda::detect();
        drop(guard);
        if cuda::driver_present() {
            // A machine with the NVIDIA driver: every device is a CUDA device with a capability.
            assert!(gpus.iter().all(
                |g| g.backend == super::super::Backend::Cuda && g.compute_capability.is_some()
            ));
        } else {
            assert!(gpus.is_empty());
            let warnings = logs.lines("WARN");
            assert!(
                warnings.iter().any(|l| l.contains("libcuda")),
                "{warnings:#?}"
            );
        }
    }

    #[cfg(all(feature = "metal", not(target_os = "macos")))]
    #[test]
    fn metal_off_macos_warns_and_reports_none() {
        let logs = crate::capabilities::test_http::Logs::default();
        let guard = logs.capture();
        let gpus = metal_devices::detect();
        drop(guard);
        assert!(gpus.is_empty());
        let warnings = logs.lines("WARN");
        assert!(
            warnings.iter().any(|l| l.contains("macOS")),
            "{warnings:#?}"
        );
    }
}

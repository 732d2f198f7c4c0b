//! Choosing the device: `auto`, `cpu`, `cuda` or `cuda:N`.
//!
//! With the default `--as-needed` linking the binary does not keep `libtorch_cuda.so`, and
//! then libtorch reports no CUDA even on a GPU host (DESIGN.md). Loading it by hand before
//! the first query registers the CUDA backend; on a CPU-only host the load fails and is
//! ignored.

use std::sync::OnceLock;

use tch::Device;
use trainer_core::config::{parse_device, DeviceSpec};

use crate::error::{Result, WorkerError};

/// `Ok(())` once `libtorch_cuda.so` is loaded, else the loader's reason.
static CUDA_LIBRARY: OnceLock<std::result::Result<(), String>> = OnceLock::new();

fn cuda_library() -> &'static std::result::Result<(), String> {
    CUDA_LIBRARY.get_or_init(|| {
        // SAFETY: dlopen with a constant, NUL-terminated name; the handle is deliberately
        // never closed, since libtorch keeps pointers into the library for the whole run.
        // dlerror returns a thread-local C string (or null), copied at once.
        unsafe {
            let handle = libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
            if !handle.is_null() {
                return Ok(());
            }
            let reason = libc::dlerror();
            Err(if reason.is_null() {
                "unknown reason".to_string()
            } else {
                std::ffi::CStr::from_ptr(reason).to_string_lossy().into_owned()
            })
        }
    })
}

/// Loads `libtorch_cuda.so` once per process; true when it could be loaded.
pub fn load_cuda_library() -> bool {
    cuda_library().is_ok()
}

/// True when libtorch sees at least one CUDA device.
pub fn cuda_available() -> bool {
    load_cuda_library() && tch::Cuda::is_available()
}

/// Resolves a device string; `auto` falls back to the CPU (with a log line), an explicit
/// `cuda` request without a usable GPU is an error.
pub fn resolve_device(spec: &str) -> Result<Device> {
    let parsed = parse_device(spec)?;
    match parsed {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => {
            if cuda_available() {
                tracing::info!(devices = tch::Cuda::device_count(), "CUDA found; using cuda:0");
                Ok(Device::Cuda(0))
            } else {
                match cuda_library() {
                    Ok(()) => tracing::info!("no GPU visible to libtorch; using the CPU"),
                    Err(reason) => {
                        tracing::info!("no CUDA (libtorch_cuda.so could not be loaded); using the CPU");
                        tracing::debug!(%reason, "dlopen libtorch_cuda.so");
                    }
                }
                Ok(Device::Cpu)
            }
        }
        DeviceSpec::Cuda(index) => {
            if let Err(reason) = cuda_library() {
                return Err(WorkerError::Device {
                    requested: spec.to_string(),
                    message: format!(
                        "CUDA was requested but libtorch_cuda.so could not be loaded ({reason}); \
                         point LD_LIBRARY_PATH at a CUDA build of libtorch 2.11 or use --device cpu"
                    ),
                });
            }
            if !tch::Cuda::is_available() {
                return Err(WorkerError::Device {
                    requested: spec.to_string(),
                    message: "CUDA was requested but no GPU is visible to libtorch; use --device cpu or auto"
                        .to_string(),
                });
            }
            let count = tch::Cuda::device_count();
            if index as i64 >= count {
                return Err(WorkerError::Device {
                    requested: spec.to_string(),
                    message: format!("only {count} CUDA device(s) visible (cuda:0..cuda:{})", count - 1),
                });
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// `cpu` or `cuda:N`, for logs and summaries.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_resolve_and_bad_strings_are_refused() {
        assert_eq!(resolve_device("cpu").unwrap(), Device::Cpu);
        let auto = resolve_device("auto").unwrap();
        assert_eq!(auto.is_cuda(), cuda_available());
        let e = resolve_device("gpu").unwrap_err().to_string();
        assert!(e.contains("train.device") && e.contains("cuda:N"), "{e}");
    }

    #[test]
    fn cuda_without_a_gpu_is_a_clear_error() {
        if cuda_available() {
            eprintln!("skipped: this host has a GPU");
            return;
        }
        let e = resolve_device("cuda").unwrap_err().to_string();
        assert!(e.contains("device cuda") && e.contains("--device cpu"), "{e}");
        assert!(resolve_device("cuda:3").is_err());
    }
}

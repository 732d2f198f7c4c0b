//! Finding `libnccl.so.2` and making it loadable by cudarc.
//!
//! cudarc loads NCCL with `dlopen` under a list of names that has `libnccl.so` but not
//! `libnccl.so.2` (the name the torch wheel ships), and it panics when none loads. So the
//! worker looks the library up itself, in this order:
//!   1. `TRAINER_NCCL_LIBRARY`, a path to `libnccl.so.2`;
//!   2. the one beside the loaded libtorch: `<site-packages>/nvidia/nccl/lib/libnccl.so.2`;
//!   3. the system's (`LD_LIBRARY_PATH` folders, then the usual library folders).
//!
//! and, when cudarc could not load it by its own names, makes a private folder with a
//! `libnccl.so` link to it and re-executes the worker once with that folder first on
//! `LD_LIBRARY_PATH` (the dynamic loader reads that variable only at process start).

use std::path::{Path, PathBuf};

pub const NCCL_LIBRARY_ENV: &str = "TRAINER_NCCL_LIBRARY";
const REEXEC_MARKER_ENV: &str = "TRAINER_NCCL_REEXEC";

#[derive(Debug, thiserror::Error)]
pub enum NcclLibraryError {
    #[error("{NCCL_LIBRARY_ENV}={path}: no such file")]
    EnvPathMissing { path: PathBuf },
    #[error(
        "NCCL library not found: set {NCCL_LIBRARY_ENV} to a libnccl.so.2, install the torch wheel's \
         nvidia-nccl-cu13 dependency, or the system's libnccl2 (searched: {searched})"
    )]
    NotFound { searched: String },
    #[error("cannot prepare a loadable link to {library}: {cause}")]
    Link { library: PathBuf, cause: std::io::Error },
    #[error("NCCL at {library} still cannot be loaded after re-executing with it on LD_LIBRARY_PATH")]
    StillUnloadable { library: PathBuf },
    #[error("cannot re-execute the worker to load NCCL: {cause}")]
    Reexec { cause: std::io::Error },
}

/// The folder of a loaded shared object whose file name starts with `prefix`, from
/// `/proc/self/maps` (Linux).
fn loaded_library_dir(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|line| line.split_whitespace().nth(5)).map(Path::new).find_map(|p| {
        let name = p.file_name()?.to_string_lossy();
        name.starts_with(prefix).then(|| p.parent().map(Path::to_path_buf)).flatten()
    })
}

/// Candidate paths in search order, without checking that they exist.
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    // The torch wheel: site-packages/torch/lib/libtorch_cpu.so -> site-packages/nvidia/nccl/lib.
    if let Some(torch_lib) = loaded_library_dir("libtorch_cpu") {
        if let Some(site_packages) = torch_lib.parent().and_then(Path::parent) {
            out.push(site_packages.join("nvidia/nccl/lib/libnccl.so.2"));
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        out.extend(std::env::split_paths(&paths).map(|d| d.join("libnccl.so.2")));
    }
    for dir in
        ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/cuda/lib64", "/usr/local/lib", "/usr/lib"]
    {
        out.push(Path::new(dir).join("libnccl.so.2"));
    }
    out
}

/// The NCCL library to use, by the order in the module documentation.
pub fn find_nccl_library() -> Result<PathBuf, NcclLibraryError> {
    if let Some(path) = std::env::var_os(NCCL_LIBRARY_ENV).filter(|p| !p.is_empty()).map(PathBuf::from) {
        return if path.is_file() { Ok(path) } else { Err(NcclLibraryError::EnvPathMissing { path }) };
    }
    let candidates = candidates();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| NcclLibraryError::NotFound {
        searched: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// Whether cudarc can load NCCL under its own names right now (no panic: it only tries).
pub fn cudarc_can_load_nccl() -> bool {
    // SAFETY: only dlopen()s candidate names and closes them again; no symbol is called.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// Makes NCCL loadable for cudarc, re-executing this process once if needed. Returns the
/// library path in use. Call it early in `main`, before threads or sockets exist.
pub fn ensure_nccl_loadable() -> Result<PathBuf, NcclLibraryError> {
    let library = find_nccl_library()?;
    if cudarc_can_load_nccl() {
        return Ok(library);
    }
    if std::env::var_os(REEXEC_MARKER_ENV).is_some() {
        return Err(NcclLibraryError::StillUnloadable { library });
    }
    let link_dir = std::env::temp_dir().join(format!("trainer-nccl-{}", std::process::id()));
    let link_err = |cause| NcclLibraryError::Link { library: library.clone(), cause };
    std::fs::create_dir_all(&link_dir).map_err(link_err)?;
    let link = link_dir.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&library, &link).map_err(link_err)?;
    let mut paths = vec![link_dir];
    if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    let joined = std::env::join_paths(paths).map_err(|e| link_err(std::io::Error::other(e)))?;
    let exe = std::env::current_exe().map_err(|cause| NcclLibraryError::Reexec { cause })?;
    tracing::info!(library = %library.display(), "re-executing with NCCL on LD_LIBRARY_PATH");
    use std::os::unix::process::CommandExt;
    let cause = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", joined)
        .env(REEXEC_MARKER_ENV, "1")
        .exec();
    Err(NcclLibraryError::Reexec { cause })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_env_path_is_named_and_search_list_is_reported() {
        // One test touches the env var, so no other test races on it.
        std::env::set_var(NCCL_LIBRARY_ENV, "/nonexistent/libnccl.so.2");
        let e = find_nccl_library().unwrap_err().to_string();
        std::env::remove_var(NCCL_LIBRARY_ENV);
        assert!(e.contains("/nonexistent/libnccl.so.2") && e.contains(NCCL_LIBRARY_ENV), "{e}");
        // This CPU machine has no NCCL: the error lists where it looked.
        if let Err(e) = find_nccl_library() {
            let e = e.to_string();
            assert!(e.contains("/usr/lib/x86_64-linux-gnu/libnccl.so.2"), "{e}");
        }
        assert!(candidates().iter().all(|p| p.ends_with("libnccl.so.2")));
    }
}

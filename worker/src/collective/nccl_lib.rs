//! Which NCCL this process uses, and making cudarc load exactly that file.
//!
//! Rule: one NCCL per process, the one libtorch uses. Two different NCCL libraries in one
//! process break the first collective ("corrupted comm object detected"), as seen on an H100
//! image with a system `libnccl.so` (2.28.3) beside the torch wheel's `libnccl.so.2` (2.28.9).
//!
//! # The choice ([`choose_nccl`], a pure function of what it is given)
//!
//! 1. When libtorch's CUDA library has mapped an NCCL (the wheel's `libtorch_cuda.so` links
//!    `nvidia/nccl/lib/libnccl.so.2`), that very file, whatever other `libnccl.so*` the
//!    system, `LD_LIBRARY_PATH` or the current folder holds. `TRAINER_NCCL_LIBRARY` may then
//!    only name that same file; another file is refused.
//! 2. Else `TRAINER_NCCL_LIBRARY`, a path to an NCCL library.
//! 3. Else the first that exists of: the one beside the loaded libtorch
//!    (`<site-packages>/nvidia/nccl/lib/libnccl.so.2`), `libnccl.so.2` in the
//!    `LD_LIBRARY_PATH` folders, then in the usual system folders.
//!
//! Files are compared by (device, inode), never by name or path: links abound
//! (`libnccl.so` → `libnccl.so.2` → `libnccl.so.2.28.3`). A mapped object's identity comes
//! from `/proc/self/maps`; it also matches the `stat` of its path, because overlayfs on
//! older kernels shows the lower layer's device there.
//!
//! # Loading
//!
//! cudarc 0.19.10 (feature `dynamic-loading`, CUDA 13) `dlopen`s the first name of
//! `cudarc::get_lib_name_candidates("nccl")` that loads: `libnccl.so`, `libnccl64.so`,
//! `libnccl64_13.so`, `libnccl64_130.so`, `libnccl64_130_0.so`, `libnccl64_{10,11,12,9}.so`,
//! then `libnccl.so.{13,12,11,10,9,1}`; never `libnccl.so.2`, the name the torch wheel
//! ships. [`cudarc_would_load`] opens those names in that order, as cudarc would, and asks
//! the dynamic loader which file it mapped. When that is not the chosen file (another
//! NCCL, or none), the worker re-executes itself once with a private folder holding a
//! `libnccl.so` link to the chosen file first on `LD_LIBRARY_PATH` (the loader reads that
//! variable only at process start). The loader then recognises the link as the file libtorch
//! already mapped (same device and inode) and maps nothing new.
//!
//! After loading, and again before a communicator's first collective, [`verify_single_nccl`]
//! refuses a process that has two different NCCL files mapped, naming both.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub const NCCL_LIBRARY_ENV: &str = "TRAINER_NCCL_LIBRARY";
const REEXEC_MARKER_ENV: &str = "TRAINER_NCCL_REEXEC";

/// A file's identity: device and inode, as `stat` (or `/proc/self/maps`) gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// A file mapped into this process (one line of `/proc/self/maps`, deduplicated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedObject {
    pub path: PathBuf,
    pub id: FileId,
}

/// Why the NCCL library was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NcclSource {
    /// The file libtorch's CUDA library mapped.
    Libtorch,
    /// `TRAINER_NCCL_LIBRARY`, with no NCCL mapped by libtorch.
    Env,
    /// The first candidate found, with no NCCL mapped by libtorch and no env var.
    Search,
}

/// The NCCL library to use, and whether cudarc needs a link to load it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclChoice {
    pub path: PathBuf,
    pub source: NcclSource,
    pub version: Option<String>,
    /// cudarc's own names would load another file (`cudarc_loads`) or none.
    pub needs_link: bool,
    pub cudarc_loads: Option<PathBuf>,
}

/// The NCCL this process uses once [`ensure_nccl_loadable`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclInUse {
    pub path: PathBuf,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NcclLibraryError {
    #[error("{NCCL_LIBRARY_ENV}={path}: no such file")]
    EnvPathMissing { path: PathBuf },
    #[error(
        "{NCCL_LIBRARY_ENV}={env} ({env_version}) is not the NCCL that libtorch loaded, {libtorch} \
         ({libtorch_version}); one process can use only one NCCL: unset {NCCL_LIBRARY_ENV} or point \
         it at {libtorch}"
    )]
    EnvNotLibtorchs { env: PathBuf, env_version: String, libtorch: PathBuf, libtorch_version: String },
    #[error(
        "NCCL library not found: set {NCCL_LIBRARY_ENV} to a libnccl.so.2, install the torch wheel's \
         nvidia-nccl-cu13 dependency, or the system's libnccl2 (searched: {searched})"
    )]
    NotFound { searched: String },
    #[error(
        "{count} different NCCL libraries are mapped in this process: {found}; one process must \
         use one NCCL, the one libtorch loaded (a mix fails with \"corrupted comm object\")"
    )]
    SeveralMapped { count: usize, found: String },
    #[error("cannot prepare a loadable link to {library}: {cause}")]
    Link { library: PathBuf, cause: std::io::Error },
    #[error(
        "after re-executing with a link to {library} first on LD_LIBRARY_PATH, cudarc's names \
         ({names}) still load {loaded}"
    )]
    StillOther { library: PathBuf, loaded: String, names: String },
    #[error("cannot re-execute the worker to load NCCL: {cause}")]
    Reexec { cause: std::io::Error },
}

/// Whether a file name is NCCL itself (`libnccl.so`, `libnccl.so.2`, `libnccl.so.2.28.9`),
/// not a plugin such as `libnccl-net.so`.
pub fn is_nccl_file_name(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        n == "libnccl.so" || n.starts_with("libnccl.so.")
    })
}

/// `2.28.3` from `libnccl.so.2.28.3`; None when the name holds no full version.
pub fn version_from_file_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let version = name.strip_prefix("libnccl.so.")?;
    let parts: Vec<&str> = version.split('.').collect();
    (parts.len() >= 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
        .then(|| version.to_string())
}

/// The encoding of `makedev` in glibc, for the `maj:min` (hex) of `/proc/self/maps`.
fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffff_ff00) << 12) | (minor & 0xff)
}

/// The file-backed mappings of a `/proc/<pid>/maps` text, one entry per (path, identity).
/// Fields: address, perms, offset, dev (`maj:min`, hex), inode, path.
pub fn parse_maps(text: &str) -> Vec<MappedObject> {
    let mut out: Vec<MappedObject> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_addr), Some(_perms), Some(_offset), Some(dev), Some(inode)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some(path) = line.find(" /").map(|i| line[i + 1..].trim_end()) else { continue };
        let Ok(ino) = inode.parse::<u64>() else { continue };
        let Some((major, minor)) = dev.split_once(':') else { continue };
        let (Ok(major), Ok(minor)) = (u64::from_str_radix(major, 16), u64::from_str_radix(minor, 16)) else {
            continue;
        };
        if ino == 0 {
            continue;
        }
        let object =
            MappedObject { path: PathBuf::from(path), id: FileId { dev: makedev(major, minor), ino } };
        if !out.contains(&object) {
            out.push(object);
        }
    }
    out
}

/// The NCCL files among `mapped`, one per identity.
fn mapped_nccl(mapped: &[MappedObject]) -> Vec<&MappedObject> {
    let mut out: Vec<&MappedObject> = Vec::new();
    for m in mapped.iter().filter(|m| is_nccl_file_name(&m.path)) {
        if !out.iter().any(|o| o.id == m.id) {
            out.push(m);
        }
    }
    out
}

fn describe(path: &Path, version: &dyn Fn(&Path) -> Option<String>) -> String {
    format!("{} ({})", path.display(), version(path).unwrap_or_else(|| "version unknown".into()))
}

/// The one NCCL mapped in `mapped`, or None; two different files are an error naming both.
pub fn single_mapped_nccl<'a>(
    mapped: &'a [MappedObject],
    version: &dyn Fn(&Path) -> Option<String>,
) -> Result<Option<&'a MappedObject>, NcclLibraryError> {
    let nccl = mapped_nccl(mapped);
    if nccl.len() > 1 {
        let found = nccl.iter().map(|m| describe(&m.path, version)).collect::<Vec<_>>().join(" and ");
        return Err(NcclLibraryError::SeveralMapped { count: nccl.len(), found });
    }
    Ok(nccl.first().copied())
}

/// Chooses the NCCL library by the rules of the module documentation. `mapped`: this
/// process's mapped files; `env`: `TRAINER_NCCL_LIBRARY`; `candidates`: the search list;
/// `cudarc_would_load`: the file cudarc's own names load (None: none loads); `identity`:
/// a path's (device, inode) after links (None: no such file); `version`: a file's NCCL
/// version for messages.
pub fn choose_nccl(
    mapped: &[MappedObject],
    env: Option<&Path>,
    candidates: &[PathBuf],
    cudarc_would_load: Option<&Path>,
    identity: impl Fn(&Path) -> Option<FileId>,
    version: impl Fn(&Path) -> Option<String>,
) -> Result<NcclChoice, NcclLibraryError> {
    let version_of = |p: &Path| version(p).unwrap_or_else(|| "version unknown".into());
    let libtorch = single_mapped_nccl(mapped, &version)?;
    // A mapped file is known by its maps identity and by its path's (overlayfs, see above).
    let (path, ids, source) = match (libtorch, env) {
        (Some(m), env) => {
            let ids = vec![Some(m.id), identity(&m.path)];
            if let Some(env) = env {
                let env_id =
                    identity(env).ok_or_else(|| NcclLibraryError::EnvPathMissing { path: env.into() })?;
                if !ids.contains(&Some(env_id)) {
                    return Err(NcclLibraryError::EnvNotLibtorchs {
                        env: env.into(),
                        env_version: version_of(env),
                        libtorch: m.path.clone(),
                        libtorch_version: version_of(&m.path),
                    });
                }
            }
            (m.path.clone(), ids, NcclSource::Libtorch)
        }
        (None, Some(env)) => {
            let id = identity(env).ok_or_else(|| NcclLibraryError::EnvPathMissing { path: env.into() })?;
            (env.to_path_buf(), vec![Some(id)], NcclSource::Env)
        }
        (None, None) => {
            let found = candidates.iter().find_map(|c| identity(c).map(|id| (c.clone(), id)));
            let (path, id) = found.ok_or_else(|| NcclLibraryError::NotFound {
                searched: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            })?;
            (path, vec![Some(id)], NcclSource::Search)
        }
    };
    let loads_chosen = cudarc_would_load.and_then(&identity).is_some_and(|id| ids.contains(&Some(id)));
    Ok(NcclChoice {
        version: version(&path),
        path,
        source,
        needs_link: !loads_chosen,
        cudarc_loads: cudarc_would_load.map(Path::to_path_buf),
    })
}

/// The folder of a loaded shared object whose file name starts with `prefix`.
fn loaded_library_dir(mapped: &[MappedObject], prefix: &str) -> Option<PathBuf> {
    mapped.iter().find_map(|m| {
        let name = m.path.file_name()?.to_string_lossy();
        name.starts_with(prefix).then(|| m.path.parent().map(Path::to_path_buf)).flatten()
    })
}

/// Candidate paths in search order, without checking that they exist.
pub fn candidates(mapped: &[MappedObject]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    // The torch wheel: site-packages/torch/lib/libtorch_cpu.so -> site-packages/nvidia/nccl/lib.
    if let Some(torch_lib) = loaded_library_dir(mapped, "libtorch_cpu") {
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

/// This process's mapped files (empty where `/proc` is unreadable).
pub fn mapped_objects() -> Vec<MappedObject> {
    std::fs::read_to_string("/proc/self/maps").map(|t| parse_maps(&t)).unwrap_or_default()
}

/// (device, inode) of the file `path` leads to, following links.
pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    m.is_file().then(|| FileId { dev: m.dev(), ino: m.ino() })
}

/// The names cudarc tries for NCCL, in its order.
pub fn cudarc_library_names() -> Vec<String> {
    cudarc::get_lib_name_candidates("nccl")
}

/// The head of glibc's `struct link_map` (`<link.h>`): only the fields read here.
#[repr(C)]
struct LinkMapHead {
    l_addr: usize,
    l_name: *const c_char,
}

/// The file the dynamic loader mapped for `handle`.
///
/// # Safety
/// `handle` must be a live handle from `dlopen`.
unsafe fn handle_path(handle: *mut c_void) -> Option<PathBuf> {
    let mut map: *const LinkMapHead = std::ptr::null();
    let rc = libc::dlinfo(handle, libc::RTLD_DI_LINKMAP, (&mut map as *mut *const LinkMapHead).cast());
    if rc != 0 || map.is_null() || (*map).l_name.is_null() {
        return None;
    }
    let name = CStr::from_ptr((*map).l_name);
    (!name.to_bytes().is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
}

/// The file that cudarc's own names load right now (as cudarc does: the first name that
/// `dlopen` accepts), or None when none does.
pub fn cudarc_would_load(names: &[String]) -> Option<PathBuf> {
    for name in names {
        let Ok(c_name) = CString::new(name.as_str()) else { continue };
        // SAFETY: dlopen of a NUL-terminated name, as cudarc's own probe does; the handle is
        // only inspected and closed again. No symbol of the library is called.
        unsafe {
            let handle = libc::dlopen(c_name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if handle.is_null() {
                continue;
            }
            let path = handle_path(handle).unwrap_or_else(|| PathBuf::from(name));
            libc::dlclose(handle);
            return Some(path);
        }
    }
    None
}

/// The version of an NCCL file: from its name or its link target's
/// (`libnccl.so` → `libnccl.so.2.28.3`), else from `ncclGetVersion` when the file is
/// already mapped (nothing new is loaded).
pub fn nccl_file_version(path: &Path) -> Option<String> {
    let target = std::fs::canonicalize(path).ok();
    if let Some(v) =
        version_from_file_name(path).or_else(|| target.as_deref().and_then(version_from_file_name))
    {
        return Some(v);
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: RTLD_NOLOAD only returns a handle to an object that is already mapped, so no
    // constructor runs; ncclGetVersion(int*) only writes the version code; the extra
    // reference is dropped again.
    unsafe {
        let handle = libc::dlopen(c_path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        let symbol = libc::dlsym(handle, c"ncclGetVersion".as_ptr());
        let mut code: c_int = 0;
        let ok = !symbol.is_null() && {
            let get: unsafe extern "C" fn(*mut c_int) -> c_int = std::mem::transmute(symbol);
            get(&mut code) == 0
        };
        libc::dlclose(handle);
        ok.then(|| version_from_code(code))
    }
}

/// The version of the NCCL that cudarc loaded, as `major.minor.patch` (loading it if it is
/// not loaded yet).
pub fn nccl_version() -> Option<String> {
    let code = cudarc::nccl::result::get_nccl_version().ok()?;
    Some(version_from_code(code))
}

/// `major.minor.patch` from NCCL_VERSION_CODE (X*10000 + Y*100 + Z since 2.9).
pub fn version_from_code(code: c_int) -> String {
    format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
}

/// Refuses a process with two different NCCL files mapped; returns the one mapped, if any.
pub fn verify_single_nccl() -> Result<Option<MappedObject>, NcclLibraryError> {
    let mapped = mapped_objects();
    Ok(single_mapped_nccl(&mapped, &nccl_file_version)?.cloned())
}

/// The NCCL to use in this process, by the module's rules, with the current state.
pub fn current_choice() -> Result<NcclChoice, NcclLibraryError> {
    let mapped = mapped_objects();
    let env = std::env::var_os(NCCL_LIBRARY_ENV).filter(|p| !p.is_empty()).map(PathBuf::from);
    let would = cudarc_would_load(&cudarc_library_names());
    choose_nccl(&mapped, env.as_deref(), &candidates(&mapped), would.as_deref(), file_id, nccl_file_version)
}

/// Makes cudarc load the chosen NCCL, re-executing this process once if needed, then
/// checks that it is the only NCCL mapped. Call it early in `main`, before threads or
/// sockets exist. Loads `libtorch_cuda.so` first, so that libtorch's NCCL is mapped.
pub fn ensure_nccl_loadable() -> Result<NcclInUse, NcclLibraryError> {
    crate::device::load_cuda_library();
    let choice = current_choice()?;
    if choice.needs_link {
        let loaded = choice.cudarc_loads.as_ref().map_or("nothing".to_string(), |p| p.display().to_string());
        if std::env::var_os(REEXEC_MARKER_ENV).is_some() {
            return Err(NcclLibraryError::StillOther {
                library: choice.path,
                loaded,
                names: cudarc_library_names().join(", "),
            });
        }
        tracing::info!(library = %choice.path.display(), cudarc_would_load = %loaded, "re-executing with NCCL on LD_LIBRARY_PATH");
        return Err(reexec_with_link(&choice.path));
    }
    // cudarc loads NCCL at its first call; from then on exactly one NCCL must be mapped.
    let version = nccl_version();
    let mapped = verify_single_nccl()?;
    let path = mapped.map_or(choice.path, |m| m.path);
    let version = version.or_else(|| nccl_file_version(&path)).unwrap_or_else(|| "unknown".into());
    Ok(NcclInUse { path, version })
}

/// Re-executes this process with a private `libnccl.so` link to `library` first on
/// `LD_LIBRARY_PATH`; returns only on failure.
fn reexec_with_link(library: &Path) -> NcclLibraryError {
    let link_err = |cause| NcclLibraryError::Link { library: library.to_path_buf(), cause };
    let link_dir = std::env::temp_dir().join(format!("trainer-nccl-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&link_dir) {
        return link_err(e);
    }
    let link = link_dir.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    if let Err(e) = std::os::unix::fs::symlink(library, &link) {
        return link_err(e);
    }
    let mut paths = vec![link_dir];
    if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    let joined = match std::env::join_paths(paths) {
        Ok(j) => j,
        Err(e) => return link_err(std::io::Error::other(e)),
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(cause) => return NcclLibraryError::Reexec { cause },
    };
    use std::os::unix::process::CommandExt;
    let cause = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", joined)
        .env(REEXEC_MARKER_ENV, "1")
        .exec();
    NcclLibraryError::Reexec { cause }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const WHEEL: &str = "/venv/site-packages/nvidia/nccl/lib/libnccl.so.2";
    const SYSTEM: &str = "/usr/lib/x86_64-linux-gnu/libnccl.so";
    const SYSTEM_REAL: &str = "/usr/lib/x86_64-linux-gnu/libnccl.so.2.28.3";

    /// A file system of paths and links: identity by table, as `stat` would give it.
    fn fs() -> HashMap<PathBuf, FileId> {
        let wheel = FileId { dev: 0xfe00, ino: 100 };
        let system = FileId { dev: 0xfe00, ino: 200 };
        [
            (WHEEL, wheel),
            (SYSTEM, system),
            (SYSTEM_REAL, system),
            ("/usr/lib/x86_64-linux-gnu/libnccl.so.2", system),
        ]
        .into_iter()
        .map(|(p, id)| (PathBuf::from(p), id))
        .collect()
    }

    fn versions(p: &Path) -> Option<String> {
        version_from_file_name(p).or_else(|| (p == Path::new(WHEEL)).then(|| "2.28.9".to_string()))
    }

    fn mapped_wheel() -> Vec<MappedObject> {
        vec![
            MappedObject {
                path: "/venv/site-packages/torch/lib/libtorch_cuda.so".into(),
                id: FileId { dev: 0xfe00, ino: 7 },
            },
            MappedObject { path: WHEEL.into(), id: FileId { dev: 0xfe00, ino: 100 } },
        ]
    }

    fn choose(
        mapped: &[MappedObject],
        env: Option<&str>,
        candidates: &[&str],
        cudarc: Option<&str>,
    ) -> Result<NcclChoice, NcclLibraryError> {
        let table = fs();
        let candidates: Vec<PathBuf> = candidates.iter().map(PathBuf::from).collect();
        choose_nccl(
            mapped,
            env.map(Path::new),
            &candidates,
            cudarc.map(Path::new),
            |p| table.get(p).copied(),
            versions,
        )
    }

    #[test]
    fn a_system_nccl_of_another_version_beside_the_wheels_is_never_chosen() {
        // The H100 image: libtorch mapped the wheel's 2.28.9, and cudarc's `libnccl.so`
        // finds the system's 2.28.3, which is also first among the candidates.
        let c = choose(&mapped_wheel(), None, &[SYSTEM_REAL, WHEEL], Some(SYSTEM)).unwrap();
        assert_eq!(c.path, Path::new(WHEEL));
        assert_eq!(c.source, NcclSource::Libtorch);
        assert_eq!(c.version.as_deref(), Some("2.28.9"));
        assert!(c.needs_link, "cudarc would load the system's file: load the wheel's through a link");
        // After the re-exec, `libnccl.so` is the link to the wheel's file: nothing to do.
        let linked = choose(&mapped_wheel(), None, &[SYSTEM_REAL], Some(WHEEL)).unwrap();
        assert!(!linked.needs_link);
        // Nothing loadable under cudarc's names: a link too.
        assert!(choose(&mapped_wheel(), None, &[], None).unwrap().needs_link);
    }

    #[test]
    fn the_env_var_may_only_name_the_file_libtorch_mapped() {
        let e = choose(&mapped_wheel(), Some(SYSTEM), &[], Some(WHEEL)).unwrap_err().to_string();
        assert!(e.contains(SYSTEM) && e.contains(WHEEL) && e.contains("2.28.9"), "{e}");
        // The same file under another name (a link) is the same file.
        let mut mapped = mapped_wheel();
        mapped[1] = MappedObject { path: SYSTEM_REAL.into(), id: FileId { dev: 0xfe00, ino: 200 } };
        let c = choose(&mapped, Some(SYSTEM), &[], Some(SYSTEM)).unwrap();
        assert_eq!((c.path.as_path(), c.needs_link), (Path::new(SYSTEM_REAL), false));
        // With nothing mapped by libtorch, the env var decides, before any candidate.
        let c = choose(&[], Some(SYSTEM), &[WHEEL], Some(SYSTEM)).unwrap();
        assert_eq!((c.source, c.needs_link), (NcclSource::Env, false));
        let c = choose(&[], Some(WHEEL), &[SYSTEM_REAL], Some(SYSTEM)).unwrap();
        assert_eq!((c.path.as_path(), c.needs_link), (Path::new(WHEEL), true));
        let e = choose(&[], Some("/nope/libnccl.so.2"), &[WHEEL], None).unwrap_err().to_string();
        assert!(e.contains("/nope/libnccl.so.2") && e.contains(NCCL_LIBRARY_ENV), "{e}");
    }

    #[test]
    fn without_libtorch_nccl_the_first_existing_candidate_is_used_or_the_search_is_named() {
        let c = choose(&[], None, &["/absent/libnccl.so.2", WHEEL, SYSTEM_REAL], Some(WHEEL)).unwrap();
        assert_eq!((c.path.as_path(), c.source, c.needs_link), (Path::new(WHEEL), NcclSource::Search, false));
        let e = choose(&[], None, &["/absent/libnccl.so.2"], None).unwrap_err().to_string();
        assert!(e.contains("/absent/libnccl.so.2") && e.contains(NCCL_LIBRARY_ENV), "{e}");
    }

    #[test]
    fn two_different_mapped_nccls_are_refused_naming_both_with_versions() {
        let mut mapped = mapped_wheel();
        mapped.push(MappedObject { path: SYSTEM_REAL.into(), id: FileId { dev: 0xfe00, ino: 200 } });
        // A plugin and a second segment of the same file do not count.
        mapped.push(MappedObject { path: "/opt/lib/libnccl-net.so".into(), id: FileId { dev: 1, ino: 5 } });
        mapped.push(MappedObject { path: "/tmp/x/libnccl.so".into(), id: FileId { dev: 0xfe00, ino: 100 } });
        let e = choose(&mapped, None, &[], Some(WHEEL)).unwrap_err().to_string();
        assert!(e.contains("2 different NCCL"), "{e}");
        assert!(
            e.contains(&format!("{WHEEL} (2.28.9)")) && e.contains(&format!("{SYSTEM_REAL} (2.28.3)")),
            "{e}"
        );
        assert!(single_mapped_nccl(&mapped_wheel(), &versions).unwrap().is_some());
        assert!(single_mapped_nccl(&[], &versions).unwrap().is_none());
    }

    #[test]
    fn names_versions_and_maps_lines_are_read() {
        assert!(
            is_nccl_file_name(Path::new("/a/libnccl.so")) && is_nccl_file_name(Path::new("/a/libnccl.so.2"))
        );
        assert!(
            !is_nccl_file_name(Path::new("/a/libnccl-net.so"))
                && !is_nccl_file_name(Path::new("/a/libncclx"))
        );
        assert_eq!(version_from_file_name(Path::new("/a/libnccl.so.2.28.3")).as_deref(), Some("2.28.3"));
        assert_eq!(version_from_file_name(Path::new("/a/libnccl.so.2")), None);
        assert_eq!(version_from_code(22809), "2.28.9");
        let text = "\
7f0000000000-7f0000001000 r--p 00000000 fe:00 1234                       /usr/lib/x86_64-linux-gnu/libnccl.so.2.28.3
7f0000001000-7f0000002000 r-xp 00001000 fe:00 1234                       /usr/lib/x86_64-linux-gnu/libnccl.so.2.28.3
7f0000003000-7f0000004000 rw-p 00000000 00:00 0                          [heap]
7f0000005000-7f0000006000 r--p 00000000 103:02 99                        /opt/my libs/libnccl.so.2
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].id, FileId { dev: 0xfe00, ino: 1234 });
        assert_eq!(m[1].path, Path::new("/opt/my libs/libnccl.so.2"));
        assert_eq!(m[1].id.dev, makedev(0x103, 2));
    }

    #[test]
    fn this_process_maps_agree_with_stat() {
        // The identities read from /proc/self/maps are those std::fs::metadata gives.
        let mapped = mapped_objects();
        let libc_so =
            mapped.iter().find(|m| m.path.to_string_lossy().contains("libc.so")).expect("libc mapped");
        assert_eq!(file_id(&libc_so.path), Some(libc_so.id));
        assert!(cudarc_library_names().iter().any(|n| n == "libnccl.so"));
        assert!(!cudarc_library_names().iter().any(|n| n == "libnccl.so.2"));
    }

    #[test]
    fn two_real_different_files_are_told_apart_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("wheel/libnccl.so.2");
        let system = dir.path().join("system/libnccl.so.2.28.3");
        for (p, body) in [(&wheel, "wheel"), (&system, "system")] {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let system_link = dir.path().join("system/libnccl.so");
        std::os::unix::fs::symlink(&system, &system_link).unwrap();
        let wheel_link = dir.path().join("link/libnccl.so");
        std::fs::create_dir_all(wheel_link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&wheel, &wheel_link).unwrap();
        let mapped = vec![MappedObject { path: wheel.clone(), id: file_id(&wheel).unwrap() }];
        let candidates = vec![system.clone(), wheel.clone()];

        let c =
            choose_nccl(&mapped, None, &candidates, Some(&system_link), file_id, nccl_file_version).unwrap();
        assert_eq!((c.path.as_path(), c.needs_link), (wheel.as_path(), true));
        let c =
            choose_nccl(&mapped, None, &candidates, Some(&wheel_link), file_id, nccl_file_version).unwrap();
        assert!(!c.needs_link, "a link to the mapped file is that file");
        let e = choose_nccl(
            &mapped,
            Some(&system_link),
            &candidates,
            Some(&wheel_link),
            file_id,
            nccl_file_version,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("2.28.3") && e.contains(&wheel.display().to_string()), "{e}");
        assert!(choose_nccl(
            &mapped,
            Some(&wheel_link),
            &candidates,
            Some(&wheel_link),
            file_id,
            nccl_file_version
        )
        .is_ok());
    }

    #[test]
    fn this_cpu_machine_has_no_nccl_and_the_search_says_where_it_looked() {
        if file_id(Path::new("/usr/lib/x86_64-linux-gnu/libnccl.so.2")).is_some() {
            eprintln!("skipped: this host has a system NCCL");
            return;
        }
        let mapped = mapped_objects();
        let e = choose_nccl(&mapped, None, &candidates(&mapped), None, file_id, nccl_file_version);
        if let Err(e) = e {
            let e = e.to_string();
            assert!(e.contains("/usr/lib/x86_64-linux-gnu/libnccl.so.2"), "{e}");
        }
        assert!(verify_single_nccl().unwrap().is_none());
    }
}

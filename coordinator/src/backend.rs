//! Which collective the job uses, and which GPU each local worker gets.
//!
//! `--backend auto|nccl|ring`. The coordinator decides before it starts any worker whether
//! a local launch can work at all (NCCL allows one rank per GPU), and gives worker `i` the
//! device `cuda:i` (of the GPUs visible under `CUDA_VISIBLE_DEVICES`). The final choice is
//! made at the rendezvous, when every rank has said which device it trains on and whether
//! it can load NCCL (and which version): `auto` picks NCCL when every rank has a GPU and
//! NCCL, the ring otherwise; `nccl` fails the rendezvous, naming the rank, when one of them
//! cannot. Ranks with different NCCL versions fail it under `auto` and `nccl` alike.

use std::path::Path;

use anyhow::bail;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// NCCL when every worker has a GPU (and NCCL), the TCP ring otherwise.
    Auto,
    /// NCCL all-reduce in GPU memory; one GPU per worker.
    Nccl,
    /// The TCP ring all-reduce (CPU memory; works anywhere).
    Ring,
}

impl BackendChoice {
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Nccl => "nccl",
            BackendChoice::Ring => "ring",
        }
    }
}

/// GPUs this process may use: the entries of `CUDA_VISIBLE_DEVICES` when it is set (CUDA
/// stops at the first entry that is not a device, as in `0,1,-1,2`), else the NVIDIA
/// driver's device list.
pub fn visible_gpu_count() -> usize {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) => count_visible_entries(&list),
        Err(_) => std::fs::read_dir(Path::new("/proc/driver/nvidia/gpus")).map_or(0, |d| d.flatten().count()),
    }
}

fn count_visible_entries(list: &str) -> usize {
    list.split(',')
        .map(str::trim)
        .take_while(|e| e.parse::<u32>().is_ok() || e.starts_with("GPU-") || e.starts_with("MIG-"))
        .count()
}

/// The device each local worker trains on (`None`: the job config's own), or why the
/// launch cannot work.
pub fn local_devices(
    choice: BackendChoice,
    workers: usize,
    gpus: usize,
    config_device: &str,
) -> anyhow::Result<Vec<Option<String>>> {
    let cpu_only = config_device == "cpu";
    if choice == BackendChoice::Nccl {
        if cpu_only {
            bail!("--backend nccl needs GPUs, but train.device is \"cpu\"; use --backend ring or another device");
        }
        if gpus == 0 {
            bail!(
                "--backend nccl needs one GPU per worker, and no GPU is visible \
                 (CUDA_VISIBLE_DEVICES or the NVIDIA driver); use --backend ring"
            );
        }
        if workers > gpus {
            bail!(
                "--backend nccl with --workers {workers}: only {gpus} GPU(s) visible, and NCCL refuses two \
                 ranks on one GPU (\"Duplicate GPU detected\"); use --workers {gpus} or fewer, or \
                 --backend ring to share GPUs"
            );
        }
    }
    if cpu_only || gpus == 0 {
        return Ok(vec![None; workers]);
    }
    if let Some(index) = config_device.strip_prefix("cuda:") {
        // A pinned device pins every local worker to it: only sensible for one worker.
        if workers > 1 {
            bail!(
                "train.device = \"cuda:{index}\" would put all {workers} workers on one GPU; \
                 use \"auto\" or \"cuda\" and let the coordinator give worker i GPU i"
            );
        }
        return Ok(vec![None]);
    }
    // Worker i on GPU i; with the ring and more workers than GPUs, they share round-robin.
    Ok((0..workers).map(|i| Some(format!("cuda:{}", i % gpus))).collect())
}

/// What one rank said at the rendezvous about the collectives it can run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankCollective {
    /// It trains on a CUDA device.
    pub cuda: bool,
    /// It loaded NCCL.
    pub nccl: bool,
    /// The version of the NCCL it loaded ("" when unknown or none).
    pub nccl_version: String,
}

impl RankCollective {
    pub fn new(cuda: bool, nccl: bool, nccl_version: &str) -> Self {
        Self { cuda, nccl, nccl_version: nccl_version.to_string() }
    }
}

/// The ranks of each NCCL version, when they are not all the same: "2.28.9 on ranks [0],
/// 2.28.3 on ranks [1]".
fn nccl_version_mismatch(reports: &[RankCollective]) -> Option<String> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (rank, r) in reports.iter().enumerate() {
        let v = if r.nccl_version.is_empty() { "unknown" } else { r.nccl_version.as_str() };
        match groups.iter_mut().find(|(g, _)| *g == v) {
            Some((_, ranks)) => ranks.push(rank),
            None => groups.push((v, vec![rank])),
        }
    }
    (groups.len() > 1).then(|| {
        groups.iter().map(|(v, ranks)| format!("{v} on ranks {ranks:?}")).collect::<Vec<_>>().join(", ")
    })
}

/// The rendezvous decision from every rank's report; `rank0_has_id` whether rank 0 sent an
/// NCCL unique id.
///
/// Ranks that all could run NCCL but loaded different NCCL versions fail the rendezvous,
/// with `auto` too: such a job was meant for NCCL, and quietly running it on the ring (many
/// times slower on GPUs) would hide a broken deployment (workers from different images).
/// The message says how to run anyway (`--backend ring`).
pub fn decide(
    choice: BackendChoice,
    reports: &[RankCollective],
    rank0_has_id: bool,
) -> Result<&'static str, String> {
    let without_gpu: Vec<usize> = (0..reports.len()).filter(|&r| !reports[r].cuda).collect();
    let without_nccl: Vec<usize> =
        (0..reports.len()).filter(|&r| reports[r].cuda && !reports[r].nccl).collect();
    let nccl_possible = without_gpu.is_empty() && without_nccl.is_empty() && rank0_has_id;
    if choice != BackendChoice::Ring && nccl_possible {
        if let Some(versions) = nccl_version_mismatch(reports) {
            return Err(format!(
                "--backend {}: the ranks loaded different NCCL versions ({versions}), and one NCCL \
                 communicator needs one version; give every worker the same torch wheel (or \
                 TRAINER_NCCL_LIBRARY), or use --backend ring",
                choice.name()
            ));
        }
    }
    match choice {
        BackendChoice::Ring => Ok("ring"),
        BackendChoice::Auto => Ok(if nccl_possible { "nccl" } else { "ring" }),
        BackendChoice::Nccl if nccl_possible => Ok("nccl"),
        BackendChoice::Nccl if !without_gpu.is_empty() => {
            Err(format!("--backend nccl, but ranks {without_gpu:?} train on the CPU (no GPU)"))
        }
        BackendChoice::Nccl if !without_nccl.is_empty() => Err(format!(
            "--backend nccl, but ranks {without_nccl:?} cannot load libnccl.so.2 \
             (set TRAINER_NCCL_LIBRARY on those workers)"
        )),
        BackendChoice::Nccl => Err("--backend nccl, but rank 0 sent no NCCL unique id".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_devices_stop_at_the_first_invalid_entry() {
        assert_eq!(count_visible_entries("0,1"), 2);
        assert_eq!(count_visible_entries(""), 0);
        assert_eq!(count_visible_entries("0,1,-1,2"), 2);
        assert_eq!(count_visible_entries("GPU-8d0b,MIG-1"), 2);
    }

    #[test]
    fn nccl_needs_a_gpu_per_worker_and_says_what_to_do() {
        let e = local_devices(BackendChoice::Nccl, 4, 2, "auto").unwrap_err().to_string();
        assert!(e.contains("only 2 GPU") && e.contains("Duplicate GPU") && e.contains("--workers 2"), "{e}");
        assert!(local_devices(BackendChoice::Nccl, 1, 0, "auto").unwrap_err().to_string().contains("no GPU"));
        assert!(local_devices(BackendChoice::Nccl, 1, 1, "cpu").is_err());
        assert_eq!(
            local_devices(BackendChoice::Nccl, 2, 4, "auto").unwrap(),
            [Some("cuda:0".to_string()), Some("cuda:1".to_string())]
        );
        // The ring may share GPUs; CPU jobs get no device.
        assert_eq!(local_devices(BackendChoice::Ring, 3, 2, "cuda").unwrap()[2].as_deref(), Some("cuda:0"));
        assert_eq!(local_devices(BackendChoice::Auto, 2, 0, "auto").unwrap(), [None, None]);
        assert_eq!(local_devices(BackendChoice::Auto, 2, 2, "cpu").unwrap(), [None, None]);
        assert!(local_devices(BackendChoice::Auto, 2, 2, "cuda:1").is_err());
    }

    #[test]
    fn the_rendezvous_picks_nccl_only_when_every_rank_can() {
        let gpu = |v: &str| RankCollective::new(true, true, v);
        let all = [gpu("2.28.9"), gpu("2.28.9")];
        let cpu = RankCollective::new(false, false, "");
        assert_eq!(decide(BackendChoice::Auto, &all, true), Ok("nccl"));
        assert_eq!(decide(BackendChoice::Auto, &[gpu("2.28.9"), cpu.clone()], true), Ok("ring"));
        assert_eq!(decide(BackendChoice::Ring, &all, true), Ok("ring"));
        assert!(decide(BackendChoice::Nccl, &[gpu("2.28.9"), cpu], true).unwrap_err().contains("[1]"));
        assert!(decide(BackendChoice::Nccl, &[RankCollective::new(true, false, "")], false)
            .unwrap_err()
            .contains("libnccl"));
        assert_eq!(decide(BackendChoice::Nccl, &[gpu("2.28.9")], true), Ok("nccl"));
    }

    #[test]
    fn ranks_with_different_nccl_versions_are_refused_naming_ranks_and_versions() {
        let gpu = |v: &str| RankCollective::new(true, true, v);
        let mixed = [gpu("2.28.9"), gpu("2.28.3"), gpu("2.28.9")];
        for choice in [BackendChoice::Nccl, BackendChoice::Auto] {
            let e = decide(choice, &mixed, true).unwrap_err();
            assert!(e.contains("2.28.9 on ranks [0, 2]") && e.contains("2.28.3 on ranks [1]"), "{e}");
            assert!(
                e.contains(&format!("--backend {}", choice.name())) && e.contains("--backend ring"),
                "{e}"
            );
        }
        // The ring does not care; an unknown version is a version of its own.
        assert_eq!(decide(BackendChoice::Ring, &mixed, true), Ok("ring"));
        let e = decide(BackendChoice::Nccl, &[gpu("2.28.9"), gpu("")], true).unwrap_err();
        assert!(e.contains("unknown on ranks [1]"), "{e}");
        // Without NCCL on some rank, auto still falls back to the ring, whatever the versions.
        let partial = [gpu("2.28.9"), RankCollective::new(true, false, "")];
        assert_eq!(decide(BackendChoice::Auto, &partial, true), Ok("ring"));
    }
}

//! `worker bench-collective`: one backend at world size 1 on this machine, end to end, with
//! a correctness check and the time of an all-reduce of a large buffer. With NCCL on one GPU
//! it is the GPU check's proof that the NCCL path works (communicator from an id, all-reduce
//! and broadcast in device memory) and its all-reduce figure.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::nccl::{new_unique_id, NcclCollective};
use super::nccl_lib::nccl_version;
use super::{Collective, NoopCollective};

#[derive(Debug, Serialize)]
pub struct CollectiveCheck {
    pub backend: String,
    pub device: String,
    pub nccl_version: Option<String>,
    pub elements: usize,
    pub bytes: usize,
    /// All-reduce (mean) at world size 1 left every element exactly as it was.
    pub all_reduce_exact: bool,
    /// Broadcast from rank 0 at world size 1 left every element exactly as it was.
    pub broadcast_exact: bool,
    pub iterations: usize,
    pub all_reduce_median_ms: f64,
    pub all_reduce_min_ms: f64,
    /// A device-to-device copy of the same buffer, for scale.
    pub copy_median_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs the check for `backend` (`nccl` or `none`) on `device` with a buffer of `elements`.
pub fn check_collective(
    backend: &str,
    device: Device,
    elements: usize,
    iterations: usize,
) -> anyhow::Result<CollectiveCheck> {
    let mut collective: Box<dyn Collective> = match backend {
        "nccl" => {
            let Device::Cuda(ordinal) = device else { bail!("the NCCL check needs a CUDA device") };
            let id = new_unique_id()?;
            Box::new(NcclCollective::new(ordinal, 0, 1, &id, Duration::from_secs(60))?)
        }
        "none" => Box::new(NoopCollective),
        other => bail!("unknown backend {other:?}: use nccl or none"),
    };
    let input = Tensor::f_randn([elements as i64], (Kind::Float, device))?;
    let mut buffer = input.f_detach_copy()?;
    collective.all_reduce_mean(&mut buffer).context("all-reduce")?;
    synchronize(device);
    let all_reduce_exact = bool::try_from(buffer.f_eq_tensor(&input)?.f_all()?)?;
    let mut broadcast = input.f_detach_copy()?;
    collective.broadcast(&mut broadcast, 0).context("broadcast")?;
    synchronize(device);
    let broadcast_exact = bool::try_from(broadcast.f_eq_tensor(&input)?.f_all()?)?;
    collective.barrier().context("barrier")?;

    let mut reduce_ms = Vec::with_capacity(iterations);
    let mut copy_ms = Vec::with_capacity(iterations);
    let mut copy = Tensor::f_empty_like(&input)?;
    for _ in 0..iterations {
        synchronize(device);
        let t = Instant::now();
        collective.all_reduce_mean(&mut buffer)?;
        synchronize(device);
        reduce_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        copy.f_copy_(&input)?;
        synchronize(device);
        copy_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(CollectiveCheck {
        backend: collective.backend().to_string(),
        device: crate::device::device_name(device),
        nccl_version: if backend == "nccl" { nccl_version() } else { None },
        elements,
        bytes: elements * 4,
        all_reduce_exact,
        broadcast_exact,
        iterations,
        all_reduce_min_ms: reduce_ms.iter().copied().fold(f64::INFINITY, f64::min),
        all_reduce_median_ms: median(reduce_ms),
        copy_median_ms: median(copy_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_single_process_backend_is_exact_and_nccl_needs_a_gpu() {
        let r = check_collective("none", Device::Cpu, 1000, 3).unwrap();
        assert!(r.all_reduce_exact && r.broadcast_exact);
        assert_eq!((r.backend.as_str(), r.bytes), ("none", 4000));
        assert!(check_collective("nccl", Device::Cpu, 10, 1).unwrap_err().to_string().contains("CUDA"));
        assert!(check_collective("gloo", Device::Cpu, 10, 1).is_err());
    }
}

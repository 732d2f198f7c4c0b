//! The rendezvous: this rank binds its ring listener, says where it can be reached and what
//! it can run (device, NCCL), and gets back every rank's address and the collective the
//! coordinator chose; then it connects that collective (the ring, or an NCCL communicator).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use trainer_proto::v1::RendezvousRequest;

use super::args::{seconds, JoinArgs};
use super::join::{status_error, Agent};
use super::liveness::{guarded, Liveness};
use super::JobInfo;
use crate::collective::nccl::NcclCollective;
use crate::collective::ring::{RingCollective, RingListener, RingOptions};
use crate::collective::{Collective, NoopCollective};

/// What this process can offer the collective, found once at start.
#[derive(Debug, Clone)]
pub(super) struct NcclSupport {
    available: bool,
    /// The loaded NCCL's version, sent at the rendezvous (ranks must agree).
    version: String,
}

/// Logs the devices and, on a GPU host, makes NCCL loadable (which may re-execute the
/// process once, see `collective::nccl_lib`).
pub(super) fn prepare_devices(args: &JoinArgs) -> anyhow::Result<NcclSupport> {
    let cuda = crate::device::cuda_available();
    tracing::info!(
        cuda,
        cudnn = cuda && tch::Cuda::cudnn_is_available(),
        gpus = if cuda { tch::Cuda::device_count() } else { 0 },
        "devices"
    );
    if !cuda || args.backend == "ring" {
        return Ok(NcclSupport { available: false, version: String::new() });
    }
    match crate::collective::nccl_lib::ensure_nccl_loadable() {
        Ok(nccl) => {
            tracing::info!(library = %nccl.path.display(), version = %nccl.version, "NCCL in use");
            Ok(NcclSupport { available: true, version: nccl.version })
        }
        Err(e) if args.backend == "nccl" => Err(anyhow!(e).context("--backend nccl")),
        Err(e) => {
            tracing::warn!(error = %e, "NCCL unavailable; this worker can only use the ring");
            Ok(NcclSupport { available: false, version: String::new() })
        }
    }
}

/// How to build this rank's collective, as decided at the rendezvous.
pub(super) enum CollectivePlan {
    Ring { listener: RingListener, peers: Vec<SocketAddr>, options: RingOptions },
    Nccl { ordinal: usize, unique_id: Vec<u8>, timeout: Duration },
}

impl Agent {
    /// Meets the other ranks through the coordinator; how to build the collective.
    pub(super) async fn rendezvous(
        &self,
        args: &JoinArgs,
        nccl: &NcclSupport,
        live: &Liveness,
    ) -> anyhow::Result<CollectivePlan> {
        let listener = RingListener::bind(args.ring_listen)
            .with_context(|| format!("cannot bind the ring listener on {}", args.ring_listen))?;
        let bound = listener.local_addr();
        let host = args.advertise_host(bound);
        let advertised = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", bound.port())
        } else {
            format!("{host}:{}", bound.port())
        };
        // The device decides what this rank can offer: rank 0 on a GPU with NCCL makes the
        // NCCL id, which the coordinator relays if it picks NCCL.
        let device = crate::device::resolve_device(&self.job.config.train.device)?;
        tracing::info!(device = %crate::device::device_name(device), "training device");
        let nccl_ready = nccl.available && device.is_cuda();
        let nccl_unique_id = if nccl_ready && self.job.rank == 0 {
            crate::collective::nccl::new_unique_id()?
        } else {
            Vec::new()
        };
        let mut client = self.client.clone();
        let rendezvous = guarded(live, async {
            client
                .rendezvous(RendezvousRequest {
                    worker: Some(self.identity.clone()),
                    ring_address: advertised.clone(),
                    nccl_unique_id,
                    device: crate::device::device_name(device),
                    nccl_available: nccl_ready,
                    nccl_version: if nccl_ready { nccl.version.clone() } else { String::new() },
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| status_error("the rendezvous failed", s))
        })
        .await?;
        if rendezvous.ring_addresses.len() != self.job.world_size {
            bail!(
                "the rendezvous returned {} addresses for a world of {}",
                rendezvous.ring_addresses.len(),
                self.job.world_size
            );
        }
        let peers = rendezvous
            .ring_addresses
            .iter()
            .enumerate()
            .map(|(rank, a)| {
                a.to_socket_addrs()
                    .ok()
                    .and_then(|mut it| it.next())
                    .ok_or_else(|| anyhow!("cannot resolve rank {rank}'s ring address {a:?}"))
            })
            .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
        let mut ring_options = RingOptions::new(rendezvous.ring_token);
        ring_options.timeout = seconds("ring-timeout", args.ring_timeout)?;
        Ok(match rendezvous.backend.as_str() {
            "nccl" => {
                let tch::Device::Cuda(ordinal) = device else {
                    bail!("the coordinator chose NCCL, but this rank trains on the CPU");
                };
                CollectivePlan::Nccl {
                    ordinal,
                    unique_id: rendezvous.nccl_unique_id,
                    timeout: ring_options.timeout,
                }
            }
            "ring" => CollectivePlan::Ring { listener, peers, options: ring_options },
            other => bail!("the coordinator chose an unknown collective {other:?}"),
        })
    }
}

/// The collective of `plan` for this rank (none at world size 1 on the ring).
pub(super) fn connect_collective(job: &JobInfo, plan: CollectivePlan) -> anyhow::Result<Box<dyn Collective>> {
    Ok(match plan {
        CollectivePlan::Ring { listener, .. } if job.world_size == 1 => {
            drop(listener);
            Box::new(NoopCollective)
        }
        CollectivePlan::Ring { listener, peers, options } => Box::new(
            RingCollective::connect(listener, job.rank, job.world_size, &peers, options)
                .map_err(|e| anyhow!(e).context("cannot form the ring"))?,
        ),
        // Also at world size 1: the NCCL path is then exercised end to end on one GPU.
        CollectivePlan::Nccl { ordinal, unique_id, timeout } => Box::new(
            NcclCollective::new(ordinal, job.rank, job.world_size, &unique_id, timeout)
                .map_err(|e| anyhow!(e).context("cannot create the NCCL communicator"))?,
        ),
    })
}

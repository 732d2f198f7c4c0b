//! The agent against the real coordinator binary (started with --external-workers on
//! 127.0.0.1), with toy replicas that use the real ring collective: registration, shard
//! download, rendezvous, the session, epochs, evaluation, uploads and failures, without
//! libtorch models. Skipped (with a line saying so) when the coordinator binary is not built.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tch::Tensor;

use trainer_tests::ExternalCoordinator;

use anyhow::bail;
use trainer_proto::JobSecret;

use super::*;

const SECRET: &str = "test-secret-5f1e9a";

fn coordinator_bin() -> Option<PathBuf> {
    let path = trainer_tests::built_binary_path("coordinator");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("skipped: {} is not built (cargo build -p coordinator)", path.display());
        None
    }
}

/// The coordinator with --external-workers on 60 train and 20 test synthetic reviews per
/// label, batch 4, two epochs, 20% validation; None (skipped) when it is not built.
fn start_coordinator(workers: usize, extra: &[&str]) -> Option<ExternalCoordinator> {
    let bin = coordinator_bin()?;
    let args = [
        &["--register-timeout", "20", "--batch-size", "4", "--epochs", "2", "--val-fraction", "0.2"][..],
        extra,
    ]
    .concat();
    Some(ExternalCoordinator::start(&bin, workers, SECRET, (60, 20), &args))
}

/// What a toy replica saw, for the assertions.
/// (epoch, the shard's (review id, label) pairs).
type EpochShard = (u64, Vec<(u32, u8)>);

#[derive(Default)]
struct Seen {
    /// (epoch, the shard's (review id, label) pairs: unique in the toy corpus).
    train_ids: Vec<EpochShard>,
}

struct Toy {
    rank: usize,
    params: Vec<f32>,
    collective: Box<dyn Collective>,
    steps: usize,
    batch: usize,
    fail_at: Option<(u64, u64)>,
    step_delay: Duration,
    seen: Arc<Mutex<Seen>>,
    /// The kept best model: (epoch, parameters).
    best: Option<(u64, Vec<f32>)>,
    /// The parameter count it reports, when not its own (a replica of another build).
    reported_count: Option<u64>,
}

const TOY_LR: f32 = 1e-3;

fn toy_grad_norm(grad: &[f32]) -> f64 {
    grad.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt()
}

fn checksum(params: &[f32]) -> u64 {
    params
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, v| (h ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3))
}

impl Replica for Toy {
    fn train_epoch(
        &mut self,
        epoch: u64,
        first_step: u64,
        shard: &EncodedSplit,
        sink: &mut dyn StepSink,
    ) -> anyhow::Result<EpochReport> {
        self.seen
            .lock()
            .unwrap()
            .train_ids
            .push((epoch, shard.ids.iter().copied().zip(shard.labels.iter().copied()).collect()));
        let mut total = EpochReport::default();
        for step in first_step as usize..self.steps {
            if self.fail_at == Some((epoch, step as u64)) {
                bail!("toy failure at step {step}");
            }
            std::thread::sleep(self.step_delay);
            // A "gradient" from this rank's batch, averaged over the ranks.
            let rows = step * self.batch..(step + 1) * self.batch;
            let grad: Vec<f32> = (0..self.params.len())
                .map(|j| {
                    rows.clone().map(|r| shard.review(r).iter().sum::<u32>() as f32 * (j + 1) as f32).sum()
                })
                .collect();
            let mut t = Tensor::from_slice(&grad);
            self.collective.all_reduce_mean(&mut t)?;
            let grad = Vec::<f32>::try_from(&t)?;
            for (p, g) in self.params.iter_mut().zip(&grad) {
                *p -= TOY_LR * g;
            }
            let tokens: u64 = rows.clone().map(|r| shard.length(r) as u64).sum();
            let r = StepReport {
                step: step as u64,
                loss_sum: 0.5 * self.batch as f64,
                samples: self.batch as u64,
                tokens,
                step_seconds: 0.01,
                comm_seconds: 0.001,
                global_step: epoch * self.steps as u64 + step as u64 + 1,
                grad_norm: toy_grad_norm(&grad),
                lr: TOY_LR as f64,
                ..StepReport::default()
            };
            sink.step(r);
            total.steps += 1;
            total.loss_sum += r.loss_sum;
            total.samples += r.samples;
            total.tokens += r.tokens;
        }
        Ok(total)
    }

    fn evaluate(&mut self, split: &EncodedSplit) -> anyhow::Result<EvalCounts> {
        // "Predicts" positive for every review: accuracy is the share of positive labels.
        Ok(EvalCounts {
            correct: split.labels.iter().filter(|&&l| l == 1).count() as u64,
            total: split.len() as u64,
            loss_sum: split.len() as f64,
            confusion: Vec::new(),
        })
    }

    fn parameter_checksum(&self) -> anyhow::Result<u64> {
        Ok(checksum(&self.params))
    }

    fn parameter_count(&self) -> u64 {
        self.reported_count.unwrap_or(self.params.len() as u64)
    }

    fn keep_best(&mut self, epoch: u64) -> anyhow::Result<()> {
        self.best = Some((epoch, self.params.clone()));
        Ok(())
    }

    fn best_epoch(&self) -> Option<u64> {
        self.best.as_ref().map(|b| b.0)
    }

    fn load_best(&mut self, epoch: u64) -> anyhow::Result<u64> {
        match &self.best {
            Some((e, params)) if *e == epoch => self.params = params.clone(),
            other => {
                bail!("toy: asked for epoch {epoch}'s best model, holding {:?}", other.as_ref().map(|b| b.0))
            }
        }
        Ok(checksum(&self.params))
    }

    fn export_model(&mut self) -> anyhow::Result<Vec<u8>> {
        Ok(self.params.iter().flat_map(|p| p.to_le_bytes()).collect())
    }

    fn checkpoint(&mut self, at: CheckpointAt) -> anyhow::Result<Vec<u8>> {
        Ok(format!("checkpoint of rank {} after epoch {}", self.rank, at.epoch).into_bytes())
    }

    fn global_step(&self) -> u64 {
        0
    }
}

fn join_args(addr: &str) -> JoinArgs {
    JoinArgs {
        coordinator: Some(addr.to_string()),
        secret: Some(JobSecret::new(SECRET).unwrap()),
        secret_file: None,
        rank: None,
        tls_ca: None,
        ring_listen: "127.0.0.1:0".parse().unwrap(),
        ring_advertise_host: None,
        ring_timeout: 10.0,
        connect_timeout: 10.0,
        device: None,
        local_rank: None,
        backend: "auto".into(),
    }
}

type AgentResult = (anyhow::Result<()>, Arc<Mutex<Seen>>);

/// Runs `world` agents on threads; `fail_at` makes one rank's replica fail at (epoch, step).
fn run_agents(
    addr: &str,
    world: usize,
    fail_at: Option<(usize, u64, u64)>,
    step_delay: Duration,
) -> Vec<std::thread::JoinHandle<AgentResult>> {
    run_tweaked_agents(addr, world, fail_at, step_delay, |_| {})
}

/// [`run_agents`], with `tweak` applied to every rank's toy replica once it is built.
fn run_tweaked_agents(
    addr: &str,
    world: usize,
    fail_at: Option<(usize, u64, u64)>,
    step_delay: Duration,
    tweak: fn(&mut Toy),
) -> Vec<std::thread::JoinHandle<AgentResult>> {
    (0..world)
        .map(|_| {
            let args = join_args(addr);
            std::thread::spawn(move || {
                let seen = Arc::new(Mutex::new(Seen::default()));
                let s = Arc::clone(&seen);
                let result = run_agent(&args, move |job: &JobInfo, mut collective: Box<dyn Collective>| {
                    // Different initial values per rank: the broadcast must make them equal.
                    let mut init = Tensor::from_slice(&[job.rank as f32 + 1.0; 8]);
                    collective.broadcast(&mut init, 0)?;
                    let mut toy = Toy {
                        rank: job.rank,
                        params: Vec::<f32>::try_from(&init)?,
                        collective,
                        steps: job.steps_per_epoch,
                        batch: job.config.train.batch_size,
                        fail_at: fail_at.filter(|f| f.0 == job.rank).map(|f| (f.1, f.2)),
                        step_delay,
                        seen: s,
                        best: None,
                        reported_count: None,
                    };
                    tweak(&mut toy);
                    Ok(Box::new(toy) as Box<dyn Replica>)
                });
                (result, seen)
            })
        })
        .collect()
}

#[test]
fn agents_train_a_job_with_the_real_coordinator() {
    let Some(mut coord) = start_coordinator(2, &[]) else { return };
    let handles = run_agents(coord.addr(), 2, None, Duration::ZERO);
    let results: Vec<AgentResult> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let (status, _) = coord.wait(Duration::from_secs(60));
    let stderr = coord.stderr();
    for (r, _) in &results {
        assert!(r.is_ok(), "agent failed: {r:?}\n{stderr}");
    }
    assert!(status.success(), "coordinator failed:\n{stderr}");
    assert!(!stderr.contains(SECRET), "the secret leaked into the coordinator's log");

    // Shards: 96 train reviews (120 minus 20% validation), batch 4, 2 ranks -> 12 steps of
    // 4 per rank; disjoint across ranks, reshuffled between epochs.
    let shards: Vec<Vec<EpochShard>> =
        results.iter().map(|(_, s)| s.lock().unwrap().train_ids.clone()).collect();
    for epoch in 0..2u64 {
        let a = &shards[0][epoch as usize];
        let b = &shards[1][epoch as usize];
        assert_eq!((a.0, b.0), (epoch, epoch));
        assert_eq!((a.1.len(), b.1.len()), (48, 48));
        let mut union: Vec<(u32, u8)> = a.1.iter().chain(&b.1).copied().collect();
        union.sort_unstable();
        union.dedup();
        assert_eq!(union.len(), 96, "the ranks' train shards overlap");
    }
    assert_ne!(shards[0][0].1, shards[0][1].1, "the train shard did not change between epochs");

    // The run folder.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(coord.out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["world_size"], 2);
    assert_eq!(summary["epochs"], 2);
    let checksums = summary["replica_checksums"].as_array().unwrap();
    assert_eq!(checksums.len(), 2);
    assert_eq!(checksums[0], checksums[1]);
    // Every test review evaluated exactly once across ranks: the balanced test split gives
    // the all-positive toy exactly half; the loss (1 per review) averages to exactly 1.
    assert_eq!(summary["test_accuracy"], 0.5);
    assert_eq!(summary["test_loss"], 1.0);
    assert_eq!(summary["test_samples"], 40);
    assert!(summary["best_val_accuracy"].as_f64().is_some());
    // One epoch record per epoch, after rank 0's step record of the epoch's last step (the
    // default log_every, 50, is more than the 12 steps).
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(coord.out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 6, "{metrics:?}");
    for (epoch, pair) in metrics[..4].chunks(2).enumerate() {
        let (step, record) = (&pair[0], &pair[1]);
        assert_eq!(step["type"], "step", "{step}");
        assert_eq!((step["epoch"].as_u64(), step["step"].as_u64()), (Some(epoch as u64 + 1), Some(12)));
        assert_eq!(step["global_step"].as_u64(), Some(12 * (epoch as u64 + 1)));
        assert_eq!(step["lr"], TOY_LR as f64);
        assert!(step["grad_norm"].as_f64().is_some_and(|n| n > 0.0), "{step}");
        assert_eq!(step["loss"], 0.5);
        assert!(record.get("type").is_none(), "{record}");
        assert_eq!(record["epoch"], epoch + 1);
        assert_eq!(record["train_samples"], 96);
        assert_eq!(record["train_loss"], 0.5);
    }
    // The toy's validation accuracy is the same every epoch, so the first epoch's model is
    // the best and the kept one: every rank switched back to its copy for the test, and rank
    // 0 exported it; the last epoch's model is beside it.
    assert_eq!((summary["kept_model"].as_str(), summary["kept_epoch"].as_u64()), (Some("best"), Some(1)));
    assert_eq!(summary["last_epoch_test_accuracy"], 0.5);
    let tests: Vec<_> = metrics[4..].iter().map(|t| (t["split"].as_str(), t["model"].as_str())).collect();
    assert_eq!(tests, [(Some("test"), Some("last")), (Some("test"), Some("best"))]);
    let model_checksum = |file: &str| {
        let model = std::fs::read(coord.out.join(file)).unwrap();
        assert_eq!(model.len(), 8 * 4);
        let params: Vec<f32> =
            model.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        format!("{:016x}", checksum(&params))
    };
    assert_eq!(model_checksum("model.safetensors"), metrics[1]["parameter_checksum"].as_str().unwrap());
    assert_eq!(model_checksum("model-last.safetensors"), checksums[0].as_str().unwrap());
    assert_ne!(metrics[1]["parameter_checksum"], metrics[3]["parameter_checksum"]);
    let checkpoint = trainer_tests::current_checkpoint(&coord.out).expect("a committed checkpoint");
    assert_eq!(std::fs::read_to_string(checkpoint).unwrap(), "checkpoint of rank 0 after epoch 1");
    for f in ["vocab.txt", "config.toml"] {
        assert!(coord.out.join(f).is_file(), "{f} missing");
    }
}

#[test]
fn a_failing_replica_stops_the_job_and_names_its_rank() {
    let Some(mut coord) = start_coordinator(2, &["--max-restarts", "0"]) else { return };
    let handles = run_agents(coord.addr(), 2, Some((1, 0, 3)), Duration::ZERO);
    let results: Vec<AgentResult> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let (status, _) = coord.wait(Duration::from_secs(60));
    let stderr = coord.stderr();
    assert!(!status.success());
    assert!(stderr.contains("rank 1") && stderr.contains("toy failure at step 3"), "{stderr}");
    // Ranks follow registration order, not thread order: find the failing one by its error.
    let errors: Vec<String> = results.iter().map(|(r, _)| format!("{:#}", r.as_ref().unwrap_err())).collect();
    assert_eq!(errors.iter().filter(|e| e.contains("toy failure")).count(), 1, "{errors:?}");
    assert!(!coord.out.join("summary.json").exists());
}

/// A replica that reports another parameter count (a worker of another build or config)
/// is refused at the start, with both counts and its rank named, before any step.
#[test]
fn replicas_that_disagree_on_the_parameter_count_are_refused_naming_the_rank() {
    let Some(mut coord) = start_coordinator(2, &["--max-restarts", "0"]) else { return };
    let handles = run_tweaked_agents(coord.addr(), 2, None, Duration::ZERO, |toy| {
        if toy.rank == 1 {
            toy.reported_count = Some(toy.params.len() as u64 + 1);
        }
    });
    let results: Vec<AgentResult> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let (status, _) = coord.wait(Duration::from_secs(60));
    let stderr = coord.stderr();
    assert!(!status.success());
    assert!(stderr.contains("rank 0 has 8 parameters, rank 1 has 9"), "{stderr}");
    assert!(results.iter().all(|(r, seen)| r.is_err() && seen.lock().unwrap().train_ids.is_empty()));
}

#[test]
fn agents_exit_within_the_heartbeat_timeout_when_the_coordinator_dies() {
    let Some(mut coord) = start_coordinator(2, &["--heartbeat-timeout", "2", "--heartbeat-interval", "0.5"])
    else {
        return;
    };
    let handles = run_agents(coord.addr(), 2, None, Duration::from_millis(300));
    // Let the job reach the training phase, then kill the coordinator outright.
    let start = Instant::now();
    while !coord.stderr().contains("epoch started") && !coord.stderr().contains("all replicas ready") {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", coord.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    coord.kill();
    let killed = Instant::now();
    for h in handles {
        let (result, _) = h.join().unwrap();
        let e = format!("{:#}", result.unwrap_err());
        assert!(e.contains("lost the coordinator") || e.contains("stream"), "{e}");
    }
    assert!(killed.elapsed() < Duration::from_secs(4), "agents took {:?} to exit", killed.elapsed());
}

/// Two agents with the real tch replica (a tiny LSTM, dropout off) train a job; the replicas
/// agree after every epoch, and a second run with the same seed ends with the same bits.
#[test]
fn trainer_replicas_stay_identical_and_runs_repeat() {
    tch::set_num_threads(1);
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("tiny.toml");
    std::fs::write(
        &config,
        "[model]\nembed_dim = 8\nhidden = 8\nlayers = 1\ndropout = 0.0\n\n\
         [train]\nbatch_size = 4\nepochs = 2\nseed = 11\ndevice = \"cpu\"\nbatch_order = \"bucketed\"\n",
    )
    .unwrap();
    let mut finals = Vec::new();
    for _ in 0..2 {
        let Some(mut coord) = start_coordinator(2, &["--config", config.to_str().unwrap()]) else { return };
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let args = join_args(coord.addr());
                std::thread::spawn(move || {
                    run_agent(&args, |job: &JobInfo, c: Box<dyn Collective>| {
                        // Both replicas live in this one process and libtorch's generator is
                        // global: build them one at a time so that rank 0's initial weights
                        // do not depend on thread timing (separate processes need no lock).
                        static INIT: Mutex<()> = Mutex::new(());
                        let mut replica = {
                            let _one_at_a_time = INIT.lock().unwrap_or_else(|p| p.into_inner());
                            TrainerReplica::build(job, c)?
                        };
                        replica.broadcast_from_rank0()?;
                        Ok(Box::new(replica) as Box<dyn Replica>)
                    })
                })
            })
            .collect();
        for h in handles {
            let r = h.join().unwrap();
            assert!(r.is_ok(), "{r:?}\n{}", coord.stderr());
        }
        assert!(coord.wait(Duration::from_secs(120)).0.success(), "{}", coord.stderr());
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(coord.out.join("summary.json")).unwrap()).unwrap();
        let sums = summary["replica_checksums"].as_array().unwrap().clone();
        assert_eq!(sums.len(), 2);
        assert_eq!(sums[0], sums[1], "replicas diverged");
        let acc = summary["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert_eq!(summary["backend"], "ring");
        assert!(std::fs::metadata(coord.out.join("model.safetensors")).unwrap().len() > 100);
        let checkpoint = trainer_tests::current_checkpoint(&coord.out).expect("a committed checkpoint");
        assert!(std::fs::metadata(checkpoint).unwrap().len() > 100);
        finals.push(sums[0].clone());
    }
    assert_eq!(finals[0], finals[1], "two runs with the same seed differ");
}

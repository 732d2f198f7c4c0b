//! `worker`: the model replica as a program.
//!
//! ```text
//! worker train --config configs/cpu-demo.toml --data $IMDB_DATA --out runs/demo
//! worker train --config configs/cpu-demo.toml --data $IMDB_DATA --out runs/demo --resume runs/demo
//! worker train --config configs/seed.toml --data $IMDB_DATA --out runs/prof --profile-steps 50 --stop-after-steps 53
//! worker predict --model runs/demo "A wonderful film." "Dull and far too long."
//! worker bench-memory --bptt 50 --seq-len 2000
//! ```

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use trainer_core::cli::{ConfigArgs, DataArgs};
use worker::bench::{bench_memory, MemoryBenchOptions};
use worker::device::resolve_device;
use worker::predict::Predictor;
use worker::run::{run_training, RunOptions};
use worker::tbptt::LstmKernel;

#[derive(Debug, Parser)]
#[command(name = "worker", version, about = "Data-parallel LSTM training on IMDB: the model replica")]
struct Cli {
    /// libtorch CPU threads (0: train.threads of the config, else libtorch's default).
    #[arg(long, env = "WORKER_THREADS", default_value_t = 0, global = true)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train in one process and write a run folder (model, vocab, config, metrics, summary,
    /// checkpoint).
    Train(Box<TrainCmd>),
    /// Classify reviews (arguments, or one per line on stdin) with a trained run folder.
    Predict(PredictCmd),
    /// Peak memory of one training step on a long synthetic batch (one K per process).
    BenchMemory(BenchMemoryCmd),
    /// Join a coordinator's job as one rank (what `coordinator --workers N` starts).
    Join(worker::agent::JoinArgs),
    /// One collective backend at world size 1: exactness check and all-reduce time (JSON).
    BenchCollective(BenchCollectiveCmd),
}

#[derive(Debug, Args)]
struct TrainCmd {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    config: ConfigArgs,
    /// The run folder to write.
    #[arg(long, env = "WORKER_OUT")]
    out: PathBuf,
    /// Continue from the checkpoint in this run folder (often the same as --out).
    #[arg(long, env = "WORKER_RESUME")]
    resume: Option<PathBuf>,
    /// Also checkpoint every this many steps within an epoch (0: at epoch ends only).
    #[arg(long, env = "WORKER_CHECKPOINT_EVERY", default_value_t = 0)]
    checkpoint_every: usize,
    /// Stop after this many epochs in all, keeping the checkpoint (as if interrupted).
    #[arg(long, env = "WORKER_STOP_AFTER_EPOCH")]
    stop_after_epoch: Option<usize>,
    /// Stop after this many optimizer steps in all, checkpointing there (as if interrupted).
    #[arg(long, env = "WORKER_STOP_AFTER_STEPS")]
    stop_after_steps: Option<u64>,
    /// Also evaluate the test split after every epoch (time-to-accuracy benchmarks).
    #[arg(long, env = "WORKER_EVAL_TEST_EACH_EPOCH")]
    eval_test_each_epoch: bool,
    /// How rows of different lengths run: packed (one packed LSTM call per window; the
    /// default on CUDA) or segmented (dense calls between row ends; the default on the CPU).
    /// Same results, different speed.
    #[arg(long, env = "WORKER_LSTM_KERNEL", value_parser = parse_kernel)]
    lstm_kernel: Option<LstmKernel>,
    /// After 3 warm-up steps, time this many steps bucket by bucket (forward, backward,
    /// flattening, collective, clipping, optimizer, host reads, collation and copies), with
    /// a device synchronisation around each; print the table on stderr and write
    /// profile.json into the run folder. Training goes on afterwards (add
    /// --stop-after-steps to end there). 0: off.
    #[arg(long, env = "WORKER_PROFILE_STEPS", default_value_t = 0)]
    profile_steps: u64,
}

fn parse_kernel(s: &str) -> Result<LstmKernel, String> {
    match s {
        "packed" => Ok(LstmKernel::Packed),
        "segmented" => Ok(LstmKernel::Segmented),
        other => Err(format!("must be packed or segmented, got {other}")),
    }
}

#[derive(Debug, Args)]
struct PredictCmd {
    /// A run folder written by `worker train`.
    #[arg(long, env = "WORKER_MODEL")]
    model: PathBuf,
    /// One JSON object per review (label, class, probability, probabilities of every class,
    /// positive_probability for IMDB's model, tokens, unknown_tokens).
    #[arg(long, env = "WORKER_JSON")]
    json: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "WORKER_DEVICE", default_value = "cpu")]
    device: String,
    /// Reviews to classify; without any, one review per line is read from stdin.
    texts: Vec<String>,
}

#[derive(Debug, Args)]
struct BenchCollectiveCmd {
    /// nccl (needs a GPU and libnccl.so.2) or none.
    #[arg(long, env = "TRAINER_BACKEND", default_value = "nccl")]
    backend: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "WORKER_DEVICE", default_value = "cuda")]
    device: String,
    /// Buffer length in f32 elements (default: the full vocabulary's embedding gradient,
    /// 100,684 x 128 = 51.5 MB).
    #[arg(long, env = "BENCH_ELEMENTS", default_value_t = 12_887_552)]
    elements: usize,
    /// Timed all-reduce calls.
    #[arg(long, env = "BENCH_ITERATIONS", default_value_t = 20)]
    iterations: usize,
}

#[derive(Debug, Args)]
struct BenchMemoryCmd {
    /// TOML job config for the model and optimizer (default: the tutorial's).
    #[arg(long, env = "TRAINER_CONFIG")]
    config: Option<PathBuf>,
    /// Truncated-BPTT window (0: full BPTT).
    #[arg(long, env = "TRAINER_BPTT", default_value_t = 0)]
    bptt: usize,
    /// Length of every review in the synthetic batch.
    #[arg(long, env = "BENCH_SEQ_LEN", default_value_t = 2000)]
    seq_len: usize,
    #[arg(long, env = "TRAINER_BATCH_SIZE", default_value_t = 32)]
    batch_size: usize,
    /// Vocabulary size of the synthetic model.
    #[arg(long, env = "BENCH_VOCAB", default_value_t = 20_000)]
    vocab: usize,
    /// Training steps to run.
    #[arg(long, env = "BENCH_STEPS", default_value_t = 1)]
    steps: usize,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: a local worker's stderr is a pipe to the coordinator.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn train(cmd: &TrainCmd, threads: usize) -> anyhow::Result<()> {
    let mut config = cmd
        .data
        .configure(cmd.config.resolve().context("invalid job config")?)
        .context("invalid job config")?;
    if threads > 0 {
        config.train.threads = threads;
    }
    let options = RunOptions {
        prepare: cmd.data.prepare_options(&config),
        config,
        out: cmd.out.clone(),
        resume: cmd.resume.clone(),
        checkpoint_every: cmd.checkpoint_every,
        stop_after_epoch: cmd.stop_after_epoch,
        stop_after_steps: cmd.stop_after_steps,
        eval_test_each_epoch: cmd.eval_test_each_epoch,
        lstm_kernel: cmd.lstm_kernel,
        profile_steps: cmd.profile_steps,
    };
    let summary = run_training(&options)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn predict(cmd: &PredictCmd) -> anyhow::Result<()> {
    let device = resolve_device(&cmd.device)?;
    let mut predictor = Predictor::load(&cmd.model, device)?;
    let texts: Vec<String> = if cmd.texts.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<Vec<_>, _>>()
            .context("reading reviews from stdin")?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect()
    } else {
        cmd.texts.clone()
    };
    if texts.is_empty() {
        bail!("no reviews given: pass them as arguments or one per line on stdin");
    }
    let predictions = predictor.predict(&texts)?;
    for (text, p) in texts.iter().zip(&predictions) {
        if cmd.json {
            let mut value = serde_json::to_value(p)?;
            value["text"] = serde_json::Value::String(text.clone());
            println!("{value}");
        } else {
            let excerpt: String = text.chars().take(60).collect();
            let each: Vec<String> = p.probabilities.iter().map(|(c, v)| format!("{c}={v:.4}")).collect();
            println!("{}\t{:.4}\t{}\t{excerpt}", p.label, p.probability, each.join(" "));
        }
    }
    Ok(())
}

fn bench(cmd: &BenchMemoryCmd) -> anyhow::Result<()> {
    let mut config = match &cmd.config {
        Some(path) => trainer_core::JobConfig::from_toml_file(path)?,
        None => trainer_core::JobConfig::default(),
    };
    config.train.bptt = cmd.bptt;
    config.train.batch_size = cmd.batch_size;
    config.train.device = "cpu".into();
    config.train.amp = false;
    config.validate()?;
    if cmd.vocab < 3 || cmd.seq_len == 0 {
        bail!("--vocab must be at least 3 and --seq-len at least 1");
    }
    let report = bench_memory(&MemoryBenchOptions {
        config,
        vocab_size: cmd.vocab,
        seq_len: cmd.seq_len,
        steps: cmd.steps,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn bench_collective(cmd: &BenchCollectiveCmd) -> anyhow::Result<()> {
    if cmd.backend == "nccl" {
        let nccl = worker::collective::nccl_lib::ensure_nccl_loadable()?;
        tracing::info!(library = %nccl.path.display(), version = %nccl.version, "NCCL in use");
    }
    let device = worker::device::resolve_device(&cmd.device)?;
    let report = worker::collective::check::check_collective(
        &cmd.backend,
        device,
        cmd.elements,
        cmd.iterations.max(1),
    )?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = trainer_core::cli::parse_treating_empty_env_as_unset();
    init_tracing();
    if cli.threads > 0 {
        tch::set_num_threads(cli.threads.min(1024) as i32);
    }
    let result = match &cli.command {
        Command::Train(cmd) => train(cmd, cli.threads),
        Command::Predict(cmd) => predict(cmd),
        Command::BenchMemory(cmd) => bench(cmd),
        Command::BenchCollective(cmd) => bench_collective(cmd),
        Command::Join(args) => worker::agent::run_agent(args, move |job, collective| {
            // As `worker train`: without --threads, the job's train.threads (this closure
            // runs on the replica thread, where the steps run).
            if cli.threads == 0 && job.config.train.threads > 0 {
                tch::set_num_threads(job.config.train.threads.min(1024) as i32);
            }
            let replica = worker::agent::TrainerReplica::new(job, collective)?;
            Ok(Box::new(replica) as Box<dyn worker::agent::Replica>)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<worker::agent::RestartRequested>() => rejoin(),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(trainer_core::exit::code_for(e.chain()))
        }
    }
}

/// The coordinator restarts the group: start over as a fresh process with the same
/// arguments and environment (a replica stuck in a collective cannot be reused in-process).
fn rejoin() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let error = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe).args(&args[1..]).exec(),
        Err(e) => e,
    };
    eprintln!("error: the coordinator restarts the group, but this worker cannot start again: {error}");
    ExitCode::from(trainer_core::exit::LOST)
}

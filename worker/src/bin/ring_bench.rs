//! `ring_bench`: times the TCP ring all-reduce among W local processes and compares it with
//! a plain memory copy of the same buffer, measured in the same run.
//!
//! ```text
//! cargo run --release -p worker --bin ring_bench -- --world 4
//! bench/ring_allreduce.sh          # W = 2 and W = 4, as a table
//! ```
//!
//! The launcher measures the copy, starts W copies of itself (`--child-rank`), relays the
//! listener addresses (each child prints its address, then reads everyone's on stdin, as a
//! coordinator would relay them), and collects one result line per rank. Every rank checks
//! its result bit for bit against the ring order computed locally and prints a checksum;
//! the launcher fails if any rank failed, is inexact, or differs from another.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use worker::collective::ring::reference_all_reduce_mean;
use worker::collective::{Collective, RingCollective, RingListener, RingOptions};

/// The launcher hands the job token to its children through this variable.
const TOKEN_ENV: &str = "RING_BENCH_JOB_TOKEN";

#[derive(Debug, Parser)]
#[command(name = "ring_bench", about = "Time the TCP ring all-reduce among local processes")]
struct Args {
    /// Processes in the ring.
    #[arg(long, env = "RING_BENCH_WORLD", default_value_t = 2)]
    world: usize,
    /// f32 elements in the buffer (default: the full-vocab embedding gradient, 100,684 x 128).
    #[arg(long, env = "RING_BENCH_ELEMS", default_value_t = 100_684 * 128)]
    elems: usize,
    /// Timed all-reduce calls per rank (and timed copies in the launcher).
    #[arg(long, env = "RING_BENCH_ITERS", default_value_t = 10)]
    iters: usize,
    /// Untimed calls before the timed ones.
    #[arg(long, env = "RING_BENCH_WARMUP", default_value_t = 2)]
    warmup: usize,
    /// Ring chunk size in KiB.
    #[arg(long, env = "RING_BENCH_CHUNK_KIB", default_value_t = 256)]
    chunk_kib: usize,
    /// Ring timeout (no byte moved for this long fails the call), in milliseconds.
    #[arg(long, env = "RING_BENCH_TIMEOUT_MS", default_value_t = 30_000)]
    timeout_ms: u64,
    /// Fault injection: this rank joins the ring but never calls the all-reduce, so the
    /// others must fail with a timeout naming it.
    #[arg(long, env = "RING_BENCH_STALL_RANK")]
    stall_rank: Option<usize>,
    /// Internal: run as this rank of a ring started by the launcher. No env variable on
    /// purpose: an exported one would turn every launcher into a child.
    #[arg(long, hide = true)]
    child_rank: Option<usize>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let result = match args.child_rank {
        Some(rank) => run_child(&args, rank),
        None => run_launcher(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let who = args.child_rank.map(|r| format!(" rank {r}")).unwrap_or_default();
            eprintln!("ring_bench{who}: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Rank `rank`'s input: deterministic, different on every rank, mixed signs and scales so
/// that the summation order shows in the low bits.
fn input_value(rank: usize, i: usize) -> f32 {
    let h = (i as u64 ^ ((rank as u64 + 1) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let unit = (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    unit * [1e-3f32, 1.0, 1e3][(h >> 20) as usize % 3]
}

fn fill_input(rank: usize, buffer: &mut [f32]) {
    for (i, v) in buffer.iter_mut().enumerate() {
        *v = input_value(rank, i);
    }
}

/// FNV-1a over the bits: equal checksums on all ranks mean (barring collisions) equal bits.
fn checksum(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        v.to_bits().to_le_bytes().iter().fold(h, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time this process has used (all its threads, user and system), in milliseconds.
/// On a machine shared with other work the wall time of a call varies with the load; the
/// CPU time it costs does much less.
fn process_cpu_ms() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return f64::NAN;
    }
    now.tv_sec as f64 * 1e3 + now.tv_nsec as f64 / 1e6
}

fn run_child(args: &Args, rank: usize) -> anyhow::Result<()> {
    if rank >= args.world {
        bail!("rank {rank} is not below the world size {}", args.world);
    }
    let token = std::env::var(TOKEN_ENV).with_context(|| format!("{TOKEN_ENV} is not set"))?;
    let listener = RingListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "addr {}", listener.local_addr())?;
    stdout.flush()?;

    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the peer list")?;
    let peers = line
        .trim()
        .strip_prefix("peers ")
        .context("expected a `peers ADDR,ADDR,...` line from the launcher")?
        .split(',')
        .map(|a| a.parse::<SocketAddr>().with_context(|| format!("bad peer address {a:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = RingOptions {
        timeout: Duration::from_millis(args.timeout_ms),
        chunk_bytes: args.chunk_kib * 1024,
        ..RingOptions::new(token)
    };
    let mut ring = RingCollective::connect(listener, rank, args.world, &peers, options)?;

    if args.stall_rank == Some(rank) {
        // Hold the connections open without ever taking part, then leave.
        std::thread::sleep(Duration::from_millis(args.timeout_ms.saturating_mul(3)));
        writeln!(stdout, "result rank={rank} stalled=true")?;
        return Ok(());
    }

    let mut input = vec![0.0f32; args.elems];
    fill_input(rank, &mut input);
    let mut buffer = input.clone();
    for _ in 0..args.warmup {
        buffer.copy_from_slice(&input);
        ring.all_reduce_mean_slice(&mut buffer)?;
    }
    let mut times = Vec::with_capacity(args.iters);
    let mut cpu_times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters.max(1) {
        buffer.copy_from_slice(&input);
        // Start every timed call together, so that a call does not include a slow peer's
        // refill of its buffer.
        ring.barrier()?;
        let (start, cpu_start) = (Instant::now(), process_cpu_ms());
        ring.all_reduce_mean_slice(&mut buffer)?;
        times.push(ms(start.elapsed()));
        cpu_times.push(process_cpu_ms() - cpu_start);
    }

    // The ring's exact order, computed here from every rank's (deterministic) input.
    let inputs: Vec<Vec<f32>> = (0..args.world)
        .map(|r| {
            let mut v = vec![0.0f32; args.elems];
            fill_input(r, &mut v);
            v
        })
        .collect();
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let expected = reference_all_reduce_mean(&refs);
    let exact = expected.iter().zip(&buffer).all(|(e, b)| e.to_bits() == b.to_bits());
    let (min, max) = times.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
    writeln!(
        stdout,
        "result rank={rank} median_ms={:.3} min_ms={min:.3} max_ms={max:.3} cpu_ms={:.3} checksum={:016x} exact={exact}",
        median(times),
        median(cpu_times),
        checksum(&buffer)
    )?;
    Ok(())
}

/// Kills and reaps the children if the launcher stops early, so that none is left behind.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn run_launcher(args: &Args) -> anyhow::Result<()> {
    if args.world == 0 {
        bail!("--world must be at least 1");
    }
    if let Some(stall) = args.stall_rank {
        if stall >= args.world {
            bail!("--stall-rank {stall} is not below --world {}", args.world);
        }
    }
    let bytes = args.elems * 4;

    // The baseline: one plain copy of the same buffer, on a quiet machine.
    let mut src = vec![0.0f32; args.elems];
    fill_input(0, &mut src);
    let mut dst = vec![0.0f32; args.elems];
    let mut copy_times = Vec::new();
    for i in 0..args.warmup + args.iters.max(1) {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        if i >= args.warmup {
            copy_times.push(ms(start.elapsed()));
        }
    }
    let copy_ms = median(copy_times);
    drop((src, dst));

    let exe = std::env::current_exe().context("locating this program")?;
    // Unique per run, so that rings of two concurrent runs cannot join each other.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let token = format!("ring-bench-{}-{nanos}", std::process::id());
    let mut children = Children(Vec::new());
    let mut pipes: Vec<(ChildStdin, BufReader<ChildStdout>)> = Vec::new();
    let mut stderr_readers: Vec<JoinHandle<String>> = Vec::new();
    for rank in 0..args.world {
        let mut command = Command::new(&exe);
        command
            .args(["--child-rank", &rank.to_string()])
            .args(["--world", &args.world.to_string()])
            .args(["--elems", &args.elems.to_string()])
            .args(["--iters", &args.iters.to_string()])
            .args(["--warmup", &args.warmup.to_string()])
            .args(["--chunk-kib", &args.chunk_kib.to_string()])
            .args(["--timeout-ms", &args.timeout_ms.to_string()])
            .env(TOKEN_ENV, &token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Piped, not inherited: ranks that fail together would interleave their
            // messages mid-line on a shared stderr.
            .stderr(Stdio::piped());
        if let Some(stall) = args.stall_rank {
            command.args(["--stall-rank", &stall.to_string()]);
        }
        let mut child = command.spawn().with_context(|| format!("starting rank {rank}"))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?);
        let mut stderr = child.stderr.take().context("child stderr")?;
        stderr_readers.push(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        }));
        children.0.push(child);
        pipes.push((stdin, stdout));
    }

    // Rendezvous: collect every listener address, then tell every rank all of them.
    let mut addrs = Vec::new();
    for (rank, (_, stdout)) in pipes.iter_mut().enumerate() {
        let mut line = String::new();
        stdout.read_line(&mut line).with_context(|| format!("reading rank {rank}'s address"))?;
        let addr = line
            .trim()
            .strip_prefix("addr ")
            .with_context(|| format!("rank {rank} did not report an address (it said {line:?})"))?;
        addrs.push(addr.to_string());
    }
    let peer_line = format!("peers {}\n", addrs.join(","));
    for (stdin, _) in &mut pipes {
        stdin.write_all(peer_line.as_bytes())?;
        stdin.flush()?;
    }

    let mut results = Vec::new();
    for (rank, (_, stdout)) in pipes.iter_mut().enumerate() {
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        results.push((rank, line.trim().to_string()));
    }
    let mut failed = Vec::new();
    for ((rank, child), stderr) in children.0.iter_mut().enumerate().zip(stderr_readers) {
        let status = child.wait()?;
        let stderr = stderr.join().unwrap_or_default();
        if !status.success() {
            failed.push(format!("rank {rank} ({status}): {}", stderr.trim()));
        } else if !stderr.trim().is_empty() {
            eprintln!("rank {rank}: {}", stderr.trim());
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }

    println!(
        "ring all-reduce: world {}, {} f32 ({:.1} MB), chunk {} KiB, {} timed calls per rank",
        args.world,
        args.elems,
        bytes as f64 / 1e6,
        args.chunk_kib,
        args.iters
    );
    let mut slowest = 0.0f64;
    let mut cpu_all_ranks = 0.0f64;
    let mut checksums = Vec::new();
    for (rank, line) in &results {
        if field(line, "stalled").is_some() {
            println!("  rank {rank}: stalled on purpose");
            continue;
        }
        let median_ms: f64 = field(line, "median_ms")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("rank {rank} gave no result (it said {line:?})"))?;
        let checksum = field(line, "checksum").unwrap_or("?").to_string();
        let exact = field(line, "exact") == Some("true");
        println!(
            "  rank {rank}: median {median_ms:.2} ms (min {} ms, max {} ms), CPU {} ms, checksum {checksum}, \
             exact {exact}",
            field(line, "min_ms").unwrap_or("?"),
            field(line, "max_ms").unwrap_or("?"),
            field(line, "cpu_ms").unwrap_or("?")
        );
        if !exact {
            bail!("rank {rank}'s result differs from the ring order computed locally");
        }
        slowest = slowest.max(median_ms);
        cpu_all_ranks += field(line, "cpu_ms").and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        checksums.push(checksum);
    }
    if checksums.windows(2).any(|w| w[0] != w[1]) {
        bail!("the ranks ended with different bits: checksums {checksums:?}");
    }
    let moved = 2.0 * (args.world as f64 - 1.0) / args.world as f64 * bytes as f64;
    let busbw = moved / (slowest / 1e3) / 1e9;
    let ratio = slowest / copy_ms;
    println!("  memcpy of the same buffer: median {copy_ms:.2} ms");
    println!(
        "  CPU time per call, all ranks together: {cpu_all_ranks:.1} ms ({:.1} ms of wall time on {} \
         idle cores at best)",
        cpu_all_ranks / std::thread::available_parallelism().map_or(1, |n| n.get()).min(args.world) as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(args.world)
    );
    println!(
        "  all-reduce: {slowest:.2} ms per call (slowest rank's median) = {ratio:.1}x the copy; \
         each rank sends {:.1} MB per call ({busbw:.2} GB/s)",
        moved / 1e6
    );
    println!(
        "RESULT world={} elems={} mbytes={:.2} allreduce_ms={slowest:.3} memcpy_ms={copy_ms:.3} \
         ratio={ratio:.2} busbw_gbs={busbw:.3} cpu_ms_all_ranks={cpu_all_ranks:.3}",
        args.world,
        args.elems,
        bytes as f64 / 1e6
    );
    Ok(())
}

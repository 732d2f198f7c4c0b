//! Elastic world size (`--workers MIN:MAX`, issue 22) with real processes on 127.0.0.1: a
//! local worker killed with no replacement (the job ends at 2 of 3), the last worker above
//! MIN killed (exit 75 naming the cause), external workers that start below MAX and grow
//! when a worker joins later, and a worker that joins while rank 0 is uploading a checkpoint
//! (rank 0's link held mid-upload by a proxy, common/gate.rs). Dropout is off, so that the
//! steps after a resize can be compared with an uninterrupted run at another world size
//! (tests/tests/world_size.rs).

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// The world-size tests' job, for 3 epochs (63 steps).
fn job() -> String {
    GLOBAL_BATCH_JOB.replace("epochs = 2", "epochs = 3")
}

const SECRET: &str = "elastic-test-secret-5d1e";

/// One of these jobs at a time: each runs 3 or 4 processes, and side by side on 2 cores their
/// steps and joins took minutes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `--workers 2:3` coordinator for external workers (a synthetic corpus, 12 epochs of the
/// external tests' job, 3 s heartbeats) with `args`; its folder and its address.
fn external_elastic(args: &[&str]) -> (tempfile::TempDir, trainer_tests::ExternalCoordinator, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &external_job(12));
    let config = config.to_str().unwrap().to_string();
    let mut all = vec!["--config", &config, "--heartbeat-timeout", "3"];
    all.extend_from_slice(args);
    let coord = trainer_tests::ExternalCoordinator::start_elastic(
        &bin("coordinator"),
        "2:3",
        SECRET,
        (200, 20),
        &all,
    );
    let addr = coord.addr().to_string();
    (dir, coord, addr)
}

/// An external job ended with `world` workers after `resizes` and `restarts`, with the
/// world sizes `sizes` in turn, equal replicas, and every worker exited 0.
fn assert_external_end(
    out: &std::path::Path,
    log: &str,
    (world, resizes, restarts): (u64, u64, u64),
    sizes: &[u64],
    workers: &mut [std::process::Child],
) {
    let s = summary(out);
    let counts = (s["world_size"].as_u64(), s["resizes"].as_u64(), s["restarts"].as_u64());
    assert_eq!(counts, (Some(world), Some(resizes), Some(restarts)), "{log}");
    let history: Vec<u64> = s["world_sizes"]
        .as_array()
        .expect("world_sizes")
        .iter()
        .map(|w| w["world_size"].as_u64().unwrap())
        .collect();
    assert_eq!(history, sizes, "{log}");
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.len() == world as usize && sums.iter().all(|c| c == &sums[0]), "{sums:?}");
    for worker in workers {
        let status = wait_exit(worker, Duration::from_secs(20));
        assert!(status.success(), "a worker {status}\n{log}");
    }
}

fn committed(line: &str) -> bool {
    line.contains("checkpoint committed")
}

#[test]
fn a_local_worker_lost_without_replacement_leaves_the_job_at_two_of_three() {
    let _one = one_at_a_time();
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &job());
    let marker = format!("elastic-shrink-{}", std::process::id());
    // The reference: the same global batches at a fixed 2 workers.
    let whole = dir.path().join("whole");
    run_ok(coordinator(2, &config, &whole, &data, &marker).args(FAST_FAILURE));
    let reference = step_records(&whole);

    let out = dir.path().join("elastic");
    let mut job = Job::start_range("2:3", &config, &out, &data, &marker, &[]);
    let victim = job.wait_for_rank_pid(2);
    job.wait_for("a checkpoint", committed);
    send_signal(victim, libc::SIGKILL);
    let (status, log) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("resize 1/10: 3 -> 2 workers"), "{log}");
    let s = summary(&out);
    assert_eq!(
        (s["world_size"].as_u64(), s["resizes"].as_u64(), s["restarts"].as_u64()),
        (Some(2), Some(1), Some(0))
    );
    let spans = s["world_sizes"].as_array().expect("world_sizes");
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!((spans[0]["world_size"].as_u64(), spans[1]["world_size"].as_u64()), (Some(3), Some(2)));
    let resized_at = spans[1]["from_global_step"].as_u64().unwrap();
    assert!(resized_at > 0 && resized_at.is_multiple_of(3), "resumed from a checkpoint: {spans:?}");
    let resize = metrics_records(&out, |v| v["type"] == "resize");
    assert_eq!(resize.len(), 1);
    assert_eq!(
        (resize[0]["world_size_before"].as_u64(), resize[0]["world_size_after"].as_u64()),
        (Some(3), Some(2))
    );
    assert!(resize[0]["cause"].as_str().unwrap().contains("rank 2"), "{resize:?}");
    // Every step of the job, at 3 workers and then at 2, is the fixed 2-worker run's step.
    let after = step_records(&out);
    assert_eq!(after.last().map(|s| s.0), Some(63));
    let compared = assert_same_steps(&reference, &after, 1e-3, "2:3 resized vs 2 fixed");
    assert!(compared >= 63, "only {compared} steps compared");
    assert_none_left(&marker);
}

#[test]
fn the_last_worker_above_min_lost_ends_the_job_with_exit_75_and_the_cause() {
    let _one = one_at_a_time();
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &GLOBAL_BATCH_JOB.replace("epochs = 2", "epochs = 20"));
    let marker = format!("elastic-min-{}", std::process::id());
    let out = dir.path().join("run");
    let mut job = Job::start_range("2:3", &config, &out, &data, &marker, &[]);
    let first = job.wait_for_rank_pid(2);
    job.wait_for("a checkpoint", committed);
    send_signal(first, libc::SIGKILL);
    job.wait_for("the resize", |l| l.contains("resize 1/10: 3 -> 2 workers"));
    let second = job.wait_for_rank_pid(1);
    job.wait_for("a checkpoint of the 2 workers", committed);
    send_signal(second, libc::SIGKILL);
    let (status, log) = job.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.contains("1 worker(s) left, fewer than the 2 that --workers 2:3 needs"), "{log}");
    assert!(log.contains("rank 1"), "the cause names the lost rank:\n{log}");
    assert_none_left(&marker);
}

/// External workers: 2 of up to 3 come, the job starts with them after --rendezvous-wait;
/// a third that comes later is admitted at the next checkpoint, and the job ends at 3.
#[test]
fn external_workers_start_below_max_and_a_late_one_joins_at_a_checkpoint() {
    let _one = one_at_a_time();
    let (_dir, mut coord, addr) = external_elastic(&["--rendezvous-wait", "2"]);
    let marker = format!("elastic-join-{}", std::process::id());
    let join = |addr: &str| join_worker(addr, SECRET, &marker);
    let mut workers = vec![join(&addr), join(&addr)];
    wait_for_log(&coord, "checkpoint committed");
    workers.push(join(&addr));
    let (status, _) = coord.wait(Duration::from_secs(300));
    let log = coord.stderr();
    assert!(status.success(), "{status}\n{log}");
    // Starting with 2 is no resize: the one resize is the growth, 2 -> 3.
    assert!(
        log.contains(
            "starting with 2 of up to 3 workers: 2 of 3 workers registered within 2 s (--rendezvous-wait)"
        ),
        "{log}"
    );
    assert!(log.contains("asks to join") && log.contains("resize 1/10: 2 -> 3 workers"), "{log}");
    assert!(!log.contains("-> 2 workers"), "{log}");
    assert_external_end(&coord.out, &log, (3, 1, 0), &[2, 3], &mut workers);
    let resizes = metrics_records(&coord.out, |v| v["type"] == "resize");
    assert_eq!(resizes.len(), 1, "{resizes:?}");
    assert_none_left(&marker);
}

/// External workers at 3 of `2:3`: one is killed and none replaces it within
/// --rejoin-timeout, so the group goes on with 2; a new worker then joins and the group is 3
/// again from the next checkpoint (3 -> 2 -> 3).
#[test]
fn external_workers_shrink_after_a_loss_and_grow_back_when_a_worker_joins() {
    let _one = one_at_a_time();
    let (_dir, mut coord, addr) = external_elastic(&["--rejoin-timeout", "4"]);
    let marker = format!("elastic-back-{}", std::process::id());
    let join = |addr: &str| join_worker(addr, SECRET, &marker);
    let mut workers = vec![join(&addr), join(&addr)];
    let mut victim = join(&addr);
    wait_for_log(&coord, "checkpoint committed");
    victim.kill().expect("kill a worker");
    let _ = victim.wait();
    wait_for_log(&coord, "resize 1/10: 3 -> 2 workers");
    workers.push(join(&addr));
    let (status, _) = coord.wait(Duration::from_secs(300));
    let log = coord.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("2 of 3 workers registered within 4 s (--rejoin-timeout)"), "{log}");
    assert!(log.contains("resize 2/10: 2 -> 3 workers"), "{log}");
    assert_external_end(&coord.out, &log, (3, 2, 1), &[3, 2, 3], &mut workers);
    assert_none_left(&marker);
}

/// The upload test's job: the world-size tests' job (global batches of 15, a checkpoint every
/// 3 steps) with a model big enough that a checkpoint (the parameters and Adam's two
/// moments, about 2.4 MB) spans more than one 1 MiB upload chunk. The coordinator logs
/// `upload started` once the first chunk is in, so the rest is still on its way then.
fn upload_job() -> String {
    GLOBAL_BATCH_JOB.replace("embed_dim = 12", "embed_dim = 64").replace("hidden = 12", "hidden = 192")
}

/// Bytes that rank 0's link lets through once armed: the first 1 MiB chunk of an upload and
/// the small messages around it, not the rest of a 2.4 MB checkpoint.
const HOLD_AFTER: u64 = 1_310_720;

/// `worker join` to `addr` with rank hint `rank`, its log in `log`.
fn worker_at(addr: &str, rank: usize, marker: &str, log: &std::path::Path) -> std::process::Child {
    scrubbed(std::process::Command::new(bin("worker")), marker)
        .arg("join")
        .env("COORDINATOR_ADDR", addr)
        .env("TRAINER_JOB_SECRET", SECRET)
        .env("TRAINER_RANK", rank.to_string())
        .env("WORKER_RING_TIMEOUT", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("a worker log"))
        .spawn()
        .expect("start a worker")
}

/// The checkpoint whose upload the coordinator has started and not finished (it logged
/// `upload started` for it and no `artifact stored` nor `upload broke off`), if any.
fn open_upload(log: &str) -> Option<String> {
    let mut open = None;
    for line in log.lines() {
        let file = field(line, "file=").map(|f| f.trim_matches('"'));
        let Some(file) = file.filter(|f| f.starts_with("checkpoint-")) else { continue };
        if line.contains("upload started") {
            open = Some(file.to_string());
        } else if line.contains("artifact stored") || line.contains("upload broke off") {
            open = open.filter(|f| f != file);
        }
    }
    open
}

/// Holds rank 0's link (through `proxy`) in the middle of a checkpoint upload: armed, the
/// link lets [`HOLD_AFTER`] more bytes through, and the hold is kept when it caught an upload
/// that the coordinator has started; otherwise (it caught other traffic, or the tail of an
/// upload and the start of the next) it is released and armed again. Returns the file.
fn hold_inside_an_upload(coord: &trainer_tests::ExternalCoordinator, proxy: &GatedProxy) -> String {
    for _ in 0..10 {
        proxy.hold_after(HOLD_AFTER);
        assert!(
            proxy.wait_until_holding(Duration::from_secs(90)),
            "rank 0 sent nothing:\n{}",
            coord.stderr()
        );
        // The coordinator reads what got through within this.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(file) = open_upload(&coord.stderr()) {
            eprintln!(
                "rank 0's link held inside the upload of {file} ({} bytes through it in all)",
                proxy.passed()
            );
            return file;
        }
        eprintln!("the hold caught no checkpoint upload; released, armed again");
        proxy.release();
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no hold caught a checkpoint upload in 10 tries:\n{}", coord.stderr())
}

/// The global step in a checkpoint's file name (`checkpoint-000000012-mid.safetensors`).
fn step_of(file: &str) -> u64 {
    file.strip_prefix("checkpoint-").and_then(|r| r.get(..9)?.parse().ok()).expect("a step in the name")
}

/// `bytes` are the whole checkpoint that `digest` (from checkpoint.json) describes, a
/// safetensors file whose tensor data has the hash its metadata records, of `step`.
fn assert_whole_checkpoint(bytes: &[u8], digest: &serde_json::Value, step: u64, what: &str) {
    assert_eq!(Some(bytes.len() as u64), digest["bytes"].as_u64(), "{what}: size");
    assert_eq!(Some(sha256_hex(bytes).as_str()), digest["sha256"].as_str(), "{what}: sha256");
    let (header, meta) = safetensors::SafeTensors::read_metadata(bytes).expect("a safetensors file");
    let meta =
        meta.metadata().as_ref().and_then(|m| m.get("imdb_ddp_checkpoint")).expect("checkpoint metadata");
    let meta: serde_json::Value = serde_json::from_str(meta).expect("JSON metadata");
    assert_eq!(meta["data_sha256"].as_str(), Some(sha256_hex(&bytes[8 + header..]).as_str()), "{what}");
    assert_eq!(meta["position"]["global_step"].as_u64(), Some(step), "{what}: {meta}");
    let tensors = safetensors::SafeTensors::deserialize(bytes).expect("tensors");
    assert!(tensors.names().iter().any(|n| n.starts_with("adam.exp_avg.")), "{what}: no optimizer state");
}

/// The first lines of `log` that hold each of `marks` come in that order; panics naming the
/// first one missing or out of order.
fn assert_in_order(log: &str, marks: &[&dyn Fn(&str) -> bool], names: &[&str]) {
    let lines: Vec<&str> = log.lines().collect();
    let at: Vec<usize> = marks
        .iter()
        .zip(names)
        .map(|(m, n)| lines.iter().position(|l| m(l)).unwrap_or_else(|| panic!("no {n} line:\n{log}")))
        .collect();
    for (pair, n) in at.windows(2).zip(names.windows(2)) {
        assert!(
            pair[0] < pair[1],
            "{} (line {}) came after {} (line {}):\n{log}",
            n[0],
            pair[0],
            n[1],
            pair[1]
        );
    }
}

/// A worker joins while rank 0 is uploading a checkpoint (issue 22's proof): rank 0 talks to
/// the coordinator through a proxy that holds its link once the coordinator has logged
/// `upload started` and before the upload's last bytes are through, and the third worker
/// registers while it is held. It is told to wait before that checkpoint is committed, and
/// comes in from exactly that checkpoint, which is whole; the job ends at 3 with equal
/// replicas.
#[test]
fn a_worker_that_joins_during_a_checkpoint_upload_comes_in_from_that_checkpoint() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upload_job());
    // Heartbeats of rank 0 wait behind the held upload: 30 s lets them.
    let mut coord = trainer_tests::ExternalCoordinator::start_elastic(
        &bin("coordinator"),
        "2:3",
        SECRET,
        (200, 100),
        &["--config", config.to_str().unwrap(), "--heartbeat-timeout", "30", "--rendezvous-wait", "2"],
    );
    let proxy = GatedProxy::start(coord.addr());
    let marker = format!("elastic-upload-{}", std::process::id());
    let logs: Vec<_> = (0..3).map(|r| dir.path().join(format!("worker-{r}.log"))).collect();
    let mut workers =
        vec![worker_at(&proxy.addr, 0, &marker, &logs[0]), worker_at(coord.addr(), 1, &marker, &logs[1])];
    wait_for_log(&coord, "checkpoint committed");

    let file = hold_inside_an_upload(&coord, &proxy);
    let step = step_of(&file);
    workers.push(worker_at(coord.addr(), 2, &marker, &logs[2]));
    wait_for_log(&coord, "asks to join");
    // Still held: the coordinator has not got the rest of the file.
    assert!(proxy.holding(), "the hold ended");
    assert_eq!(open_upload(&coord.stderr()).as_deref(), Some(file.as_str()), "{}", coord.stderr());
    proxy.release();

    // The checkpoint the group re-forms from, as it is then (two commits later it is gone).
    wait_for_log(&coord, "resize 1/10: 2 -> 3 workers");
    let out = coord.out.clone();
    let pointer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint.json")).unwrap()).unwrap();
    let resumed = std::fs::read(out.join(&file)).expect("the checkpoint of the resize");
    assert_eq!(pointer["file"].as_str(), Some(file.as_str()), "{pointer}");
    assert_whole_checkpoint(&resumed, &pointer["digest"], step, &file);

    let (status, _) = coord.wait(Duration::from_secs(300));
    let log = coord.stderr();
    assert!(status.success(), "{status}\n{log}");
    // In the coordinator's own order: the upload of `file` started, the joiner was told to
    // wait, then the file was stored and committed, and the group grew from it.
    // The service quotes the name (`file="..."`); the driver does not.
    let stored = format!("file={file}");
    let uploaded = format!("file=\"{file}\"");
    assert_in_order(
        &log,
        &[
            &|l: &str| l.contains("upload started") && l.contains(&uploaded),
            &|l: &str| l.contains("asks to join"),
            &|l: &str| l.contains("artifact stored") && l.contains(&uploaded),
            &|l: &str| l.contains("checkpoint committed") && l.contains(&stored),
            &|l: &str| l.contains("resize 1/10: 2 -> 3 workers"),
        ],
        &["upload started", "asks to join", "artifact stored", "checkpoint committed", "resize"],
    );
    assert!(log.contains("2 of 3 workers registered within 2 s (--rendezvous-wait)"), "{log}");
    let resizes = metrics_records(&out, |v| v["type"] == "resize");
    let grown = resizes.last().expect("a resize record");
    assert_eq!(
        (grown["world_size_before"].as_u64(), grown["world_size_after"].as_u64()),
        (Some(2), Some(3)),
        "{resizes:?}"
    );
    assert_eq!(grown["resumed_from_global_step"].as_u64(), Some(step), "{grown}");
    assert!(grown["cause"].as_str().unwrap().contains("asked to join"), "{grown}");
    let spans = summary(&out)["world_sizes"].clone();
    assert_eq!(
        spans.as_array().and_then(|s| s.last()).map(|s| s["from_global_step"].clone()),
        Some(step.into())
    );
    // The joiner was refused and told to keep trying, then restored that checkpoint.
    let joiner = std::fs::read_to_string(&logs[2]).unwrap();
    assert!(joiner.contains("admitted at the next checkpoint (keep retrying)"), "{joiner}");
    let restored: Vec<&str> = joiner
        .lines()
        .filter(|l| l.contains("resuming from the job's checkpoint"))
        .filter_map(|l| field(l, "global_step="))
        .collect();
    assert_eq!(restored.first().copied(), Some(step.to_string().as_str()), "{joiner}");
    // The checkpoints left in the run folder are whole too.
    let pointer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint.json")).unwrap()).unwrap();
    let mut record = &pointer;
    while let Some(name) = record["file"].as_str() {
        let bytes = std::fs::read(out.join(name)).expect("a committed checkpoint");
        assert_whole_checkpoint(&bytes, &record["digest"], step_of(name), name);
        record = &record["previous"];
    }
    assert_external_end(&out, &log, (3, 1, 0), &[2, 3], &mut workers);
    assert_none_left(&marker);
}

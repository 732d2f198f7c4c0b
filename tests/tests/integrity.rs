//! Faults quieter than a process death, with real processes on 127.0.0.1: a checkpoint
//! whose bytes changed on disk (one flipped bit, a truncation), every checkpoint damaged, a
//! run folder that fills up mid-run, and one without room or not writable from the start.
//!
//! What must hold: nothing damaged is restored (the job falls back to the previous
//! checkpoint and ends bitwise equal to the uninterrupted run, or stops with exit 6 naming
//! every file), and a storage failure is reported as one (exit 5, never 75, never a
//! restart), with the last good checkpoint intact, so that a resume after freeing space ends
//! bitwise equal too.
//!
//! The storage tests mount small tmpfs filesystems, which needs root; elsewhere they print
//! a skip line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Flips one bit near the end of `path` (inside a tensor: the file still parses).
fn flip_a_bit(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() - 37;
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

fn truncate_to_half(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len / 2).unwrap();
}

/// The current and previous checkpoint files that `checkpoint.json` of `out` names.
fn committed_files(out: &Path) -> (PathBuf, PathBuf) {
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint.json")).unwrap()).unwrap();
    let file = |v: &serde_json::Value| out.join(v.as_str().expect("a file name"));
    (file(&record["file"]), file(&record["previous_file"]))
}

/// A copy of a finished run's folder without its results, as a run that died after its
/// last checkpoint leaves it.
fn copy_of_checkpoints(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint") || name == "metrics.jsonl" {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn a_damaged_checkpoint_is_set_aside_and_the_job_falls_back_to_the_previous_one() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path(), &data, RESTARTABLE_JOB);
    let config = write_config(dir.path(), RESTARTABLE_JOB);
    let finished = dir.path().join("reference");

    for (name, damage) in [("bit-flip", flip_a_bit as fn(&Path)), ("truncated", truncate_to_half)] {
        let out = dir.path().join(name);
        copy_of_checkpoints(&finished, &out);
        let (current, previous) = committed_files(&out);
        damage(&current);
        let marker = format!("{name}-{}", std::process::id());
        let resumed = run(coordinator(2, &config, &out, &data, &marker).args(FAST_FAILURE).arg("--resume"));
        let log = stderr(&resumed);
        assert!(resumed.status.success(), "{name}: {}\n{log}", resumed.status);
        assert_none_left(&marker);
        // Named in a warning, set aside (never deleted), and the previous one restored.
        let current_name = current.file_name().unwrap().to_string_lossy().into_owned();
        assert!(log.contains(&current_name) && log.contains("cannot be restored"), "{name}\n{log}");
        // Set aside with its damage (the run then wrote a new checkpoint of that step).
        let aside = std::fs::read(out.join(format!("{current_name}.corrupt"))).expect("set aside");
        assert!(aside != std::fs::read(&current).unwrap(), "{name}: the damaged bytes came back");
        let previous_step: u32 =
            previous.file_name().unwrap().to_string_lossy()[11..20].parse().expect("a step in the name");
        assert!(workers_restored_a_checkpoint(&log, previous_step - 1), "{name}: no resume\n{log}");
        assert_same_result(&out, &expected, &log);
    }
}

#[test]
fn when_every_checkpoint_is_damaged_the_job_stops_with_exit_6_naming_each() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), RESTARTABLE_JOB);
    let finished = dir.path().join("finished");
    let marker = format!("all-damaged-{}", std::process::id());
    run_ok(coordinator(2, &config, &finished, &data, &marker).args(FAST_FAILURE));
    let out = dir.path().join("damaged");
    copy_of_checkpoints(&finished, &out);
    let (current, previous) = committed_files(&out);
    flip_a_bit(&current);
    truncate_to_half(&previous);
    let resumed = run(coordinator(2, &config, &out, &data, &marker).args(FAST_FAILURE).arg("--resume"));
    let log = stderr(&resumed);
    assert_eq!(resumed.status.code(), Some(6), "{log}");
    let last = log.lines().last().unwrap_or_default();
    for (file, fault) in [(&current, "contents changed"), (&previous, "truncated")] {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(last.contains(&name) && last.contains(fault), "{name} ({fault}) not named:\n{last}");
        assert!(out.join(format!("{name}.corrupt")).is_file(), "{name} not set aside");
    }
    assert!(!log.contains("worker registered"), "workers started on a damaged checkpoint\n{log}");
    assert_none_left(&marker);
}

/// A tmpfs of `size` mounted at `at` (read-only with `read_only`), unmounted on drop; None
/// (with a skip line) where mounting is not allowed.
struct SmallDisk {
    at: PathBuf,
}

impl SmallDisk {
    fn mount(at: &Path, size: &str, read_only: bool) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let options = format!("size={size}{}", if read_only { ",ro" } else { "" });
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &options, "tmpfs"]).arg(at).output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { at: at.to_path_buf() }),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs (root needed): {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    /// Fills the filesystem to the last byte.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.at.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        for size in [block.len(), 4096, 1] {
            while std::io::Write::write_all(&mut f, &block[..size]).is_ok() {}
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.at.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

#[test]
fn a_disk_that_fills_up_keeps_the_last_checkpoint_and_stops_with_exit_5_without_a_restart() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let Some(disk) = SmallDisk::mount(&out, "8m", false) else { return };
    let expected = reference(dir.path(), &data, RESTARTABLE_JOB);
    let config = write_config(dir.path(), RESTARTABLE_JOB);
    let marker = format!("full-disk-{}", std::process::id());
    let mut job = Job::start(&config, &out, &data, &marker, &["--checkpoint-failures", "2"]);
    job.wait_for("a checkpoint in epoch 2", |l| {
        l.contains("checkpoint committed") && l.contains("epoch 2, step")
    });
    disk.fill();
    let (status, log) = job.finish(Duration::from_secs(120));
    assert_eq!(status.code(), Some(5), "{status}\n{log}");
    assert_none_left(&marker);
    // Warned with the file's path and the free space, kept training, then stopped.
    let warning =
        log.lines().find(|l| l.contains("was not stored")).unwrap_or_else(|| panic!("no warning\n{log}"));
    assert!(warning.contains("No space left on device") && warning.contains("free on"), "{warning}");
    assert!(warning.contains(&out.display().to_string()), "the path is not named: {warning}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("--checkpoint-failures 2") && last.contains("--resume"), "{last}");
    assert!(!log.contains("restart 1/"), "a storage failure spent a restart\n{log}");
    // The last good checkpoint is intact: a resume once there is room ends bitwise equal.
    disk.free();
    let resumed = run(coordinator(2, &config, &out, &data, &marker).args(FAST_FAILURE).arg("--resume"));
    let resumed_log = stderr(&resumed);
    assert!(resumed.status.success(), "{}\n{resumed_log}", resumed.status);
    assert!(!resumed_log.contains("cannot be restored"), "{resumed_log}");
    assert_same_result(&out, &expected, &resumed_log);
    drop(disk);
}

#[test]
fn an_out_folder_without_room_or_not_writable_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = trainer_tests::write_synthetic_corpus(dir.path(), 20, 5);
    let config = write_config(dir.path(), RESTARTABLE_JOB);
    let marker = format!("no-room-{}", std::process::id());

    let small = dir.path().join("small");
    let Some(_small) = SmallDisk::mount(&small, "64k", false) else { return };
    let refused = run(coordinator(2, &config, &small, &data, &marker).arg("--no-cache"));
    let log = stderr(&refused);
    assert_eq!(refused.status.code(), Some(5), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("free") && last.contains("needs about") && last.contains("parameters"), "{last}");
    assert!(!log.contains("worker registered"), "{log}");

    let read_only = dir.path().join("read-only");
    let Some(_ro) = SmallDisk::mount(&read_only, "8m", true) else { return };
    let refused = run(coordinator(2, &config, &read_only, &data, &marker).arg("--no-cache"));
    let log = stderr(&refused);
    assert_eq!(refused.status.code(), Some(5), "{log}");
    assert!(log.contains("is not writable") && log.contains("Read-only file system"), "{log}");
    assert_none_left(&marker);
}

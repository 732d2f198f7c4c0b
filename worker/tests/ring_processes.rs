//! The TCP ring among real processes: `ring_bench` starts W copies of itself on 127.0.0.1,
//! relays their listener addresses like a coordinator, and checks every rank's result bit
//! for bit against the ring order computed locally.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn ring_bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ring_bench"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("ring_bench starts")
}

#[test]
fn three_processes_all_reduce_to_the_same_exact_bits() {
    let out = ring_bench(&[
        "--world",
        "3",
        "--elems",
        "100003",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--chunk-kib",
        "16",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let ranks: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("rank ")).collect();
    assert_eq!(ranks.len(), 3, "{stdout}");
    let checksums: Vec<&str> =
        ranks.iter().map(|l| l.split("checksum ").nth(1).unwrap().split(',').next().unwrap()).collect();
    assert!(checksums.iter().all(|c| *c == checksums[0]), "{stdout}");
    assert!(ranks.iter().all(|l| l.ends_with("exact true")), "{stdout}");
    assert!(stdout.contains("RESULT world=3 elems=100003"), "{stdout}");
}

#[test]
fn a_stalled_process_makes_its_neighbour_fail_with_a_timeout_naming_it() {
    let start = Instant::now();
    let out = ring_bench(&[
        "--world",
        "3",
        "--elems",
        "1000",
        "--iters",
        "1",
        "--stall-rank",
        "2",
        "--timeout-ms",
        "500",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // Rank 0 receives from rank 2, which never sends.
    assert!(
        stderr.contains("rank 0: all_reduce_mean timed out after 500 ms waiting for peer rank 2"),
        "{stderr}"
    );
    // The stalled rank sleeps 3 x 500 ms before it leaves; nothing waits much longer.
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
}

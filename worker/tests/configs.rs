//! The shipped configs parse, validate, and say what they claim.

use std::path::Path;

use trainer_core::config::{BatchOrder, Head, Optimizer, Schedule};
use trainer_core::JobConfig;

fn load(name: &str) -> JobConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(name);
    let c = JobConfig::from_toml_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    c
}

#[test]
fn seed_is_the_tutorial_recipe() {
    let c = load("seed.toml");
    let (d, m, t) = (&c.data, &c.model, &c.train);
    assert_eq!((d.min_freq, d.max_vocab, d.max_len), (1, 0, 0));
    assert_eq!((m.embed_dim, m.hidden, m.layers, m.head), (128, 256, 2, Head::Last));
    assert_eq!(m.dropout, 0.5);
    assert_eq!((t.batch_size, t.epochs, t.bptt, t.batch_order), (32, 5, 0, BatchOrder::Unsorted));
    assert_eq!((t.lr, t.beta1, t.beta2, t.weight_decay, t.clip_norm), (1e-3, 0.9, 0.999, 0.0, 0.0));
    assert_eq!((t.schedule, t.warmup_steps, t.amp), (Schedule::Constant, 0, false));
    // None of issue 13's options: the baseline stays the tutorial's.
    assert!(!m.bidirectional);
    assert_eq!((m.embedding_dropout, m.variational_dropout, m.weight_drop), (0.0, 0.0, 0.0));
    assert_eq!((t.optimizer, t.label_smoothing), (Optimizer::Adam, 0.0));
}

#[test]
fn the_ablation_base_is_a_valid_config_on_the_cpu() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/ablation-base.toml");
    let c = JobConfig::from_toml_file(&path).unwrap();
    c.validate().unwrap();
    assert_eq!(c.train.bptt, 100, "the baseline of bench/ACCURACY.md is the TBPTT recipe");
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".toml") {
            load(&name);
            seen += 1;
        }
    }
    assert!(seen >= 5, "expected seed, cpu-demo, cpu-best, gpu-fast and test-tiny in {}", dir.display());
    for name in ["cpu-demo.toml", "cpu-best.toml"] {
        let c = load(name);
        assert!(!c.train.amp && c.train.device != "cuda", "{name} must run on a CPU");
    }
    assert!(load("gpu-fast.toml").train.amp);
}

#[test]
fn the_deployed_job_configs_are_the_shipped_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (deployed, shipped) in [
        ("deploy/base/job.toml", "cpu-demo.toml"),
        ("deploy/jobset/job.toml", "cpu-demo.toml"),
        ("deploy/overlays/single-node-gpu/job.toml", "gpu-fast.toml"),
        ("deploy/overlays/multi-node-gpu/job.toml", "gpu-fast.toml"),
    ] {
        let ours =
            JobConfig::from_toml_file(&root.join(deployed)).unwrap_or_else(|e| panic!("{deployed}: {e}"));
        assert_eq!(ours, load(shipped), "{deployed} differs from configs/{shipped}");
    }
}

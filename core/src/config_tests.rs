//! Tests of `config.rs`.

use super::*;

#[test]
fn defaults_are_the_tutorial_recipe_and_valid() {
    let c = JobConfig::default();
    c.validate().unwrap();
    assert_eq!(c.model.embed_dim, 128);
    assert_eq!(c.model.hidden, 256);
    assert_eq!(c.model.layers, 2);
    assert_eq!(c.train.batch_size, 32);
    assert_eq!(c.train.epochs, 5);
    assert_eq!(c.train.bptt, 0);
    assert_eq!(c.train.batch_order, BatchOrder::Unsorted);
    assert_eq!(c.checkpoint, CheckpointConfig { every_steps: 0, every_seconds: 600.0 });
    assert_eq!(c.train.optimizer, Optimizer::Adam);
}

#[test]
fn the_tokenizer_is_named_and_basic_english_configs_serialise_as_before() {
    let c: JobConfig = toml::from_str("[data]\ntokenizer = \"bpe\"\nvocab_size = 8000\n").unwrap();
    assert_eq!((c.data.tokenizer, c.data.vocab_size), (TokenizerKind::Bpe, 8000));
    assert!(c.to_toml().contains("tokenizer = \"bpe\""));
    let e = JobConfig::from_toml_str("[data]\ntokenizer = \"wordpiece\"\n", Path::new("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data.tokenizer must be basic_english, bpe or unigram") && e.contains("wordpiece"),
        "{e}"
    );
    let small = JobConfig::from_toml_str("[data]\ntokenizer = \"bpe\"\nvocab_size = 10\n", Path::new("c"));
    let e = small.unwrap().validate().unwrap_err().to_string();
    assert!(e.contains("data.vocab_size"), "{e}");
    // The default tokenizer's fields stay out of the resolved config.
    let text = JobConfig::default().to_toml();
    assert!(!text.contains("tokenizer") && !text.contains("vocab_size") && !text.contains("min_frequency"));
}

#[test]
fn the_optimizer_is_adam_adamw_or_sgd() {
    let c: JobConfig = toml::from_str("[train]\noptimizer = \"sgd\"\n").unwrap();
    assert_eq!(c.train.optimizer, Optimizer::Sgd);
    let c: JobConfig = toml::from_str("[train]\noptimizer = \"adamw\"\n").unwrap();
    assert_eq!(c.train.optimizer, Optimizer::AdamW);
    let e = toml::from_str::<JobConfig>("[train]\noptimizer = \"lamb\"\n").unwrap_err().to_string();
    assert!(e.contains("adamw") && e.contains("sgd"), "{e}");
}

#[test]
fn regularisers_are_off_by_default_and_checked() {
    let c = JobConfig::default();
    assert!(!c.model.bidirectional);
    assert_eq!(
        (c.model.embedding_dropout, c.model.variational_dropout, c.model.weight_drop),
        (0.0, 0.0, 0.0)
    );
    assert_eq!(c.train.label_smoothing, 0.0);
    let mut bad = JobConfig::default();
    bad.model.weight_drop = 1.0;
    assert!(bad.validate().unwrap_err().to_string().contains("model.weight_drop"));
    let mut bad = JobConfig::default();
    bad.train.label_smoothing = -0.1;
    assert!(bad.validate().unwrap_err().to_string().contains("train.label_smoothing"));
}

#[test]
fn a_bidirectional_model_needs_one_window_per_batch() {
    let mut c = JobConfig::default();
    c.model.bidirectional = true;
    c.validate().unwrap();
    c.train.bptt = 100;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("train.bptt") && e.contains("bidirectional"), "{e}");
    c.data.max_len = 100;
    c.validate().unwrap();
}

#[test]
fn min_freq_zero_is_refused_with_its_name() {
    let mut c = JobConfig::default();
    c.data.min_freq = 0;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("data.min_freq") && e.contains("at least 1"), "{e}");
}

#[test]
fn unknown_keys_and_bad_devices_are_refused() {
    assert!(toml::from_str::<JobConfig>("[train]\nbatch_sise = 3\n").is_err());
    let mut c = JobConfig::default();
    c.train.device = "gpu".into();
    assert!(c.validate().unwrap_err().to_string().contains("train.device"));
    assert_eq!(parse_device("cuda:3").unwrap(), DeviceSpec::Cuda(3));
}

#[test]
fn toml_round_trip() {
    let mut c = JobConfig::default();
    c.train.batch_order = BatchOrder::Bucketed;
    c.train.optimizer = Optimizer::Sgd;
    c.model.head = Head::ConcatPool;
    let back: JobConfig = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn job_differences_name_fields_and_ignore_the_checkpoint_cadence() {
    let a = JobConfig::default();
    let mut b = a.clone();
    b.checkpoint.every_steps = 7;
    assert!(a.job_differences(&b).is_empty());
    b.train.lr = 0.5;
    b.data.max_len = 10;
    assert_eq!(a.job_differences(&b), vec!["data.max_len: 0 vs 10", "train.lr: 0.001 vs 0.5"]);
}

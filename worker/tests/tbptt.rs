//! The windowed pass against independent references: padding never changes a result;
//! TBPTT with K >= the longest review is full BPTT; with a smaller K it equals a
//! step-by-step LSTM written out by hand with explicit detaches at the window boundaries.

use tch::{Device, Kind, Reduction, Tensor};
use trainer_core::batch::Batch;
use trainer_core::config::{Head, ModelConfig};
use worker::model::{Dropouts, LstmClassifier, ModelShape};
use worker::predict::batch_of;
use worker::tbptt::{run_windows, DeviceBatch, LstmKernel, Pass, PassOptions, Precision};

const KERNELS: [LstmKernel; 2] = [LstmKernel::Packed, LstmKernel::Segmented];

const VOCAB: usize = 40;

fn model(head: Head, layers: usize, seed: i64) -> LstmClassifier {
    model_with(head, layers, false, Dropouts::default(), seed)
}

/// A small model (embeddings of 8, LSTM of 12) seeded for reproducible weights.
fn model_with(
    head: Head,
    layers: usize,
    bidirectional: bool,
    dropouts: Dropouts,
    seed: i64,
) -> LstmClassifier {
    tch::set_num_threads(1);
    tch::manual_seed(seed);
    let config = ModelConfig {
        embed_dim: 8,
        hidden: 12,
        layers,
        dropout: 0.0,
        head,
        bidirectional,
        ..ModelConfig::default()
    };
    LstmClassifier::new(ModelShape::new(&config, VOCAB), dropouts, Device::Cpu).unwrap()
}

/// Rows of pseudo-random ids with the given lengths, labels alternating.
fn rows(lengths: &[usize]) -> Vec<Vec<u32>> {
    lengths
        .iter()
        .enumerate()
        .map(|(r, &len)| (0..len).map(|t| 2 + ((r * 31 + t * 17 + t * t * 7) % (VOCAB - 2)) as u32).collect())
        .collect()
}

fn labelled(rows: &[Vec<u32>]) -> Batch {
    let mut b = batch_of(rows);
    b.labels = (0..b.size as i64).map(|i| (i * 7 + 1) % 2).collect();
    b
}

fn options(bptt: usize, kernel: LstmKernel) -> PassOptions {
    PassOptions { bptt, precision: Precision::F32, kernel, label_smoothing: 0.0 }
}

fn logits(model: &LstmClassifier, batch: &Batch, bptt: usize, kernel: LstmKernel) -> Tensor {
    let db = DeviceBatch::new(batch, VOCAB, Device::Cpu).unwrap();
    let out = run_windows(model, &db, Pass::Eval, options(bptt, kernel)).unwrap();
    db.unsort(&out.logits).unwrap()
}

fn grads_of(model: &LstmClassifier) -> Vec<Tensor> {
    model.parameters().iter().map(|(_, p)| p.grad().copy()).collect()
}

fn zero_grads(model: &LstmClassifier) {
    model.zero_grad().unwrap();
}

fn windowed_grads(
    model: &LstmClassifier,
    batch: &Batch,
    bptt: usize,
    kernel: LstmKernel,
) -> (f64, Vec<Tensor>) {
    zero_grads(model);
    let db = DeviceBatch::new(batch, VOCAB, Device::Cpu).unwrap();
    let out = run_windows(model, &db, Pass::Train, options(bptt, kernel)).unwrap();
    (out.loss_sum, grads_of(model))
}

/// How far two computations of the same f32 math may end apart, relative to the norm of the
/// tensor compared: ||a - b|| <= RTOL ||b||. The kernels and the reference differ only in the
/// order of their operations. With f32's unit roundoff u = 2^-24 = 6e-8, a value here is at
/// worst a chain of ~2,000 roundings (a weight's gradient sums <= 7 rows x 17 time steps of
/// terms, each a product through <= 17 recurrent steps of 2 layers of dot products over
/// 4 x 12 gate inputs), so n u ~ 1e-4 bounds the relative error without cancellation.
/// Roundings of independent terms add like a random walk: the tests here measure 1e-7 to
/// 2e-6 (on an AVX2 machine), well inside. A real difference of the math (a state not
/// carried or not detached, a padded step counted, a window cut in the wrong place) is of
/// the order of the values themselves: truncating at K < the longest review changes the
/// recurrent weights' gradient by 0.4 to 0.9 of its norm.
const RTOL: f64 = 1e-4;

/// ||a - b|| / ||b|| in f64 (0 when both are zero).
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let d = (&a - &b).norm().double_value(&[]);
    let n = b.norm().double_value(&[]);
    if d == 0.0 {
        0.0
    } else {
        d / n
    }
}

fn rel_diff_scalar(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs()
    }
}

fn assert_grads_close(a: &[Tensor], b: &[Tensor], model: &LstmClassifier, what: &str) {
    for ((name, _), (ga, gb)) in model.parameters().iter().zip(a.iter().zip(b)) {
        let d = rel_diff(ga, gb);
        assert!(d <= RTOL, "{what}: gradient of {name} differs by {d:.2e} of its norm");
    }
}

/// The classifier written out step by step for one review at a time (no batching, no
/// padding, no packing), with every state detached at multiples of `bptt` (0: never).
/// Returns the summed cross-entropy; backpropagates `sum / batch size`.
fn reference_backward(model: &LstmClassifier, rows: &[Vec<u32>], labels: &[i64], bptt: usize) -> f64 {
    let shape = model.shape();
    let (h_dim, layers) = (shape.hidden as i64, shape.layers);
    let params = model.parameters();
    let emb = &params[0].1;
    let (fc_w, fc_b) = model.fc();
    let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (row, &label) in rows.iter().zip(labels) {
        let zeros = || Tensor::zeros([1, h_dim], (Kind::Float, Device::Cpu));
        let mut h: Vec<Tensor> = (0..layers).map(|_| zeros()).collect();
        let mut c: Vec<Tensor> = (0..layers).map(|_| zeros()).collect();
        let mut run_max = Tensor::full([1, h_dim], f64::NEG_INFINITY, (Kind::Float, Device::Cpu));
        let mut run_sum = zeros();
        for (t, &id) in row.iter().enumerate() {
            if bptt > 0 && t > 0 && t % bptt == 0 {
                h = h.iter().map(Tensor::detach).collect();
                c = c.iter().map(Tensor::detach).collect();
                run_max = run_max.detach();
                run_sum = run_sum.detach();
            }
            let mut x = emb.get(i64::from(id)).unsqueeze(0);
            for l in 0..layers {
                let w_ih = &params[1 + 4 * l].1;
                let w_hh = &params[2 + 4 * l].1;
                let b_ih = &params[3 + 4 * l].1;
                let b_hh = &params[4 + 4 * l].1;
                let gates = x.matmul(&w_ih.tr()) + b_ih + h[l].matmul(&w_hh.tr()) + b_hh;
                let g = gates.chunk(4, 1);
                let (i, f, gg, o) = (g[0].sigmoid(), g[1].sigmoid(), g[2].tanh(), g[3].sigmoid());
                c[l] = &f * &c[l] + &i * &gg;
                h[l] = &o * c[l].tanh();
                x = h[l].shallow_clone();
            }
            run_max = run_max.maximum(&x);
            run_sum = &run_sum + &x;
        }
        let last = h[layers - 1].shallow_clone();
        let features = match shape.head {
            Head::Last => last,
            Head::ConcatPool => Tensor::cat(&[last, run_max, run_sum / row.len() as f64], 1),
        };
        let logits = features.matmul(&fc_w.tr()) + fc_b;
        let loss = logits.cross_entropy_loss::<Tensor>(
            &Tensor::from_slice(&[label]),
            None,
            Reduction::Sum,
            -100,
            0.0,
        );
        total += loss;
    }
    let sum = total.double_value(&[]);
    (total / rows.len() as f64).backward();
    sum
}

#[test]
fn a_review_alone_and_inside_a_padded_batch_give_the_same_logits() {
    for kernel in KERNELS {
        for head in [Head::Last, Head::ConcatPool] {
            let m = model(head, 2, 1);
            let rs = rows(&[7, 3, 12, 1, 9, 12, 5]);
            let batch = labelled(&rs);
            for bptt in [0, 4, 5] {
                let what = format!("{kernel:?} {head:?} K={bptt}");
                let together = logits(&m, &batch, bptt, kernel);
                for (i, r) in rs.iter().enumerate() {
                    let alone = logits(&m, &labelled(std::slice::from_ref(r)), bptt, kernel);
                    let d = rel_diff(&alone.get(0), &together.get(i as i64));
                    assert!(d <= RTOL, "{what}: row {i} differs by {d:.2e} alone");
                }
                // And with extra padding columns at the end of every row.
                let mut wide = batch.clone();
                let width = wide.max_len + 6;
                let mut tokens = vec![0i64; wide.size * width];
                for r in 0..wide.size {
                    tokens[r * width..r * width + wide.max_len]
                        .copy_from_slice(&wide.tokens[r * wide.max_len..(r + 1) * wide.max_len]);
                }
                (wide.tokens, wide.max_len) = (tokens, width);
                let padded = logits(&m, &wide, bptt, kernel);
                let d = rel_diff(&padded, &together);
                assert!(d <= RTOL, "{what}: extra padding changed logits by {d:.2e}");
            }
        }
    }
}

#[test]
fn neither_the_window_nor_the_kernel_changes_forward_values() {
    let m = model(Head::ConcatPool, 2, 2);
    let batch = labelled(&rows(&[10, 4, 17, 2, 8]));
    let full = logits(&m, &batch, 0, LstmKernel::Packed);
    for kernel in KERNELS {
        for k in [0, 1, 3, 8, 17, 100] {
            let d = rel_diff(&logits(&m, &batch, k, kernel), &full);
            assert!(d <= RTOL, "{kernel:?} K={k}: {d:.2e}");
        }
    }
}

#[test]
fn tbptt_with_k_at_least_the_longest_review_is_full_bptt() {
    for head in [Head::Last, Head::ConcatPool] {
        let m = model(head, 2, 3);
        let rs = rows(&[9, 4, 14, 1, 14, 6]);
        let batch = labelled(&rs);
        // The hand-written step-by-step LSTM without detaches.
        zero_grads(&m);
        let loss_ref = reference_backward(&m, &rs, &batch.labels, 0);
        let reference = grads_of(&m);
        for kernel in KERNELS {
            let (loss_full, full) = windowed_grads(&m, &batch, 0, kernel);
            assert!(rel_diff_scalar(loss_full, loss_ref) <= RTOL, "{loss_ref} vs {loss_full}");
            assert_grads_close(&full, &reference, &m, &format!("{kernel:?} {head:?} full vs reference"));
            for k in [14, 15, 1000] {
                let (loss_k, g) = windowed_grads(&m, &batch, k, kernel);
                assert!(rel_diff_scalar(loss_k, loss_full) <= RTOL, "K={k}: {loss_k} vs {loss_full}");
                assert_grads_close(&g, &full, &m, &format!("{kernel:?} {head:?} K={k} vs full"));
            }
        }
    }
}

#[test]
fn tbptt_with_a_small_k_equals_explicit_detaches_at_the_window_boundaries() {
    for (head, layers) in [(Head::Last, 2), (Head::ConcatPool, 1), (Head::ConcatPool, 2)] {
        let m = model(head, layers, 4);
        let rs = rows(&[11, 3, 16, 1, 7, 16, 8]);
        let batch = labelled(&rs);
        let (_, full) = windowed_grads(&m, &batch, 0, LstmKernel::Packed);
        for k in [1, 3, 4, 7] {
            zero_grads(&m);
            let loss_ref = reference_backward(&m, &rs, &batch.labels, k);
            let reference = grads_of(&m);
            for kernel in KERNELS {
                let what = format!("{kernel:?} {head:?} L={layers} K={k}");
                let (loss_k, g) = windowed_grads(&m, &batch, k, kernel);
                assert!(rel_diff_scalar(loss_k, loss_ref) <= RTOL, "{what}: loss {loss_k} vs {loss_ref}");
                assert_grads_close(&g, &reference, &m, &format!("{what} vs reference"));
                // Truncation must actually cut something: the recurrent weights' gradient
                // differs from full BPTT's by far more than float order could.
                let d = rel_diff(&g[2], &full[2]);
                assert!(d > 100.0 * RTOL, "{what}: truncated gradient equals full BPTT's ({d:.2e})");
            }
        }
    }
}

#[test]
fn bad_batches_are_refused_with_a_message() {
    let mut b = labelled(&rows(&[3, 2]));
    b.tokens[0] = VOCAB as i64;
    let e = DeviceBatch::new(&b, VOCAB, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let mut b = labelled(&rows(&[3, 2]));
    b.labels[1] = 2;
    let e = DeviceBatch::new(&b, VOCAB, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("label 2"), "{e}");
    let mut b = labelled(&rows(&[3, 2]));
    b.lengths[1] = 0;
    assert!(DeviceBatch::new(&b, VOCAB, Device::Cpu).is_err());
    let empty = batch_of(&[]);
    assert!(DeviceBatch::new(&empty, VOCAB, Device::Cpu).is_err());
}

fn bidirectional_model(head: Head, layers: usize, seed: i64) -> LstmClassifier {
    model_with(head, layers, true, Dropouts::default(), seed)
}

/// One LSTM direction written out step by step over `xs` (one `1 x in` tensor per step),
/// with the weights named as `nn.LSTM` names them; returns the outputs in `xs`'s order.
fn reference_direction(model: &LstmClassifier, xs: &[Tensor], layer: usize, suffix: &str) -> Vec<Tensor> {
    let param = |what: &str| {
        let name = format!("lstm.{what}_l{layer}{suffix}");
        let (_, t) = model.parameters().iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{name}"));
        t.shallow_clone()
    };
    let (w_ih, w_hh, b_ih, b_hh) =
        (param("weight_ih"), param("weight_hh"), param("bias_ih"), param("bias_hh"));
    let hidden = model.shape().hidden as i64;
    let mut h = Tensor::zeros([1, hidden], (Kind::Float, Device::Cpu));
    let mut c = h.zeros_like();
    let mut out = Vec::new();
    for x in xs {
        let gates = x.matmul(&w_ih.tr()) + &b_ih + h.matmul(&w_hh.tr()) + &b_hh;
        let g = gates.chunk(4, 1);
        let (i, f, gg, o) = (g[0].sigmoid(), g[1].sigmoid(), g[2].tanh(), g[3].sigmoid());
        c = &f * &c + &i * &gg;
        h = &o * c.tanh();
        out.push(h.shallow_clone());
    }
    out
}

/// The bidirectional classifier, one review at a time, by hand: each layer runs forward
/// over the review and backward from its last token; the next layer reads both outputs.
/// The head reads `[h_fwd(last token), h_bwd(first token)]` (then max and mean over time
/// of the last layer's outputs). Returns the summed loss, backpropagates the mean.
fn reference_bidirectional_backward(model: &LstmClassifier, rows: &[Vec<u32>], labels: &[i64]) -> f64 {
    let shape = model.shape();
    let emb = &model.parameters()[0].1;
    let (fc_w, fc_b) = model.fc();
    let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (row, &label) in rows.iter().zip(labels) {
        let mut xs: Vec<Tensor> = row.iter().map(|&id| emb.get(i64::from(id)).unsqueeze(0)).collect();
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for layer in 0..shape.layers {
            fwd = reference_direction(model, &xs, layer, "");
            let reversed: Vec<Tensor> = xs.iter().rev().map(Tensor::shallow_clone).collect();
            bwd = reference_direction(model, &reversed, layer, "_reverse");
            bwd.reverse();
            xs = fwd.iter().zip(&bwd).map(|(f, b)| Tensor::cat(&[f, b], 1)).collect();
        }
        let last = Tensor::cat(&[fwd[row.len() - 1].shallow_clone(), bwd[0].shallow_clone()], 1);
        let features = match shape.head {
            Head::Last => last,
            Head::ConcatPool => {
                let outputs = Tensor::cat(&xs, 0);
                let max = outputs.amax([0i64].as_slice(), true);
                let mean = outputs.mean_dim([0i64].as_slice(), true, Kind::Float);
                Tensor::cat(&[last, max, mean], 1)
            }
        };
        let logits = features.matmul(&fc_w.tr()) + fc_b;
        total += logits.cross_entropy_loss::<Tensor>(
            &Tensor::from_slice(&[label]),
            None,
            Reduction::Sum,
            -100,
            0.0,
        );
    }
    let sum = total.double_value(&[]);
    (total / rows.len() as f64).backward();
    sum
}

#[test]
fn a_bidirectional_lstm_is_named_as_pytorch_names_it() {
    let m = bidirectional_model(Head::ConcatPool, 2, 5);
    let names: Vec<&str> = m.parameters().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[1..5],
        ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0"]
    );
    assert_eq!(names[5], "lstm.weight_ih_l0_reverse");
    assert_eq!(names[9], "lstm.weight_ih_l1");
    // Layer 1 reads both directions of layer 0; the head reads 3 features of 2 directions.
    assert_eq!(m.parameters()[9].1.size(), vec![48, 24]);
    assert_eq!(m.fc().0.size(), vec![2, 3 * 2 * 12]);
}

#[test]
fn a_bidirectional_pass_equals_both_directions_written_out_by_hand() {
    for (head, layers) in [(Head::Last, 1), (Head::ConcatPool, 1), (Head::ConcatPool, 2)] {
        let m = bidirectional_model(head, layers, 6);
        let rs = rows(&[9, 4, 14, 1, 14, 6]);
        let batch = labelled(&rs);
        zero_grads(&m);
        let loss_ref = reference_bidirectional_backward(&m, &rs, &batch.labels);
        let reference = grads_of(&m);
        // Whatever kernel is asked for, and K = 0 or K >= the longest review: one window.
        for kernel in KERNELS {
            for k in [0, 14, 100] {
                let what = format!("{kernel:?} {head:?} L={layers} K={k}");
                let (loss, g) = windowed_grads(&m, &batch, k, kernel);
                assert!(rel_diff_scalar(loss, loss_ref) <= RTOL, "{what}: loss {loss} vs {loss_ref}");
                assert_grads_close(&g, &reference, &m, &what);
            }
        }
        // A shorter window cannot run the reverse direction: refused, not wrong.
        let db = DeviceBatch::new(&batch, VOCAB, Device::Cpu).unwrap();
        let e = run_windows(&m, &db, Pass::Eval, options(5, LstmKernel::Segmented)).unwrap_err().to_string();
        assert!(e.contains("bidirectional") && e.contains("train.bptt"), "{e}");
    }
}

fn regularised_model(dropouts: Dropouts, seed: i64, bidirectional: bool) -> LstmClassifier {
    model_with(Head::ConcatPool, 2, bidirectional, dropouts, seed)
}

#[test]
fn the_regularisers_change_training_passes_only_and_survive_windows() {
    let batch = labelled(&rows(&[11, 3, 16, 1, 7, 16, 8]));
    for dropouts in [
        Dropouts { embedding: 0.3, ..Dropouts::default() },
        Dropouts { variational: 0.3, ..Dropouts::default() },
        Dropouts { weight: 0.3, ..Dropouts::default() },
    ] {
        regularisers_apply(&batch, dropouts, false);
    }
    // (Head dropout draws per chunk, so the two kernels draw it differently.)
    let all = Dropouts { embedding: 0.2, variational: 0.2, weight: 0.2, head: 0.0 };
    for bidirectional in [false, true] {
        regularisers_apply(&batch, all, bidirectional);
    }
}

/// Evaluation ignores `dropouts`; training with them is seeded, the same with either
/// kernel, and differs from training without them.
fn regularisers_apply(batch: &Batch, dropouts: Dropouts, bidirectional: bool) {
    let what = format!("{dropouts:?} bidirectional={bidirectional}");
    // Several windows of 4 steps (each window's backward frees the graph of the one before,
    // so the masks must be multiplied in anew); a bidirectional model runs one.
    let k = if bidirectional { 0 } else { 4 };
    let plain = regularised_model(Dropouts::default(), 7, bidirectional);
    let m = regularised_model(dropouts, 7, bidirectional);
    let d = rel_diff(
        &logits(&m, batch, k, LstmKernel::Segmented),
        &logits(&plain, batch, k, LstmKernel::Segmented),
    );
    assert_eq!(d, 0.0, "{what}: evaluation changed");
    let mut runs = Vec::new();
    for kernel in KERNELS {
        for _ in 0..2 {
            tch::manual_seed(11);
            let (loss, g) = windowed_grads(&m, batch, k, kernel);
            assert!(g.iter().all(|t| t.isfinite().all().int64_value(&[]) == 1), "{what}");
            runs.push((loss, g));
        }
    }
    assert_eq!(runs[0].0.to_bits(), runs[1].0.to_bits(), "{what}: the same seed, another loss");
    assert_grads_close(&runs[0].1, &runs[1].1, &m, &format!("{what} reseeded"));
    assert_grads_close(&runs[2].1, &runs[0].1, &m, &format!("{what} kernels"));
    tch::manual_seed(11);
    let (_, plain_grads) = windowed_grads(&plain, batch, k, LstmKernel::Segmented);
    // The recurrent weights' gradient (index 2) moves by far more than float order.
    let d = rel_diff(&runs[0].1[2], &plain_grads[2]);
    assert!(d > 100.0 * RTOL, "{what}: no effect on training ({d:.2e})");
}

#[test]
fn embedding_dropout_drops_whole_words() {
    // One word everywhere: the rows of a batch are all the same word, so with word dropout
    // either every row sees it (the mask keeps it) or none does; per-token dropout would
    // give rows different inputs, hence different logits.
    let m = regularised_model(Dropouts { embedding: 0.5, ..Dropouts::default() }, 8, false);
    let rs: Vec<Vec<u32>> = (0..6).map(|_| vec![5; 4]).collect();
    let batch = labelled(&rs);
    let mut firsts: Vec<f64> = Vec::new();
    for seed in 0..8 {
        tch::manual_seed(seed);
        let db = DeviceBatch::new(&batch, VOCAB, Device::Cpu).unwrap();
        let out = run_windows(&m, &db, Pass::Train, options(0, LstmKernel::Segmented)).unwrap();
        let first = out.logits.get(0);
        // Equal up to float rounding: rows of one batch can take different kernel paths (a
        // CI run on a loaded machine saw 3.9e-8); per-token dropout differs by far more.
        for r in 1..6 {
            let d = rel_diff(&out.logits.get(r), &first);
            assert!(d <= 1e-6, "seed {seed}: row {r} differs by {d:.2e}");
        }
        firsts.push((first.double_value(&[0]) * 1e5).round() / 1e5);
    }
    // And the word is dropped in some batches, kept in others.
    firsts.sort_by(f64::total_cmp);
    firsts.dedup();
    assert_eq!(firsts.len(), 2, "{firsts:?}");
}

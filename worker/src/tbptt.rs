//! The forward (and, when training, backward) pass over one batch in windows of K time
//! steps: truncated BPTT for classification.
//!
//! The batch is sorted by length, longest first, so that the sequences still running at
//! any time step are a prefix of the rows. For the window `[t0, t1)`:
//! - rows `0..active` have tokens in the window (length > t0);
//! - rows `0..carried` run past its end (length > t1) and carry their state, detached, into
//!   the next window;
//! - rows `carried..active` end inside it: their loss is taken from the state at their own
//!   last token, and (when training) backpropagated right away, so the window's graph is
//!   freed before the next one is built and memory is bounded by K, not by the batch's
//!   longest review.
//!
//! Inside a window where some rows end early, the LSTM runs on a packed sequence (libtorch's
//! packed LSTM), so no row's state ever advances over padding; a window where every active
//! row fills the whole window runs the dense LSTM, which is the same computation. With
//! `K >= max_len` there is one window and the result is full BPTT's.
//!
//! The concat-pool head carries the running max and sum of the last layer's outputs across
//! windows, detached like the state.

use tch::{Device, Kind, Reduction, Tensor};
use trainer_core::batch::Batch;
use trainer_core::config::Head;

use crate::error::{Result, WorkerError};
use crate::model::{LstmClassifier, NUM_CLASSES};

/// Whether a pass builds graphs and backpropagates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Dropout on, backward per window (gradients accumulate into the parameters' `.grad`).
    Train,
    /// No graph, dropout off.
    Eval,
}

/// Arithmetic of the LSTM: f32, or bf16 with f32 master weights (CUDA only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

/// A batch on the device, rows sorted by length (longest first).
#[derive(Debug)]
pub struct DeviceBatch {
    /// `size x max_len` token ids.
    pub tokens: Tensor,
    /// Lengths in sorted order.
    pub lengths: Vec<i64>,
    pub labels: Tensor,
    /// `order[i]` is the original row of sorted row `i`.
    pub order: Vec<usize>,
    pub size: usize,
    pub max_len: usize,
    pub num_tokens: usize,
}

impl DeviceBatch {
    /// Checks the batch against the vocabulary and moves it to `device`, sorted by length.
    pub fn new(batch: &Batch, vocab_size: usize, device: Device) -> Result<Self> {
        let (size, width) = (batch.size, batch.max_len);
        if size == 0 {
            return Err(WorkerError::Batch("the batch is empty".into()));
        }
        if batch.tokens.len() != size * width || batch.lengths.len() != size || batch.labels.len() != size {
            return Err(WorkerError::Batch(format!(
                "{size} rows x {width} steps needs {} tokens, {size} lengths and {size} labels; got {}, {} and {}",
                size * width,
                batch.tokens.len(),
                batch.lengths.len(),
                batch.labels.len()
            )));
        }
        if let Some(&l) = batch.lengths.iter().find(|&&l| l < 1 || l as usize > width) {
            return Err(WorkerError::Batch(format!("a row has length {l}; lengths must be 1..={width}")));
        }
        if let Some(&id) = batch.tokens.iter().find(|&&t| t < 0 || t as usize >= vocab_size) {
            return Err(WorkerError::Batch(format!(
                "token id {id} is outside the vocabulary (0..{vocab_size})"
            )));
        }
        if let Some(&y) = batch.labels.iter().find(|&&y| !(0..NUM_CLASSES).contains(&y)) {
            return Err(WorkerError::Batch(format!("label {y}; labels must be 0 or 1")));
        }
        let mut order: Vec<usize> = (0..size).collect();
        // Stable, so equal lengths keep their order and the result is deterministic.
        order.sort_by_key(|&i| std::cmp::Reverse(batch.lengths[i]));
        let mut tokens = Vec::with_capacity(size * width);
        for &row in &order {
            tokens.extend_from_slice(&batch.tokens[row * width..(row + 1) * width]);
        }
        let lengths: Vec<i64> = order.iter().map(|&r| batch.lengths[r]).collect();
        let labels: Vec<i64> = order.iter().map(|&r| batch.labels[r]).collect();
        Ok(Self {
            tokens: Tensor::f_from_slice(&tokens)?
                .f_view([size as i64, width as i64])?
                .f_to_device(device)?,
            labels: Tensor::f_from_slice(&labels)?.f_to_device(device)?,
            num_tokens: lengths.iter().map(|&l| l as usize).sum(),
            lengths,
            order,
            size,
            max_len: width,
        })
    }

    /// Rows of `sorted` (one per sorted row) put back in the batch's original order.
    pub fn unsort(&self, sorted: &Tensor) -> Result<Tensor> {
        let mut inverse = vec![0i64; self.size];
        for (sorted_row, &original) in self.order.iter().enumerate() {
            inverse[original] = sorted_row as i64;
        }
        let index = Tensor::f_from_slice(&inverse)?.f_to_device(sorted.device())?;
        Ok(sorted.f_index_select(0, &index)?)
    }
}

/// What a pass over one batch gives back.
#[derive(Debug)]
pub struct PassOutput {
    /// Sum over the batch of each row's cross-entropy.
    pub loss_sum: f64,
    /// `size x 2` logits in sorted row order, detached, f32.
    pub logits: Tensor,
    /// Windows run.
    pub windows: usize,
}

/// Number of leading rows (of lengths sorted descending) longer than `t`.
fn rows_longer_than(lengths: &[i64], t: usize) -> usize {
    lengths.partition_point(|&l| l as usize > t)
}

/// Runs the model over `batch` in windows of `bptt` steps (0: one window, full BPTT).
///
/// In [`Pass::Train`] each window's loss, `sum(cross-entropy of rows ending there) / size`,
/// is backpropagated before the next window, so after the call the parameters' gradients
/// are those of the batch's mean loss (under truncation). Clear them beforehand.
pub fn run_windows(
    model: &LstmClassifier,
    batch: &DeviceBatch,
    bptt: usize,
    pass: Pass,
    precision: Precision,
) -> Result<PassOutput> {
    let train = pass == Pass::Train;
    let _no_grad = (!train).then(tch::no_grad_guard);
    let shape = model.shape();
    let (layers, hidden) = (shape.layers as i64, shape.hidden as i64);
    let device = model.device();
    let compute_kind = match precision {
        Precision::F32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    };
    let window = if bptt == 0 { batch.max_len } else { bptt.min(batch.max_len) };
    let size = batch.size as i64;
    let pool = shape.head == Head::ConcatPool;

    let weights: Vec<Tensor> =
        model.lstm_weights().into_iter().map(|w| cast(w, compute_kind)).collect::<Result<_>>()?;
    let (fc_w, fc_b) = model.fc();

    // Carried state of rows 0..carried: h and c are (layers, carried, hidden).
    let zeros = |rows: i64| Tensor::f_zeros([layers, rows, hidden], (Kind::Float, device));
    let mut h = zeros(size)?;
    let mut c = zeros(size)?;
    let mut run_max: Option<Tensor> = None;
    let mut run_sum: Option<Tensor> = None;
    let mut logits_by_window: Vec<Tensor> = Vec::new();
    let mut loss_sum = 0.0;
    let mut windows = 0;

    let mut t0 = 0usize;
    while t0 < batch.max_len {
        let t1 = (t0 + window).min(batch.max_len);
        let active = rows_longer_than(&batch.lengths, t0);
        if active == 0 {
            break;
        }
        let carried = rows_longer_than(&batch.lengths, t1);
        let width = (batch.lengths[0] as usize).min(t1) - t0;
        let (active_i, carried_i) = (active as i64, carried as i64);

        let ids = batch.tokens.f_narrow(0, 0, active_i)?.f_narrow(1, t0 as i64, width as i64)?;
        let x = cast(&Tensor::f_embedding(model.embedding_weight(), &ids, -1, false, false)?, compute_kind)?;
        let hx = [
            cast(&h.f_narrow(1, 0, active_i)?.f_contiguous()?, compute_kind)?,
            cast(&c.f_narrow(1, 0, active_i)?.f_contiguous()?, compute_kind)?,
        ];
        // Every active row fills the window: the dense LSTM is exact (no padding inside).
        let dense = batch.lengths[active - 1] as usize >= t0 + width;
        let (out, h_n, c_n) = if dense {
            let (out, h_n, c_n) = x.f_lstm(&hx, &weights, true, layers, 0.0, train, false, true)?;
            (pool.then_some(out), h_n, c_n)
        } else {
            let window_lengths: Vec<i64> =
                batch.lengths[..active].iter().map(|&l| (l as usize).min(t1) as i64 - t0 as i64).collect();
            let lengths_t = Tensor::f_from_slice(&window_lengths)?;
            let (data, batch_sizes) = x.f_internal_pack_padded_sequence(&lengths_t, true)?;
            let (out_data, h_n, c_n) =
                Tensor::f_lstm_data(&data, &batch_sizes, &hx, &weights, true, layers, 0.0, train, false)?;
            let out = if pool {
                let (padded, _) =
                    Tensor::f_internal_pad_packed_sequence(&out_data, &batch_sizes, true, 0.0, width as i64)?;
                Some(padded)
            } else {
                None
            };
            (out, h_n, c_n)
        };
        let h_n = h_n.f_to_kind(Kind::Float)?;
        let c_n = c_n.f_to_kind(Kind::Float)?;

        // Concat pooling: running max and sum over the rows' own (unpadded) steps.
        let (win_max, win_sum) = match &out {
            Some(out) => {
                let out = out.f_to_kind(Kind::Float)?;
                let steps = Tensor::f_arange(width as i64, (Kind::Int64, device))?.f_unsqueeze(0)?;
                let ends = Tensor::f_from_slice(
                    &batch.lengths[..active]
                        .iter()
                        .map(|&l| (l as usize).min(t1) as i64 - t0 as i64)
                        .collect::<Vec<_>>(),
                )?
                .f_to_device(device)?
                .f_unsqueeze(1)?;
                let padding = steps.f_ge_tensor(&ends)?.f_unsqueeze(2)?;
                let masked = out.f_masked_fill(&padding, f64::NEG_INFINITY)?;
                let mut win_max = masked.f_amax([1i64].as_slice(), false)?;
                let mut win_sum = out.f_masked_fill(&padding, 0.0)?.f_sum_dim_intlist(
                    [1i64].as_slice(),
                    false,
                    Kind::Float,
                )?;
                if let (Some(prev_max), Some(prev_sum)) = (&run_max, &run_sum) {
                    win_max = win_max.f_maximum(&prev_max.f_narrow(0, 0, active_i)?)?;
                    win_sum = win_sum.f_add(&prev_sum.f_narrow(0, 0, active_i)?)?;
                }
                (Some(win_max), Some(win_sum))
            }
            None => (None, None),
        };

        // Rows ending in this window: loss from the state at their own last token.
        let ending = active_i - carried_i;
        if ending > 0 {
            let last = h_n.f_select(0, layers - 1)?.f_narrow(0, carried_i, ending)?;
            let features = match (&win_max, &win_sum) {
                (Some(mx), Some(sm)) => {
                    let lens: Vec<f32> = batch.lengths[carried..active].iter().map(|&l| l as f32).collect();
                    let lens = Tensor::f_from_slice(&lens)?.f_to_device(device)?.f_unsqueeze(1)?;
                    let mean = sm.f_narrow(0, carried_i, ending)?.f_div(&lens)?;
                    Tensor::f_cat(&[last, mx.f_narrow(0, carried_i, ending)?, mean], 1)?
                }
                _ => last,
            };
            let features = features.f_dropout(model.dropout(), train)?;
            let logits = features.f_linear(fc_w, Some(fc_b))?;
            let labels = batch.labels.f_narrow(0, carried_i, ending)?;
            let loss = logits.f_cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, 0.0)?;
            loss_sum += loss.f_double_value(&[])?;
            if train {
                loss.f_div_scalar(size as f64)?.f_backward()?;
            }
            logits_by_window.push(logits.f_detach()?);
        }

        // Carry the state of rows that go on, cut from this window's graph.
        h = h_n.f_narrow(1, 0, carried_i)?.f_detach()?;
        c = c_n.f_narrow(1, 0, carried_i)?.f_detach()?;
        if let (Some(mx), Some(sm)) = (win_max, win_sum) {
            run_max = Some(mx.f_narrow(0, 0, carried_i)?.f_detach()?);
            run_sum = Some(sm.f_narrow(0, 0, carried_i)?.f_detach()?);
        }
        windows += 1;
        t0 = t1;
    }
    // Windows end rows from the shortest up: reversed, the pieces are in sorted row order.
    logits_by_window.reverse();
    let logits = Tensor::f_cat(&logits_by_window, 0)?;
    if logits.size()[0] != size {
        return Err(WorkerError::Batch(format!(
            "internal: {} of {size} rows produced logits",
            logits.size()[0]
        )));
    }
    Ok(PassOutput { loss_sum, logits, windows })
}

fn cast(t: &Tensor, kind: Kind) -> Result<Tensor> {
    if t.kind() == kind {
        Ok(t.shallow_clone())
    } else {
        Ok(t.f_to_kind(kind)?)
    }
}

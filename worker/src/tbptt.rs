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
//! Inside a window no row's state ever advances over padding, in one of two ways
//! ([`LstmKernel`]): libtorch's packed LSTM over the window (one call; cuDNN handles the
//! varying batch size well), or the window cut into segments at the rows' ends, each a dense
//! LSTM call over the rows still running, with the state carried (not detached) from one
//! segment to the next (much faster on the CPU, where the packed LSTM runs step by step).
//! Both are the exact same computation. With `K >= max_len` there is one window and the
//! result is full BPTT's.
//!
//! The concat-pool head carries the running max and sum of the last layer's outputs across
//! windows, detached like the state.

use tch::{Device, Kind, Reduction, Tensor};
use trainer_core::batch::Batch;
use trainer_core::config::Head;

use crate::error::{Result, WorkerError};
use crate::model::{LstmClassifier, NUM_CLASSES};
use crate::profile::{self, Bucket};

/// A host tensor on `device`. To CUDA through pinned memory without waiting: a plain copy
/// from pageable memory waits for the device's queue to drain (a host sync per copy).
/// libtorch's pinned allocator keeps the staging buffer until the copy has run.
pub(crate) fn host_to_device(t: Tensor, device: Device) -> Result<Tensor> {
    if device.is_cuda() {
        Ok(t.f_pin_memory(device)?.f_to_device_(device, t.kind(), true, false)?)
    } else {
        Ok(t.f_to_device(device)?)
    }
}

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

/// How a window's rows of different lengths are run (same results, different speed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LstmKernel {
    /// One packed-sequence LSTM call per window.
    Packed,
    /// One dense LSTM call per stretch of the window in which no row ends.
    Segmented,
}

impl LstmKernel {
    /// Packed on CUDA (cuDNN), segmented on the CPU.
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() {
            LstmKernel::Packed
        } else {
            LstmKernel::Segmented
        }
    }
}

/// How to run a pass: the TBPTT window, the arithmetic and the LSTM kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassOptions {
    /// Window in time steps; 0 is one window over the whole batch (full BPTT).
    pub bptt: usize,
    pub precision: Precision,
    pub kernel: LstmKernel,
    /// Label smoothing of the training loss (evaluation reports the plain cross-entropy).
    pub label_smoothing: f64,
}

impl PassOptions {
    /// f32, the device's kernel, no label smoothing.
    pub fn new(bptt: usize, device: Device) -> Self {
        Self { bptt, precision: Precision::F32, kernel: LstmKernel::for_device(device), label_smoothing: 0.0 }
    }
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
    /// Checks the batch against the vocabulary and moves it to `device`, sorted by length
    /// (labels of the two classes of IMDB's model).
    pub fn new(batch: &Batch, vocab_size: usize, device: Device) -> Result<Self> {
        Self::with_classes(batch, vocab_size, NUM_CLASSES as usize, device)
    }

    /// [`Self::new`] for a model with `num_classes` outputs: labels are `0..num_classes`.
    pub fn with_classes(
        batch: &Batch,
        vocab_size: usize,
        num_classes: usize,
        device: Device,
    ) -> Result<Self> {
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
        if let Some(&y) = batch.labels.iter().find(|&&y| !(0..num_classes as i64).contains(&y)) {
            return Err(WorkerError::Batch(format!("label {y}; labels must be 0..={}", num_classes - 1)));
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
            tokens: host_to_device(
                Tensor::f_from_slice(&tokens)?.f_view([size as i64, width as i64])?,
                device,
            )?,
            labels: host_to_device(Tensor::f_from_slice(&labels)?, device)?,
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

/// The LSTM's state and the pooling sums of the rows still running (rows `0..n`).
struct Carried {
    h: Tensor,
    c: Tensor,
    /// Running max and sum of the last layer's outputs (concat pooling only).
    pool: Option<(Tensor, Tensor)>,
}

impl Carried {
    fn detach(self) -> Result<Self> {
        Ok(Self {
            h: self.h.f_detach()?,
            c: self.c.f_detach()?,
            pool: match self.pool {
                Some((mx, sm)) => Some((mx.f_detach()?, sm.f_detach()?)),
                None => None,
            },
        })
    }
}

/// Runs the model over `batch` in windows of `options.bptt` steps.
///
/// In [`Pass::Train`] each window's loss, `sum(cross-entropy of rows ending there) / size`,
/// is backpropagated before the next window, so after the call the parameters' gradients
/// are those of the batch's mean loss (under truncation). Clear them beforehand.
pub fn run_windows(
    model: &LstmClassifier,
    batch: &DeviceBatch,
    pass: Pass,
    options: PassOptions,
) -> Result<PassOutput> {
    let train = pass == Pass::Train;
    let _no_grad = (!train).then(tch::no_grad_guard);
    let shape = model.shape();
    let (layers, hidden) = (shape.layers as i64, shape.hidden as i64);
    let directions = shape.directions() as i64;
    let device = model.device();
    let kind = match options.precision {
        Precision::F32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    };
    let window = match options.bptt {
        0 => batch.max_len,
        k => k.min(batch.max_len),
    };
    // The reverse direction starts at each row's own end: one chunk over whole rows.
    if shape.bidirectional && window < batch.max_len {
        return Err(WorkerError::Invalid(format!(
            "a bidirectional model runs a batch in one window, but train.bptt = {} is \
             shorter than this batch ({} steps); set train.bptt = 0",
            options.bptt, batch.max_len
        )));
    }
    let kernel = options.kernel;
    let size = batch.size as i64;
    let pool = shape.head == Head::ConcatPool;
    let weights: Vec<Tensor> =
        model.lstm_weights().into_iter().map(|w| cast(w, kind)).collect::<Result<_>>()?;
    let masks = if train { Masks::draw(model, size, device)? } else { Masks::default() };
    let (fc_w, fc_b) = model.fc();
    let lengths = &batch.lengths;

    let zeros = || Tensor::f_zeros([layers * directions, size, hidden], (Kind::Float, device));
    let mut carried = Carried { h: zeros()?, c: zeros()?, pool: None };
    let mut logits_by_chunk: Vec<Tensor> = Vec::new();
    let mut chunk_losses: Vec<Tensor> = Vec::new();
    let mut windows = 0;

    let mut t0 = 0usize;
    while t0 < batch.max_len && rows_longer_than(lengths, t0) > 0 {
        let t1 = (t0 + window).min(batch.max_len);
        let mut window_loss: Option<Tensor> = None;
        // DropConnect: this window's graph multiplies the batch's masks in anew, since
        // each window's backward frees the graph of the one before.
        let weights = masks.drop_weights(&weights)?;
        // Chunks of the window: the whole window (packed), or the stretches between row ends.
        let mut s0 = t0;
        loop {
            let active = rows_longer_than(lengths, s0);
            if active == 0 || s0 >= t1 {
                break;
            }
            let s1 = match kernel {
                // Bidirectional: one chunk of whole rows (the segments are cut inside).
                _ if shape.bidirectional => t1,
                LstmKernel::Packed => t1,
                LstmKernel::Segmented => (lengths[active - 1] as usize).min(t1),
            };
            let ends: Vec<i64> =
                lengths[..active].iter().map(|&l| (l as usize).min(s1) as i64 - s0 as i64).collect();
            let chunk = Chunk { active, s0, ends: &ends, kind, train, want_outputs: pool, kernel };
            let (out, h_n, c_n) = run_chunk(model, batch, &carried, &weights, &masks, &chunk)?;
            let (active_i, still) = (active as i64, rows_longer_than(lengths, s1));
            let still_i = still as i64;

            // Concat pooling: running max and sum over the rows' own (unpadded) steps.
            let pooled = match out {
                Some(out) => {
                    let width = ends[0];
                    let steps = Tensor::f_arange(width, (Kind::Int64, device))?.f_unsqueeze(0)?;
                    let ends_t = host_to_device(Tensor::f_from_slice(&ends)?, device)?.f_unsqueeze(1)?;
                    let padding = steps.f_ge_tensor(&ends_t)?.f_unsqueeze(2)?;
                    let mut mx =
                        out.f_masked_fill(&padding, f64::NEG_INFINITY)?.f_amax([1i64].as_slice(), false)?;
                    let mut sm = out.f_masked_fill(&padding, 0.0)?.f_sum_dim_intlist(
                        [1i64].as_slice(),
                        false,
                        Kind::Float,
                    )?;
                    if let Some((prev_mx, prev_sm)) = &carried.pool {
                        mx = mx.f_maximum(&prev_mx.f_narrow(0, 0, active_i)?)?;
                        sm = sm.f_add(&prev_sm.f_narrow(0, 0, active_i)?)?;
                    }
                    Some((mx, sm))
                }
                None => None,
            };

            // Rows ending in this chunk: loss from the state at their own last token.
            let ending = active_i - still_i;
            if ending > 0 {
                // The last layer's final state, of each direction (`h_n[-2:]` in PyTorch).
                let last_layer = h_n.f_narrow(0, (layers - 1) * directions, directions)?;
                let last = Tensor::f_cat(&last_layer.f_unbind(0)?, 1)?.f_narrow(0, still_i, ending)?;
                let features = match &pooled {
                    Some((mx, sm)) => {
                        let lens: Vec<f32> = lengths[still..active].iter().map(|&l| l as f32).collect();
                        let lens = host_to_device(Tensor::f_from_slice(&lens)?, device)?.f_unsqueeze(1)?;
                        let mean = sm.f_narrow(0, still_i, ending)?.f_div(&lens)?;
                        Tensor::f_cat(&[last, mx.f_narrow(0, still_i, ending)?, mean], 1)?
                    }
                    None => last,
                };
                let logits = features.f_dropout(model.dropouts().head, train)?.f_linear(fc_w, Some(fc_b))?;
                let labels = batch.labels.f_narrow(0, still_i, ending)?;
                let smoothing = if train { options.label_smoothing } else { 0.0 };
                let loss =
                    logits.f_cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, smoothing)?;
                chunk_losses.push(loss.f_detach()?);
                window_loss = Some(match window_loss {
                    Some(w) => w.f_add(&loss)?,
                    None => loss,
                });
                logits_by_chunk.push(logits.f_detach()?);
            }
            // Rows that go on keep their state, still attached within the window.
            carried = Carried {
                h: h_n.f_narrow(1, 0, still_i)?,
                c: c_n.f_narrow(1, 0, still_i)?,
                pool: match pooled {
                    Some((mx, sm)) => Some((mx.f_narrow(0, 0, still_i)?, sm.f_narrow(0, 0, still_i)?)),
                    None => None,
                },
            };
            s0 = s1;
        }
        // Backpropagate the window, then cut the carried state from its graph.
        if let (true, Some(loss)) = (train, window_loss) {
            profile::time(Bucket::Backward, || loss.f_div_scalar(size as f64)?.f_backward())?;
        }
        carried = carried.detach()?;
        windows += 1;
        t0 = t1;
    }
    // One read of the losses for the whole pass, not one per chunk (each a host wait on
    // CUDA); the same f64 sum in the same order as before.
    let loss_sum = if chunk_losses.is_empty() {
        0.0
    } else {
        let losses = Tensor::f_stack(&chunk_losses, 0)?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
        Vec::<f64>::try_from(&losses)?.iter().fold(0.0, |sum, l| sum + l)
    };
    // Chunks end rows from the shortest up: reversed, the pieces are in sorted row order.
    logits_by_chunk.reverse();
    let logits = Tensor::f_cat(&logits_by_chunk, 0)?;
    if logits.size()[0] != size {
        return Err(WorkerError::Batch(format!(
            "internal: {} of {size} rows produced logits",
            logits.size()[0]
        )));
    }
    Ok(PassOutput { loss_sum, logits, windows })
}

/// The batch's dropout masks for one training pass (all `None` in evaluation or when the
/// option is 0). Drawn once per batch, so a review sees the same masks in every window.
#[derive(Debug, Default)]
struct Masks {
    /// `vocab x 1`, scaled: keeps or drops each word everywhere in the batch.
    embedding_rows: Option<Tensor>,
    /// `batch x features`, scaled: the LSTM's input, then the input of each later layer.
    layer_inputs: Vec<Tensor>,
    /// Per layer and direction, `4·hidden x hidden`, scaled, for `weight_hh`.
    weight_hh: Vec<Tensor>,
}

/// A `dims` mask of 0 and `1 / (1 - p)`, as dropout scales the units it keeps.
fn dropout_mask(dims: &[i64], p: f64, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_ones(dims, (Kind::Float, device))?.f_dropout(p, true)?)
}

impl Masks {
    fn draw(model: &LstmClassifier, size: i64, device: Device) -> Result<Self> {
        let (shape, p) = (model.shape(), model.dropouts());
        let (e, h) = (shape.embed_dim as i64, shape.hidden as i64);
        let directions = shape.directions();
        let mut masks = Self::default();
        if p.embedding > 0.0 {
            masks.embedding_rows = Some(dropout_mask(&[shape.vocab_size as i64, 1], p.embedding, device)?);
        }
        if p.variational > 0.0 {
            for layer in 0..shape.layers {
                let width = if layer == 0 { e } else { h * directions as i64 };
                masks.layer_inputs.push(dropout_mask(&[size, width], p.variational, device)?);
            }
        }
        if p.weight > 0.0 {
            for _ in 0..shape.layers * directions {
                masks.weight_hh.push(dropout_mask(&[4 * h, h], p.weight, device)?);
            }
        }
        Ok(masks)
    }

    /// The LSTM weights with DropConnect on every `weight_hh` (index 1 of each group of 4).
    fn drop_weights(&self, weights: &[Tensor]) -> Result<Vec<Tensor>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| match (i % 4, self.weight_hh.get(i / 4)) {
                (1, Some(mask)) => Ok(w.f_mul(&mask.f_to_kind(w.kind())?)?),
                _ => Ok(w.shallow_clone()),
            })
            .collect()
    }

    /// `x` (`active x steps x features`) times this layer's locked mask, if any.
    fn locked(&self, layer: usize, x: Tensor, active: i64) -> Result<Tensor> {
        match self.layer_inputs.get(layer) {
            Some(mask) => Ok(x.f_mul(&mask.f_narrow(0, 0, active)?.f_unsqueeze(1)?.f_to_kind(x.kind())?)?),
            None => Ok(x),
        }
    }
}

/// Which rows and steps a chunk runs, and how.
struct Chunk<'a> {
    /// Rows `0..active` run.
    active: usize,
    /// First time step.
    s0: usize,
    /// Steps each row runs (`ends[0]` is the chunk's width).
    ends: &'a [i64],
    kind: Kind,
    train: bool,
    /// Return the last layer's outputs too (for pooling).
    want_outputs: bool,
    kernel: LstmKernel,
}

/// The LSTM over steps `s0..s0 + ends[0]` of rows `0..active`, each row stopping after
/// `ends[i]` steps: dense when all rows run the whole chunk, packed otherwise. Returns the
/// last layer's outputs (f32, padded with zeros; only when `want_outputs`) and the final
/// (h, c) of every row at its own last step, in f32.
fn run_chunk(
    model: &LstmClassifier,
    batch: &DeviceBatch,
    carried: &Carried,
    weights: &[Tensor],
    masks: &Masks,
    chunk: &Chunk,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let shape = model.shape();
    let (active_i, width) = (chunk.active as i64, chunk.ends[0]);
    let ids = batch.tokens.f_narrow(0, 0, active_i)?.f_narrow(1, chunk.s0 as i64, width)?;
    let mut x = Tensor::f_embedding(model.embedding_weight(), &ids, -1, false, false)?;
    if let Some(rows) = &masks.embedding_rows {
        x = x.f_mul(&Tensor::f_embedding(rows, &ids, -1, false, false)?)?;
    }
    let x = cast(&x, chunk.kind)?;
    let state = |t: &Tensor| cast(&t.f_narrow(1, 0, active_i)?.f_contiguous()?, chunk.kind);
    let hx = [state(&carried.h)?, state(&carried.c)?];
    let (out, h_n, c_n) = if shape.bidirectional && chunk.kernel == LstmKernel::Segmented {
        bidirectional_by_segments(x, &hx, weights, masks, shape.layers, chunk)?
    } else if masks.layer_inputs.is_empty() {
        lstm_call(x, &hx, weights, shape.layers, shape.bidirectional, chunk, chunk.want_outputs)?
    } else {
        // Locked dropout between layers: one layer per call, the mask in between.
        let directions = shape.directions() as i64;
        let per_layer = 4 * shape.directions();
        let (mut input, mut out, mut hs, mut cs) = (Some(x), None, Vec::new(), Vec::new());
        for layer in 0..shape.layers {
            let x =
                input.take().ok_or_else(|| WorkerError::Invalid("internal: a layer had no input".into()))?;
            let x = masks.locked(layer, x, active_i)?;
            let layer_hx = [
                hx[0].f_narrow(0, layer as i64 * directions, directions)?,
                hx[1].f_narrow(0, layer as i64 * directions, directions)?,
            ];
            let layer_weights = &weights[layer * per_layer..(layer + 1) * per_layer];
            let last = layer + 1 == shape.layers;
            let want = !last || chunk.want_outputs;
            let (layer_out, h, c) =
                lstm_call(x, &layer_hx, layer_weights, 1, shape.bidirectional, chunk, want)?;
            hs.push(h);
            cs.push(c);
            if last {
                out = layer_out;
            } else {
                input = layer_out;
            }
        }
        (out, Tensor::f_cat(&hs, 0)?, Tensor::f_cat(&cs, 0)?)
    };
    // The outputs in f32 once, whatever the arithmetic of the layers.
    Ok((out.map(|o| o.f_to_kind(Kind::Float)).transpose()?, h_n, c_n))
}

/// A bidirectional LSTM over whole rows, layer by layer, each direction as dense calls over
/// the stretches in which no row ends (libtorch's packed LSTM runs step by step on the CPU:
/// about 7 times slower in one run here). The reverse direction is the forward machinery run
/// on each row reversed within its own length, its outputs reversed back. Same results as
/// the packed bidirectional call; `hx` holds each layer's and direction's initial state.
fn bidirectional_by_segments(
    x: Tensor,
    hx: &[Tensor; 2],
    weights: &[Tensor],
    masks: &Masks,
    layers: usize,
    chunk: &Chunk,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let ends = &chunk.ends[..chunk.active];
    let device = x.device();
    let (rows, width) = (ends.len() as i64, chunk.ends[0]);
    // reverse[b][t] = ends[b] - 1 - t inside the row, t on its padding (an involution).
    let reverse: Vec<i64> =
        ends.iter().flat_map(|&len| (0..width).map(move |t| if t < len { len - 1 - t } else { t })).collect();
    let reverse = host_to_device(Tensor::f_from_slice(&reverse)?.f_view([rows, width, 1])?, device)?;
    let flip = |t: &Tensor| -> Result<Tensor> {
        let index = reverse.f_expand([rows, width, t.size()[2]], false)?;
        Ok(t.f_gather(1, &index, false)?)
    };
    let (mut input, mut hs, mut cs) = (x, Vec::new(), Vec::new());
    for layer in 0..layers {
        let x = masks.locked(layer, input, rows)?;
        let mut outputs = Vec::new();
        for direction in 0..2 {
            let group = 2 * layer + direction;
            let w = &weights[4 * group..4 * (group + 1)];
            let state = [hx[0].f_narrow(0, group as i64, 1)?, hx[1].f_narrow(0, group as i64, 1)?];
            let seq = if direction == 0 { x.shallow_clone() } else { flip(&x)? };
            let (out, h, c) = direction_by_segments(&seq, &state, w, ends, chunk.train)?;
            outputs.push(if direction == 0 { out } else { flip(&out)? });
            hs.push(h);
            cs.push(c);
        }
        input = Tensor::f_cat(&outputs, 2)?;
    }
    let out = chunk.want_outputs.then_some(input);
    Ok((out, Tensor::f_cat(&hs, 0)?.f_to_kind(Kind::Float)?, Tensor::f_cat(&cs, 0)?.f_to_kind(Kind::Float)?))
}

/// One direction of one layer over rows sorted by length (longest first), `ends[b]` steps
/// each: a dense call per stretch in which no row ends, the state carried between them.
/// Returns the outputs (zero on padding) and every row's (h, c) at its own last step.
fn direction_by_segments(
    x: &Tensor,
    hx: &[Tensor; 2],
    weights: &[Tensor],
    ends: &[i64],
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rows = ends.len();
    let (mut h, mut c) = (hx[0].shallow_clone(), hx[1].shallow_clone());
    let (mut pieces, mut h_ends, mut c_ends) = (Vec::new(), Vec::new(), Vec::new());
    let mut s0 = 0i64;
    let mut active = rows;
    while active > 0 {
        let s1 = ends[active - 1];
        let active_i = active as i64;
        let seq = x.f_narrow(0, 0, active_i)?.f_narrow(1, s0, s1 - s0)?;
        let state = [h.f_narrow(1, 0, active_i)?, c.f_narrow(1, 0, active_i)?];
        let (out, h_n, c_n) = seq.f_lstm(&state, weights, true, 1, 0.0, train, false, true)?;
        // Padding rows below the active ones, so every piece has all rows.
        let missing = rows as i64 - active_i;
        pieces.push(if missing > 0 {
            let zeros = Tensor::f_zeros([missing, s1 - s0, out.size()[2]], (out.kind(), out.device()))?;
            Tensor::f_cat(&[out, zeros], 0)?
        } else {
            out
        });
        let still = rows_longer_than(&ends[..active], s1 as usize);
        let ending = active_i - still as i64;
        h_ends.push(h_n.f_narrow(1, still as i64, ending)?);
        c_ends.push(c_n.f_narrow(1, still as i64, ending)?);
        (h, c) = (h_n, c_n);
        active = still;
        s0 = s1;
    }
    // Rows end from the shortest up: reversed, the pieces are in row order.
    h_ends.reverse();
    c_ends.reverse();
    Ok((Tensor::f_cat(&pieces, 1)?, Tensor::f_cat(&h_ends, 1)?, Tensor::f_cat(&c_ends, 1)?))
}

/// One fused LSTM call of `layers` layers over the chunk's rows; outputs (in the chunk's
/// arithmetic, so that a next layer reads them as they are) only when `want_outputs`,
/// final states in f32.
fn lstm_call(
    x: Tensor,
    hx: &[Tensor; 2],
    weights: &[Tensor],
    layers: usize,
    bidirectional: bool,
    chunk: &Chunk,
    want_outputs: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (ends, width, layers) = (chunk.ends, chunk.ends[0], layers as i64);
    let (out, h_n, c_n) = if ends[chunk.active - 1] == width {
        let (out, h_n, c_n) = x.f_lstm(hx, weights, true, layers, 0.0, chunk.train, bidirectional, true)?;
        (want_outputs.then_some(out), h_n, c_n)
    } else {
        let lengths = Tensor::f_from_slice(ends)?;
        let (data, batch_sizes) = x.f_internal_pack_padded_sequence(&lengths, true)?;
        let (out_data, h_n, c_n) = Tensor::f_lstm_data(
            &data,
            &batch_sizes,
            hx,
            weights,
            true,
            layers,
            0.0,
            chunk.train,
            bidirectional,
        )?;
        let out = if want_outputs {
            let (padded, _) =
                Tensor::f_internal_pad_packed_sequence(&out_data, &batch_sizes, true, 0.0, width)?;
            Some(padded)
        } else {
            None
        };
        (out, h_n, c_n)
    };
    Ok((out, h_n.f_to_kind(Kind::Float)?, c_n.f_to_kind(Kind::Float)?))
}

fn cast(t: &Tensor, kind: Kind) -> Result<Tensor> {
    if t.kind() == kind {
        Ok(t.shallow_clone())
    } else {
        Ok(t.f_to_kind(kind)?)
    }
}

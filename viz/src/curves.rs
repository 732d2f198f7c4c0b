//! `curves.png`: training loss per step (smoothed), validation and test accuracy per epoch,
//! and tokens/s, for one run folder or several on one figure.
//!
//! The data comes from a run folder's `metrics.jsonl` and `summary.json`, in both formats:
//! the coordinator's (epoch records without a `type`, `{"type":"restart"}`, and
//! `{"type":"step"}` records) and `worker train`'s (`{"type":"step"}` and `{"type":"eval"}`).
//! Text is drawn with the DejaVu Sans font compiled in, so no system font or fontconfig is
//! needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::{io_err, Result, VizError};

pub const CURVES_FILE: &str = "curves.png";
const METRICS_FILE: &str = "metrics.jsonl";
const SUMMARY_FILE: &str = "summary.json";
pub(crate) const FONT: &str = "sans-serif";

/// The curves of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunCurves {
    /// The legend's name for the run (its folder name).
    pub label: String,
    /// How the run was distributed, e.g. "2 workers, ring" or "1 process, cpu".
    pub setup: String,
    pub steps_per_epoch: Option<u64>,
    /// (global step, mean training loss over the logged steps).
    pub loss: Vec<(f64, f64)>,
    /// (global step, tokens/s).
    pub tokens_per_second: Vec<(f64, f64)>,
    /// (1-based epoch, accuracy).
    pub val_accuracy: Vec<(f64, f64)>,
    /// The test accuracy of each epoch's model, where the run measured it.
    pub test_accuracy: Vec<(f64, f64)>,
    /// The kept model's test accuracy (summary.json's `test_accuracy`), once the run finished.
    pub kept_test_accuracy: Option<f64>,
    /// True when `loss` comes from per-step records (false: one point per epoch).
    pub per_step: bool,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

/// Keeps the last value per x (a restarted run logs the steps it ran again), sorted by x.
fn dedup_last(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    let mut by_x: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for p in points {
        by_x.insert(p.0.to_bits(), p);
    }
    let mut out: Vec<(f64, f64)> = by_x.into_values().collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

impl RunCurves {
    /// Reads a run folder (`metrics.jsonl`, and `summary.json` when the run finished).
    pub fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let label = run_dir
            .canonicalize()
            .unwrap_or_else(|_| run_dir.to_path_buf())
            .file_name()
            .map_or_else(|| run_dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut curves = RunCurves { label, ..RunCurves::default() };
        let (mut step_loss, mut step_tps, mut epoch_loss, mut epoch_tps) = (vec![], vec![], vec![], vec![]);
        let (mut val, mut test) = (vec![], vec![]);
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| VizError::Metrics {
                path: path.clone(),
                line: i + 1,
                message: e.to_string(),
            })?;
            match v.get("type").and_then(Value::as_str) {
                Some("step") => {
                    if let Some(spe) = v.get("steps_in_epoch").and_then(Value::as_u64) {
                        curves.steps_per_epoch = Some(spe);
                    }
                    let Some(step) = num(&v, "global_step") else { continue };
                    if let Some(loss) = num(&v, "loss") {
                        step_loss.push((step, loss));
                    }
                    if let Some(tps) = num(&v, "tokens_per_second") {
                        step_tps.push((step, tps));
                    }
                }
                Some("eval") => {
                    let (Some(epoch), Some(acc)) = (num(&v, "epoch"), num(&v, "accuracy")) else { continue };
                    match (v.get("split").and_then(Value::as_str), v.get("model").and_then(Value::as_str)) {
                        (Some("val"), _) => val.push((epoch, acc)),
                        (Some("test"), Some("last")) => test.push((epoch, acc)),
                        _ => {}
                    }
                }
                // The coordinator's epoch records.
                None if v.get("train_loss").is_some() => {
                    let Some(epoch) = num(&v, "epoch") else { continue };
                    let steps = v.get("steps").and_then(Value::as_u64);
                    if let Some(s) = steps {
                        curves.steps_per_epoch = Some(s);
                    }
                    let end = epoch * steps.unwrap_or(1) as f64;
                    if let Some(loss) = num(&v, "train_loss") {
                        epoch_loss.push((end, loss));
                    }
                    if let Some(tps) = num(&v, "tokens_per_second") {
                        epoch_tps.push((end, tps));
                    }
                    if let Some(acc) = num(&v, "val_accuracy") {
                        val.push((epoch, acc));
                    }
                }
                _ => {}
            }
        }
        curves.per_step = !step_loss.is_empty();
        curves.loss = dedup_last(if curves.per_step { step_loss } else { epoch_loss });
        curves.tokens_per_second = dedup_last(if step_tps.is_empty() { epoch_tps } else { step_tps });
        curves.val_accuracy = dedup_last(val);
        curves.test_accuracy = dedup_last(test);
        let summary_path = run_dir.join(SUMMARY_FILE);
        if let Ok(text) = std::fs::read_to_string(&summary_path) {
            if let Ok(s) = serde_json::from_str::<Value>(&text) {
                curves.apply_summary(&s);
            }
        }
        Ok(curves)
    }

    /// Setup and the final test accuracy from a summary.json (coordinator or worker).
    pub fn apply_summary(&mut self, s: &Value) {
        let world = s.get("world_size").and_then(Value::as_u64);
        let backend = s.get("backend").and_then(Value::as_str);
        let device = s.get("device").and_then(Value::as_str);
        self.setup = match (world, backend, device) {
            (Some(w), Some(b), _) => setup_text(w as usize, b),
            (_, _, Some(d)) => format!("1 process, {d}"),
            _ => String::new(),
        };
        let epochs = num(s, "epochs");
        self.kept_test_accuracy = num(s, "test_accuracy");
        if let (Some(epoch), Some(acc)) = (epochs, num(s, "test_accuracy")) {
            if !self.test_accuracy.iter().any(|p| p.0 == epoch) {
                self.test_accuracy.push((epoch, acc));
            }
        }
    }

    /// Adds the steps of a live run whose metrics.jsonl holds no per-step records.
    pub fn use_live_steps(&mut self, loss: &[(f64, f64)], tokens_per_second: &[(f64, f64)]) {
        if self.per_step || loss.is_empty() {
            return;
        }
        self.loss = dedup_last(loss.to_vec());
        self.tokens_per_second = dedup_last(tokens_per_second.to_vec());
        self.per_step = true;
    }

    fn name(&self) -> String {
        if self.setup.is_empty() {
            self.label.clone()
        } else {
            format!("{} ({})", self.label, self.setup)
        }
    }
}

/// "2 workers, ring" / "1 worker, nccl".
pub fn setup_text(world_size: usize, backend: &str) -> String {
    let backend = if backend.is_empty() { "?" } else { backend };
    format!("{world_size} worker{}, {backend}", if world_size == 1 { "" } else { "s" })
}

/// Heavier smoothing for long runs, so that the trend shows through the per-step noise.
fn smoothing_weight(points: usize) -> f64 {
    if points > 100 {
        0.9
    } else {
        0.6
    }
}

/// TensorBoard's smoothing: an exponential moving average, debiased at the start.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    let mut out = Vec::with_capacity(points.len());
    for (i, &(x, y)) in points.iter().enumerate() {
        last = last * weight + (1.0 - weight) * y;
        let debias = 1.0 - weight.powi(i as i32 + 1);
        out.push((x, last / debias));
    }
    out
}

pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // A failure leaves plotters without a font: drawing then fails with a clear error.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn range(values: impl Iterator<Item = f64>, floor_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if floor_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + f64::max(1.0, lo.abs() * 0.1);
    }
    let pad = (hi - lo) * 0.05;
    (if floor_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
/// One run in a panel: legend name, colour, raw points (drawn faint) and the main line.
type Series = (String, RGBColor, Vec<(f64, f64)>, Vec<(f64, f64)>);
type DrawResult = std::result::Result<(), String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Draws `runs` into one PNG. With several runs the step axes are in epochs, so that runs
/// with different world sizes (and so steps per epoch) line up.
pub fn plot_runs(runs: &[RunCurves], path: &Path) -> Result<()> {
    register_font();
    let fail = |message: String| VizError::Plot { path: path.to_path_buf(), message };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    // Draw into a temporary file and rename: a reader never sees half a picture.
    let tmp = tmp_path(path);
    {
        let root = BitMapBackend::new(&tmp, (1400, 1000)).into_drawing_area();
        draw(&root, runs).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "curves.png".into(), |n| n.to_string_lossy().into_owned());
    // Keep the .png extension: the bitmap encoder picks the format by extension.
    path.with_file_name(format!(".{name}.{}.png", std::process::id()))
}

fn title(runs: &[RunCurves]) -> String {
    match runs {
        [one] if one.setup.is_empty() => format!("imdb-ddp: {}", one.label),
        [one] => format!("imdb-ddp: {}, {}", one.label, one.setup),
        many => {
            format!("imdb-ddp: {}", many.iter().map(|r| r.label.as_str()).collect::<Vec<_>>().join(" vs "))
        }
    }
}

fn draw(root: &Area<'_>, runs: &[RunCurves]) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(&title(runs), (FONT, 30).into_font().style(FontStyle::Bold)).map_err(err)?;
    let panels = root.split_evenly((2, 2));
    let in_epochs = runs.len() > 1 && runs.iter().all(|r| r.steps_per_epoch.is_some_and(|s| s > 0));
    let x_of = |r: &RunCurves, step: f64| match (in_epochs, r.steps_per_epoch) {
        (true, Some(s)) => step / s as f64,
        _ => step,
    };
    let step_axis = if in_epochs { "epoch" } else { "global step (optimizer updates)" };

    // 1. Training loss: raw points faint, smoothed line strong.
    let series: Vec<Series> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let raw: Vec<(f64, f64)> = r.loss.iter().map(|&(s, l)| (x_of(r, s), l)).collect();
            let smoothed = if r.per_step { smooth(&raw, smoothing_weight(raw.len())) } else { raw.clone() };
            (r.name(), PALETTE[i % PALETTE.len()], raw, smoothed)
        })
        .collect();
    let caption = if runs.iter().all(|r| r.per_step) {
        "Training loss per step (smoothed; raw faint)"
    } else {
        "Training loss (per epoch where no per-step records)"
    };
    line_panel(&panels[0], caption, step_axis, "cross-entropy loss", series, false)?;

    // 2. Accuracy per epoch: validation solid with circles, test dashed with triangles.
    accuracy_panel(&panels[1], runs)?;

    // 3. Tokens/s.
    let tps: Vec<Series> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let raw: Vec<(f64, f64)> = r.tokens_per_second.iter().map(|&(s, t)| (x_of(r, s), t)).collect();
            let smoothed = if r.per_step { smooth(&raw, smoothing_weight(raw.len())) } else { raw.clone() };
            (r.name(), PALETTE[i % PALETTE.len()], raw, smoothed)
        })
        .collect();
    line_panel(&panels[2], "Throughput (all ranks)", step_axis, "tokens / s", tps, true)?;

    // 4. The numbers, for the report.
    summary_panel(&panels[3], runs)
}

fn line_panel(
    area: &Area<'_>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: Vec<Series>,
    floor_zero: bool,
) -> DrawResult {
    let all = || series.iter().flat_map(|s| s.2.iter().chain(s.3.iter()));
    let (x0, x1) = range(all().map(|p| p.0), true);
    let (y0, y1) = range(all().map(|p| p.1), floor_zero);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .x_label_formatter(&|v| compact(*v))
        .y_label_formatter(&|v| compact(*v))
        .draw()
        .map_err(err)?;
    if all().next().is_none() {
        return no_data(area);
    }
    for (name, color, raw, line) in &series {
        let color = *color;
        if raw.iter().zip(line).any(|(a, b)| a != b) {
            chart
                .draw_series(LineSeries::new(raw.iter().copied(), color.mix(0.25).stroke_width(1)))
                .map_err(err)?;
        }
        let many = line.len() <= 12;
        chart
            .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if many {
            chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)
}

fn accuracy_panel(area: &Area<'_>, runs: &[RunCurves]) -> DrawResult {
    let points = || runs.iter().flat_map(|r| r.val_accuracy.iter().chain(r.test_accuracy.iter()));
    let max_epoch = points().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = range(points().map(|p| p.1), false);
    let (lo, hi) = (lo.clamp(0.0, 0.5), hi.clamp(0.55, 1.0));
    let mut chart = ChartBuilder::on(area)
        .caption("Accuracy per epoch (validation solid, test dashed)", (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0.5..max_epoch + 0.5, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("accuracy")
        .x_labels((max_epoch as usize + 1).min(20))
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-6 { format!("{x:.0}") } else { String::new() })
        .y_label_formatter(&|y| format!("{:.0}%", 100.0 * y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(err)?;
    if points().next().is_none() {
        return no_data(area);
    }
    for (i, r) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let prefix = if runs.len() > 1 { format!("{} ", r.label) } else { String::new() };
        if !r.val_accuracy.is_empty() {
            chart
                .draw_series(LineSeries::new(r.val_accuracy.iter().copied(), color.stroke_width(2)))
                .map_err(err)?
                .label(format!("{prefix}validation"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart
                .draw_series(r.val_accuracy.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
        if !r.test_accuracy.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(
                    r.test_accuracy.iter().copied(),
                    6,
                    4,
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(format!("{prefix}test"))
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 5, color.filled()));
            chart
                .draw_series(r.test_accuracy.iter().map(|&p| TriangleMarker::new(p, 6, color.filled())))
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)
}

fn summary_panel(area: &Area<'_>, runs: &[RunCurves]) -> DrawResult {
    let area = area.margin(40, 20, 30, 20);
    area.draw(&Text::new("Summary", (0, 0), (FONT, 20).into_font().style(FontStyle::Bold))).map_err(err)?;
    let mut y = 40;
    for (i, r) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let last = |v: &[(f64, f64)]| v.last().map_or("-".to_string(), |p| format!("{:.2}%", 100.0 * p.1));
        // The kept model's (the best by validation) once the run finished.
        let test =
            r.kept_test_accuracy.map_or_else(|| last(&r.test_accuracy), |a| format!("{:.2}%", 100.0 * a));
        let best = r.val_accuracy.iter().map(|p| p.1).fold(f64::NAN, f64::max);
        let tps = r.tokens_per_second.iter().map(|p| p.1).collect::<Vec<_>>();
        let mean_tps = if tps.is_empty() { f64::NAN } else { tps.iter().sum::<f64>() / tps.len() as f64 };
        area.draw(&Rectangle::new([(0, y + 2), (14, y + 16)], color.filled())).map_err(err)?;
        area.draw(&Text::new(r.name(), (24, y), (FONT, 17))).map_err(err)?;
        let lines = [
            format!(
                "test accuracy {}   best validation {}",
                test,
                if best.is_finite() { format!("{:.2}%", 100.0 * best) } else { "-".into() }
            ),
            format!(
                "epochs {}   mean {} tokens/s   last loss {}",
                r.val_accuracy.len().max(r.test_accuracy.len()),
                if mean_tps.is_finite() { compact(mean_tps) } else { "-".into() },
                r.loss.last().map_or("-".to_string(), |p| format!("{:.4}", p.1))
            ),
        ];
        for line in lines {
            y += 24;
            area.draw(&Text::new(line, (24, y), (FONT, 15))).map_err(err)?;
        }
        y += 34;
    }
    Ok(())
}

fn no_data(area: &Area<'_>) -> DrawResult {
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new("no data yet", (w as i32 / 2 - 40, h as i32 / 2), (FONT, 16))).map_err(err)
}

/// 475000 -> "475k", 0.6931 -> "0.693".
fn compact(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COORDINATOR: &str = r#"{"epoch":1,"steps":10,"train_loss":0.69,"train_samples":320,"train_tokens":9000,"epoch_seconds":1.0,"tokens_per_second":9000.0,"comm_share":0.1,"val_loss":0.68,"val_accuracy":0.55,"parameter_checksum":"00"}
{"type":"restart","attempt":1,"cause":"x","resumed_from_global_step":10,"resumed_from":"y","steps_lost":3}
{"epoch":2,"steps":10,"train_loss":0.60,"train_samples":320,"train_tokens":9000,"epoch_seconds":1.0,"tokens_per_second":9500.0,"comm_share":0.1,"val_loss":0.6,"val_accuracy":0.65,"parameter_checksum":"00"}
"#;

    const WORKER: &str = r#"{"type":"step","epoch":1,"step":5,"steps_in_epoch":10,"global_step":5,"loss":0.7,"accuracy":0.5,"lr":0.001,"grad_norm":1.0,"tokens_per_second":1000.0,"train_seconds":1.0}
{"type":"step","epoch":1,"step":10,"steps_in_epoch":10,"global_step":10,"loss":0.65,"accuracy":0.6,"lr":0.001,"grad_norm":1.0,"tokens_per_second":1100.0,"train_seconds":2.0}
{"type":"eval","split":"val","model":"last","epoch":1,"accuracy":0.6,"loss":0.6,"examples":100,"train_seconds":2.0}
{"type":"eval","split":"test","model":"best","epoch":1,"accuracy":0.62,"loss":0.6,"examples":100,"train_seconds":2.0}
"#;

    #[test]
    fn reads_both_metrics_formats() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("dist");
        std::fs::create_dir(&c).unwrap();
        std::fs::write(c.join("metrics.jsonl"), COORDINATOR).unwrap();
        std::fs::write(
            c.join("summary.json"),
            r#"{"world_size":2,"backend":"ring","epochs":2,"test_accuracy":0.7}"#,
        )
        .unwrap();
        let dist = RunCurves::load(&c).unwrap();
        assert_eq!(dist.label, "dist");
        assert_eq!(dist.setup, "2 workers, ring");
        assert!(!dist.per_step);
        assert_eq!(dist.loss, vec![(10.0, 0.69), (20.0, 0.60)]);
        assert_eq!(dist.val_accuracy, vec![(1.0, 0.55), (2.0, 0.65)]);
        assert_eq!(dist.test_accuracy, vec![(2.0, 0.7)]);
        assert_eq!(dist.kept_test_accuracy, Some(0.7));
        assert_eq!(dist.steps_per_epoch, Some(10));

        let w = dir.path().join("single");
        std::fs::create_dir(&w).unwrap();
        std::fs::write(w.join("metrics.jsonl"), WORKER).unwrap();
        std::fs::write(w.join("summary.json"), r#"{"device":"cpu","epochs":1,"test_accuracy":0.62}"#)
            .unwrap();
        let single = RunCurves::load(&w).unwrap();
        assert!(single.per_step);
        assert_eq!(single.loss, vec![(5.0, 0.7), (10.0, 0.65)]);
        assert_eq!(single.setup, "1 process, cpu");
        assert_eq!(single.test_accuracy, vec![(1.0, 0.62)]);

        let png = dir.path().join("out/curves.png");
        plot_runs(std::slice::from_ref(&dist), &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        plot_runs(&[dist, single], &png).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("out")).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn smoothing_is_debiased() {
        let s = smooth(&[(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)], 0.6);
        assert!(s.iter().all(|p| (p.1 - 1.0).abs() < 1e-12), "{s:?}");
    }

    #[test]
    fn a_bad_line_names_its_number() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), "{}\nnot json\n").unwrap();
        let e = RunCurves::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}

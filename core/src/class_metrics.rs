//! Metrics of a classifier over any number of classes, from its confusion matrix (row: the
//! true class, column: the predicted one): accuracy, macro-F1, per-class precision, recall
//! and F1. The workers count; the coordinator (or `worker train`) sums and computes.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    pub class: String,
    /// Of the examples predicted as this class, the share that are (0 when none was).
    pub precision: f64,
    /// Of the examples of this class, the share predicted as it (0 when it has none).
    pub recall: f64,
    pub f1: f64,
    /// Examples of this class.
    pub support: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub accuracy: f64,
    /// The unweighted mean of the classes' F1.
    pub macro_f1: f64,
    pub per_class: Vec<ClassScore>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

impl ClassMetrics {
    /// From a row-major `classes.len()²` confusion matrix; None when its size does not fit.
    pub fn from_confusion(classes: &[String], confusion: &[u64]) -> Option<Self> {
        let n = classes.len();
        if n == 0 || confusion.len() != n * n {
            return None;
        }
        let rows: Vec<Vec<u64>> = confusion.chunks(n).map(<[u64]>::to_vec).collect();
        let total: u64 = confusion.iter().sum();
        let correct: u64 = (0..n).map(|i| rows[i][i]).sum();
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_class: Vec<ClassScore> = (0..n)
            .map(|c| {
                let support: u64 = rows[c].iter().sum();
                let predicted: u64 = rows.iter().map(|r| r[c]).sum();
                let precision = ratio(rows[c][c], predicted);
                let recall = ratio(rows[c][c], support);
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                ClassScore { class: classes[c].clone(), precision, recall, f1, support }
            })
            .collect();
        Some(Self {
            accuracy: ratio(correct, total),
            macro_f1: per_class.iter().map(|s| s.f1).sum::<f64>() / n as f64,
            per_class,
            confusion: rows,
        })
    }

    /// TensorBoard's scalars under `prefix` (`test`, `test_best`, ...): `macro_f1`, then each
    /// class's `precision/<class>` and `recall/<class>`. Both binaries chart these names.
    pub fn scalars(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut out = vec![(format!("{prefix}/macro_f1"), self.macro_f1)];
        for s in &self.per_class {
            out.push((format!("{prefix}/precision/{}", s.class), s.precision));
            out.push((format!("{prefix}/recall/{}", s.class), s.recall));
        }
        out
    }

    /// The table of the final screen: per-class scores, then the confusion matrix.
    pub fn render(&self) -> String {
        let width = self.per_class.iter().map(|s| s.class.chars().count()).max().unwrap_or(5).clamp(5, 24);
        let mut out = format!("accuracy {:.4}   macro-F1 {:.4}\n", self.accuracy, self.macro_f1);
        out.push_str(&format!(
            "{:<width$} {:>9} {:>9} {:>9} {:>8}\n",
            "class", "precision", "recall", "f1", "support"
        ));
        for s in &self.per_class {
            out.push_str(&format!(
                "{:<width$} {:>9.4} {:>9.4} {:>9.4} {:>8}\n",
                truncate(&s.class, width),
                s.precision,
                s.recall,
                s.f1,
                s.support
            ));
        }
        out.push_str(&format!("confusion (rows: true class, columns: predicted)\n{:<width$}", ""));
        for s in &self.per_class {
            out.push_str(&format!(" {:>8}", truncate(&s.class, 8)));
        }
        out.push('\n');
        for (s, row) in self.per_class.iter().zip(&self.confusion) {
            out.push_str(&format!("{:<width$}", truncate(&s.class, width)));
            for v in row {
                out.push_str(&format!(" {v:>8}"));
            }
            out.push('\n');
        }
        out
    }
}

fn truncate(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

/// Adds one prediction to a row-major confusion matrix of `classes` classes; labels or
/// predictions out of range are ignored (the caller checked the labels).
pub fn count(confusion: &mut [u64], classes: usize, truth: usize, predicted: usize) {
    if truth < classes && predicted < classes {
        confusion[truth * classes + predicted] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_from_a_confusion_matrix() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        // true a: 3 right, 1 as b; true b: 2 right; true c: 1 as a, none right.
        let m = ClassMetrics::from_confusion(&classes, &[3, 1, 0, 0, 2, 0, 1, 0, 0]).unwrap();
        assert!((m.accuracy - 5.0 / 7.0).abs() < 1e-12);
        assert!((m.per_class[0].precision - 0.75).abs() < 1e-12);
        assert!((m.per_class[0].recall - 0.75).abs() < 1e-12);
        assert!((m.per_class[1].precision - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.per_class[1].recall, 1.0);
        assert_eq!((m.per_class[2].precision, m.per_class[2].recall, m.per_class[2].f1), (0.0, 0.0, 0.0));
        let f1_b = 2.0 * (2.0 / 3.0) / (2.0 / 3.0 + 1.0);
        assert!((m.macro_f1 - (0.75 + f1_b) / 3.0).abs() < 1e-12);
        assert_eq!(m.confusion[2], vec![1, 0, 0]);
        assert_eq!(m.per_class[2].support, 1);
        assert!(m.render().contains("macro-F1"));
        assert!(ClassMetrics::from_confusion(&classes, &[1, 2]).is_none());
        let names: Vec<String> = m.scalars("test").into_iter().map(|(name, _)| name).collect();
        assert_eq!(names[..3], ["test/macro_f1", "test/precision/a", "test/recall/a"]);
        assert_eq!(names.len(), 1 + 2 * 3);
    }
}

//! `confusion.png`: the test split's confusion matrix of the kept model, one row per true
//! class and one column per predicted class, each cell shaded by its share of the row.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::curves::{register_font, tmp_path, FONT};
use crate::{io_err, Result, VizError};

pub const CONFUSION_FILE: &str = "confusion.png";

/// Draws `confusion[true][predicted]` for `classes` into `path` (written to a temporary
/// name, then renamed).
pub fn plot_confusion(path: &Path, classes: &[String], confusion: &[Vec<u64>]) -> Result<()> {
    register_font();
    let fail = |message: String| VizError::Plot { path: path.to_path_buf(), message };
    let n = classes.len();
    if n == 0 || confusion.len() != n || confusion.iter().any(|r| r.len() != n) {
        return Err(fail(format!("a confusion matrix of {n} classes must be {n} x {n}")));
    }
    let cell = (720 / n as u32).clamp(24, 160);
    let margin = 200u32;
    let side = margin + cell * n as u32 + 40;
    let tmp = tmp_path(path);
    {
        let root = BitMapBackend::new(&tmp, (side, side + 40)).into_drawing_area();
        draw(&root, classes, confusion, cell as i32, margin as i32).map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw(
    root: &Area<'_>,
    classes: &[String],
    confusion: &[Vec<u64>],
    cell: i32,
    margin: i32,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let total: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..classes.len()).map(|i| confusion[i][i]).sum();
    let title = format!(
        "Confusion matrix (test): accuracy {:.4}, {total} reviews",
        if total == 0 { 0.0 } else { correct as f64 / total as f64 }
    );
    root.draw(&Text::new(title, (20, 12), (FONT, 22).into_font().style(FontStyle::Bold)))?;
    let label_font = (FONT, 15).into_font();
    root.draw(&Text::new("predicted class →", (margin, margin - 70), label_font.clone()))?;
    root.draw(&Text::new("true class ↓", (20, margin - 30), label_font.clone()))?;
    let short = |s: &str| -> String {
        let s: String = s.chars().take(16).collect();
        s
    };
    for (i, class) in classes.iter().enumerate() {
        let at = margin + i as i32 * cell + cell / 2;
        let centred = TextStyle::from(label_font.clone()).pos(Pos::new(HPos::Center, VPos::Bottom));
        root.draw(&Text::new(short(class), (at, margin - 8), centred))?;
        let right = TextStyle::from(label_font.clone()).pos(Pos::new(HPos::Right, VPos::Center));
        root.draw(&Text::new(short(class), (margin - 10, at), right))?;
    }
    for (i, row) in confusion.iter().enumerate() {
        let row_total: u64 = row.iter().sum();
        for (j, &count) in row.iter().enumerate() {
            let share = if row_total == 0 { 0.0 } else { count as f64 / row_total as f64 };
            let shade = (255.0 * (1.0 - 0.85 * share)) as u8;
            let colour = RGBColor(shade, shade, 255);
            let (x, y) = (margin + j as i32 * cell, margin + i as i32 * cell);
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], colour.filled()))?;
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], BLACK.stroke_width(1)))?;
            let ink = if share > 0.6 { WHITE } else { BLACK };
            let text = (FONT, (cell / 4).clamp(9, 22))
                .into_font()
                .color(&ink)
                .pos(Pos::new(HPos::Center, VPos::Center));
            root.draw(&Text::new(count.to_string(), (x + cell / 2, y + cell / 2), text))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_and_refuses_a_ragged_matrix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFUSION_FILE);
        let classes: Vec<String> = ["1-2", "3-4", "7-8", "9-10"].iter().map(|s| s.to_string()).collect();
        let m = vec![vec![5, 1, 0, 0], vec![2, 3, 1, 0], vec![0, 1, 4, 2], vec![0, 0, 1, 6]];
        plot_confusion(&path, &classes, &m).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"));
        assert!(plot_confusion(&path, &classes, &m[..3]).is_err());
    }
}

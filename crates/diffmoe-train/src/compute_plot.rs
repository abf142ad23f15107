//! Plots of a [`ComputeReport`] like the paper's Figure 1(c) and 1(d):
//! activated parameters per token against the sampling step (all labels,
//! and one line per class for up to ten classes), and per class; and a
//! general scatter/line plot ([`plot_xy`]) for quality against compute.
//!
//! Drawn with plotters into an RGB buffer (text in the embedded DejaVu Sans,
//! so no system font is needed) and written as PNG atomically.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::compute::{ClassKey, ComputeReport};
use crate::data::DataError;
use crate::image_grid::write_png;

/// Size of every plot, in pixels.
const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;
/// Classes that get a line of their own in the per-step plot.
const CLASS_LINES: usize = 10;
const FONT: &str = "sans-serif";

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Drawing failed.
    #[error("cannot draw {path}")]
    Draw {
        /// The plot.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// The PNG could not be written.
    #[error(transparent)]
    Write(#[from] DataError),
}

fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        let fonts = [(FontStyle::Normal, dejavu::sans::regular()), (FontStyle::Bold, dejavu::sans::bold())];
        for (style, bytes) in fonts {
            assert!(register_font(FONT, style, bytes).is_ok(), "the embedded DejaVu Sans is a valid font");
        }
    });
}

/// Draws into a white RGB canvas, then writes it as `path`.
fn render(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), Box<dyn Error + Send + Sync>>,
) -> Result<(), PlotError> {
    register_fonts();
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        let drawn = draw(&root).and_then(|()| root.present().map_err(|e| Box::new(e) as _));
        drawn.map_err(|source| PlotError::Draw { path: path.to_path_buf(), source })?;
    }
    write_png(path, pixels, WIDTH as usize, HEIGHT as usize, 3)?;
    Ok(())
}

/// A y range around `values` with a margin; a flat series gets +-5%.
fn y_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo { 0.08 * (hi - lo) } else { 0.05 * hi.abs().max(1e-9) };
    (lo - pad).max(0.0)..hi + pad
}

fn class_name(class: ClassKey) -> String {
    match class {
        ClassKey::Class(c) => format!("class {c}"),
        ClassKey::Unconditional => "unconditional".to_string(),
    }
}

/// Activated parameters per token (millions) against the sampling step.
pub fn plot_per_step(report: &ComputeReport, title: &str, path: &Path) -> Result<(), PlotError> {
    let millions = |v: f64| v / 1e6;
    let steps = report.per_step.len().max(1);
    let all: Vec<(f64, f64)> = report
        .per_step
        .iter()
        .enumerate()
        .map(|(i, r)| (i as f64, millions(r.activated_parameters_per_token)))
        .collect();
    let series: Vec<(ClassKey, Vec<(f64, f64)>)> = report
        .per_class_per_step
        .iter()
        .filter(|s| match s.class {
            ClassKey::Class(c) => c < CLASS_LINES,
            ClassKey::Unconditional => true,
        })
        .map(|s| {
            let points = s
                .activated_parameters_per_token
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| (i as f64, millions(v))))
                .collect();
            (s.class, points)
        })
        .collect();
    let training = millions(report.activated_parameters_at_training_capacity);
    let range = y_range(
        all.iter().map(|p| p.1).chain(series.iter().flat_map(|(_, p)| p.iter().map(|p| p.1))).chain([training]),
    );
    // Headroom above the lines for the legend.
    let range = range.start..range.end + 0.1 * (2 + series.len()) as f64 * (range.end - range.start) / 3.0;
    render(path, |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..(steps.saturating_sub(1).max(1)) as f64, range)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("sampling step (noise to data)")
            .y_desc("activated parameters per token (M)")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()?;
        for (i, (class, points)) in series.iter().enumerate() {
            let colour = match class {
                ClassKey::Unconditional => RGBColor(150, 150, 150),
                ClassKey::Class(_) => {
                    let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
                    RGBColor(r, g, b)
                }
            };
            chart
                .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(1)))?
                .label(class_name(*class))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        }
        chart
            .draw_series(LineSeries::new(all.iter().copied(), BLACK.stroke_width(3)))?
            .label("all samples")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(3)));
        let flat = vec![(0.0, training), ((steps.saturating_sub(1).max(1)) as f64, training)];
        chart
            .draw_series(DashedLineSeries::new(flat, 6, 4, RED.stroke_width(1)))?
            .label("training capacity")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(1)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// Activated parameters per token (millions) of each label, over all steps.
pub fn plot_per_class(report: &ComputeReport, title: &str, path: &Path) -> Result<(), PlotError> {
    let bars: Vec<(ClassKey, f64)> =
        report.per_class.iter().filter_map(|r| Some((r.class?, r.activated_parameters_per_token / 1e6))).collect();
    let training = report.activated_parameters_at_training_capacity / 1e6;
    let range = y_range(bars.iter().map(|b| b.1).chain([training]));
    let n = bars.len().max(1);
    let names: Vec<String> = bars
        .iter()
        .map(|(c, _)| match c {
            ClassKey::Class(c) => c.to_string(),
            ClassKey::Unconditional => "uncond".to_string(),
        })
        .collect();
    render(path, |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, range.clone())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.min(40))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_desc("class")
            .y_desc("activated parameters per token (M)")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (class, v))| {
            let colour = match class {
                ClassKey::Unconditional => RGBColor(150, 150, 150),
                ClassKey::Class(_) => RGBColor(70, 110, 180),
            };
            Rectangle::new([(i as f64 - 0.38, range.start), (i as f64 + 0.38, *v)], colour.filled())
        }))?;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(-0.5, training), (n as f64 - 0.5, training)],
                6,
                4,
                RED.stroke_width(1),
            ))?
            .label("training capacity")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(1)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// One series of [`plot_xy`].
#[derive(Debug, Clone, PartialEq)]
pub struct XySeries {
    /// Legend entry.
    pub name: String,
    /// The points, in drawing order.
    pub points: Vec<(f64, f64)>,
    /// Join the points with a line (else markers only).
    pub line: bool,
}

/// A scatter/line plot of several series, each point marked, e.g. quality
/// against compute.
pub fn plot_xy(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[XySeries]) -> Result<(), PlotError> {
    let xs = y_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let ys = y_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    // Headroom above the points for the legend.
    let ys = ys.start..ys.end + 0.1 * (2 + series.len()) as f64 * (ys.end - ys.start) / 3.0;
    render(path, |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(xs, ys)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
            let colour = RGBColor(r, g, b);
            if s.line {
                chart.draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)))?;
            }
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, colour.filled())))?
                .label(s.name.clone())
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, colour.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::{ClassSeries, ComputeRow, StepAxis};
    use crate::data::test_dir;

    fn row(step: Option<usize>, class: Option<ClassKey>, activated: f64) -> ComputeRow {
        ComputeRow {
            step,
            t: step.map(|s| s as f64 / 4.0),
            class,
            evaluations: 4,
            expert_token_evaluations: 64.0,
            experts_per_token: vec![1.0],
            activated_parameters_per_token: activated,
        }
    }

    #[test]
    fn plots_are_written_as_png() {
        let per_step: Vec<ComputeRow> = (0..5).map(|i| row(Some(i), None, 2e6 + 1e5 * i as f64)).collect();
        let classes = [ClassKey::Class(0), ClassKey::Class(7), ClassKey::Unconditional];
        let report = ComputeReport {
            step_axis: StepAxis::Times { descending: false },
            tokens_per_image: 16,
            moe_blocks: vec![1],
            total_parameters: 9_000_000,
            activated_parameters_at_training_capacity: 2.1e6,
            network_calls: 10,
            evaluations: 40,
            expert_token_evaluations: 640.0,
            experts_per_token: vec![1.0],
            activated_parameters_per_token: 2.2e6,
            per_step,
            per_class: classes.iter().enumerate().map(|(i, c)| row(None, Some(*c), 2e6 + 3e4 * i as f64)).collect(),
            per_class_per_step: classes
                .iter()
                .map(|&class| ClassSeries { class, activated_parameters_per_token: vec![Some(2e6), None, Some(2.3e6)] })
                .collect(),
        };
        let dir = test_dir("plots");
        plot_per_step(&report, "activated parameters per step", &dir.join("steps.png")).unwrap();
        plot_per_class(&report, "activated parameters per class", &dir.join("classes.png")).unwrap();
        let curve = XySeries { name: "a".into(), points: vec![(1.0, 3.0), (2.0, 2.5), (3.0, 2.4)], line: true };
        let dot = XySeries { name: "b".into(), points: vec![(2.0, 2.9)], line: false };
        plot_xy(&dir.join("xy.png"), "quality against compute", "x", "y", &[curve, dot]).unwrap();
        for name in ["steps.png", "classes.png", "xy.png"] {
            let png = image::open(dir.join(name)).unwrap().to_rgb8();
            assert_eq!((png.width(), png.height()), (WIDTH, HEIGHT));
            // Something other than the white background was drawn.
            let dark = png.pixels().filter(|p| p.0.iter().all(|&c| c < 100)).count();
            assert!(dark > 1000, "{name}: {dark} dark pixels");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `shampoo-train plot`: loss and test-accuracy curves of several runs in one
//! PNG, and a text comparison of the runs.
//!
//! Text is drawn with DejaVu Sans (Debian package `fonts-dejavu-core`,
//! installed by scripts/setup.sh) through plotters' `ab_glyph` backend, so no
//! fontconfig is needed.

use crate::error::{Error, Result};
use crate::metrics::{Record, read_records};
use crate::train::{Summary, read_summary};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// Where the font is read from (override with `SHAMPOO_PLOT_FONT`).
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One run as the plot and the comparison see it.
#[derive(Debug, Clone)]
pub struct Run {
    /// The run folder.
    pub dir: PathBuf,
    /// Legend label: optimizer and folder name.
    pub label: String,
    /// `summary.json`, or what the metrics say of a run that did not
    /// finish (crashed, interrupted or diverged).
    pub summary: Summary,
    /// `metrics.jsonl`.
    pub records: Vec<Record>,
    /// Total steps the run was planned for (`run.json`).
    pub total_steps: u64,
    /// What is missing from the folder, for the user.
    pub notes: Vec<String>,
}

impl Run {
    /// Reads a run folder: `metrics.jsonl` and `run.json`, and
    /// `summary.json` when the run finished.
    pub fn read(dir: &Path) -> Result<Run> {
        let records = read_records(&dir.join("metrics.jsonl"))?;
        let run_json = dir.join("run.json");
        let text = std::fs::read_to_string(&run_json).map_err(crate::error::io_err(format!(
            "reading {}",
            run_json.display()
        )))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            context: run_json.display().to_string(),
            source,
        })?;
        let mut notes = Vec::new();
        let summary = if dir.join("summary.json").exists() {
            let s = read_summary(dir)?;
            if s.test_loss.is_nan() || s.test_acc.is_nan() {
                notes.push(format!(
                    "{}: summary.json has no test loss (not finite when it was written)",
                    dir.display()
                ));
            }
            s
        } else {
            let last_step = records
                .iter()
                .filter(|r| r.kind == "step")
                .map(|r| r.step)
                .max()
                .unwrap_or(0);
            notes.push(format!(
                "{}: no summary.json (the run did not finish): its curves end at step {last_step}, the last step in metrics.jsonl",
                dir.display()
            ));
            let last_eval = records.iter().rfind(|r| r.kind == "eval");
            Summary {
                optimizer: v["config"]["optimizer"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_string(),
                model: v["model"].as_str().unwrap_or("unknown").to_string(),
                world_size: v["world_size"].as_u64().unwrap_or(1) as usize,
                steps: last_step,
                test_acc: last_eval.and_then(|r| r.test_acc).unwrap_or(f64::NAN),
                test_loss: last_eval.and_then(|r| r.test_loss).unwrap_or(f64::NAN),
                train_s: last_eval.and_then(|r| r.train_s).unwrap_or(f64::NAN),
                corrupt_images: 0,
                skipped_steps: Vec::new(),
                root_inverse: Default::default(),
                root_inverse_blocks: Vec::new(),
            }
        };
        let total_steps = v["total_steps"].as_u64().unwrap_or(summary.steps);
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Run {
            dir: dir.to_path_buf(),
            label: format!("{} ({name})", summary.optimizer),
            summary,
            records,
            total_steps,
            notes,
        })
    }

    /// (step, test accuracy) of every evaluation.
    pub fn evals(&self) -> Vec<(u64, f64)> {
        self.records
            .iter()
            .filter(|r| r.kind == "eval")
            .filter_map(|r| Some((r.step, r.test_acc?)))
            .collect()
    }

    /// First evaluated step whose test accuracy is at least `acc`.
    pub fn first_step_reaching(&self, acc: f64) -> Option<u64> {
        self.evals()
            .into_iter()
            .find(|&(_, a)| a >= acc)
            .map(|(s, _)| s)
    }
}

/// A comparison of the runs against the first AdamW run (else the first run):
/// final accuracies, the step at which each other run passes the baseline's
/// final accuracy, and training-time ratios.
pub fn compare(runs: &[Run]) -> String {
    let mut out = String::new();
    for note in runs.iter().flat_map(|r| &r.notes) {
        out.push_str(note);
        out.push('\n');
    }
    out.push_str(&format!(
        "{:<36} {:>9} {:>8} {:>11}\n",
        "run", "test acc", "steps", "training s"
    ));
    for r in runs {
        out.push_str(&format!(
            "{:<36} {:>8.2}% {:>8} {:>11.1}\n",
            r.label,
            100.0 * r.summary.test_acc,
            r.summary.steps,
            r.summary.train_s
        ));
    }
    let Some(base) = runs
        .iter()
        .find(|r| r.summary.optimizer == "adamw")
        .or(runs.first())
    else {
        return out;
    };
    for r in runs.iter().filter(|r| !std::ptr::eq(*r, base)) {
        let target = base.summary.test_acc;
        match r.first_step_reaching(target) {
            Some(s) => out.push_str(&format!(
                "{} passes {}'s final accuracy ({:.2}%) at step {s} of {} ({:.0}% of the steps)\n",
                r.label,
                base.label,
                100.0 * target,
                r.total_steps,
                100.0 * s as f64 / r.total_steps as f64
            )),
            None => out.push_str(&format!(
                "{} never reaches {}'s final accuracy ({:.2}%) at its evaluations\n",
                r.label,
                base.label,
                100.0 * target
            )),
        }
        out.push_str(&format!(
            "training time {} / {}: {:.2}x\n",
            r.label,
            base.label,
            r.summary.train_s / base.summary.train_s
        ));
    }
    out
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        let path = std::env::var("SHAMPOO_PLOT_FONT").unwrap_or_else(|_| DEFAULT_FONT.into());
        result = match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| Error::Plot(format!("{path} is not a TrueType font")))
            }
            Err(e) => Err(Error::Plot(format!(
                "cannot read the font {path} ({e}); install it with `sudo apt-get install fonts-dejavu-core` (scripts/setup.sh) or set SHAMPOO_PLOT_FONT"
            ))),
        };
    });
    result
}

fn plot_err<E: std::fmt::Display>(e: E) -> Error {
    Error::Plot(e.to_string())
}

/// A step-axis tick label: an integer (`100`, not `100.0`).
pub fn step_tick(x: &f64) -> String {
    format!("{x:.0}")
}

/// Moving average of the per-step training loss over `window` steps.
fn smoothed_loss(records: &[Record], window: usize) -> Vec<(f64, f64)> {
    let steps: Vec<(u64, f64)> = records
        .iter()
        .filter(|r| r.kind == "step")
        .filter_map(|r| Some((r.step, r.loss?)))
        .collect();
    let mut out = Vec::with_capacity(steps.len());
    let mut sum = 0.0;
    for i in 0..steps.len() {
        sum += steps[i].1;
        if i >= window {
            sum -= steps[i - window].1;
        }
        let n = (i + 1).min(window) as f64;
        out.push((steps[i].0 as f64, sum / n));
    }
    out
}

/// Draws the training loss (moving average over 20 steps) and the test
/// accuracy of `runs` against the step into the PNG `out`.
pub fn plot(runs: &[Run], out: &Path) -> Result<()> {
    if runs.is_empty() {
        return Err(Error::Invalid("plot needs at least one run folder".into()));
    }
    register_font()?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(crate::error::io_err(format!(
            "creating {}",
            parent.display()
        )))?;
    }
    let root = BitMapBackend::new(out, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (left, right) = root.split_horizontally(700);
    let losses: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| smoothed_loss(&r.records, 20)).collect();
    let accs: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            r.evals()
                .into_iter()
                .map(|(s, a)| (s as f64, 100.0 * a))
                .collect()
        })
        .collect();
    let xmax = runs.iter().map(|r| r.total_steps.max(1)).max().unwrap_or(1) as f64;
    let finite = |v: &Vec<Vec<(f64, f64)>>| -> Vec<f64> {
        v.iter()
            .flatten()
            .map(|p| p.1)
            .filter(|y| y.is_finite())
            .collect()
    };
    let lv = finite(&losses);
    let lmax = lv.iter().cloned().fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let av = finite(&accs);
    let amin = av.iter().cloned().fold(100.0f64, f64::min);
    let amax = av.iter().cloned().fold(0.0f64, f64::max);
    let (alo, ahi) = if av.is_empty() {
        (0.0, 100.0)
    } else {
        ((amin - 1.0).max(0.0), (amax + 1.0).min(100.0))
    };

    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];
    for (area, title, ylabel, series, yr) in [
        (
            &left,
            "training loss (moving average, 20 steps)",
            "loss",
            &losses,
            (0.0, lmax),
        ),
        (&right, "test accuracy", "accuracy (%)", &accs, (alo, ahi)),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, yr.0..yr.1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&step_tick)
            .y_desc(ylabel)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        for (i, (run, pts)) in runs.iter().zip(series.iter()).enumerate() {
            let color = colors[i % colors.len()];
            let style = ShapeStyle::from(&color).stroke_width(2);
            chart
                .draw_series(LineSeries::new(pts.iter().cloned(), style))
                .map_err(plot_err)?
                .label(run.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(if ylabel == "loss" {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::LowerRight
            })
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

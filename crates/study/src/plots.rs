//! PNG plots drawn with plotters and the embedded DejaVu Sans font (`assets/DejaVuSans.ttf`,
//! Bitstream Vera / DejaVu license in `assets/DejaVuSans-LICENSE.txt`): no system font is read.
//!
//! - `quality_held_in.png`, `quality_held_out.png`: score vs number of models, one line per
//!   method, each point the setting selected on held-in at that count ([`crate::select`]);
//! - `cost_time.png`: mean merge wall time vs number of models, per method;
//! - `cost_flops.png`: mean estimated FLOPs vs number of models, per method;
//! - `held_in_vs_held_out.png`: every successful merge, coloured by method.

use crate::runner::RunRecord;
use crate::select::{self, mean};
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::Once;

/// Width and height of every plot, in pixels.
pub const SIZE: (u32, u32) = (900, 600);

/// The embedded font.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// The family name the embedded font is registered under.
const FAMILY: &str = "sans-serif";

static REGISTER: Once = Once::new();

fn register() {
    REGISTER.call_once(|| {
        // The font is a fixed, valid TTF compiled into the binary.
        if register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            eprintln!("warning: the embedded font could not be registered");
        }
    });
}

const COLOURS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// A padded axis range around `values` (a unit-wide one around a single value).
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        lo.abs().max(1.0) * 0.5
    };
    (lo - pad, hi + pad)
}

/// One line per method: `(method, points)`.
type Lines = Vec<(String, Vec<(f64, f64)>)>;

fn line_plot(path: &Path, title: &str, y_desc: &str, lines: &Lines) -> Result<()> {
    register();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (x0, x1) = range(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let (y0, y1) = range(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("models merged")
        .x_label_formatter(&|x| {
            // Only whole model counts get a label.
            if (x - x.round()).abs() < 1e-9 {
                format!("{}", x.round())
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, c.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn scatter(path: &Path, records: &[RunRecord]) -> Result<()> {
    register();
    let ok: Vec<&RunRecord> = records.iter().filter(|r| r.ok()).collect();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (x0, x1) = range(ok.iter().filter_map(|r| r.held_in));
    let (y0, y1) = range(ok.iter().filter_map(|r| r.held_out));
    let mut chart = ChartBuilder::on(&root)
        .caption("held-in vs held-out (every merge)", (FAMILY, 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("held-in score")
        .y_desc("held-out score")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, m) in select::methods(records).iter().enumerate() {
        let c = colour(i);
        let pts: Vec<(f64, f64)> = ok
            .iter()
            .filter(|r| &r.method == m)
            .filter_map(|r| Some((r.held_in?, r.held_out?)))
            .collect();
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 5, c.filled())))
            .map_err(|e| anyhow!("{e}"))?
            .label(m.as_str())
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Per method, the mean of `f` over successful runs at each count.
fn cost_lines(records: &[RunRecord], f: impl Fn(&RunRecord) -> f64) -> Lines {
    select::methods(records)
        .into_iter()
        .map(|m| {
            let pts = select::counts(records)
                .into_iter()
                .filter_map(|c| {
                    let v = mean(
                        records
                            .iter()
                            .filter(|r| r.ok() && r.method == m && r.count == c)
                            .map(|r| Some(f(r))),
                    )?;
                    Some((c as f64, v))
                })
                .collect();
            (m, pts)
        })
        .collect()
}

/// Per method, the selected setting's score at each count.
fn quality_lines(records: &[RunRecord], held_out: bool) -> Lines {
    let per = select::best_per_count(records);
    select::methods(records)
        .into_iter()
        .map(|m| {
            let pts = per
                .iter()
                .filter(|s| s.method == m)
                .filter_map(|s| {
                    let v = if held_out { s.held_out } else { s.held_in }?;
                    Some((s.count? as f64, v))
                })
                .collect();
            (m, pts)
        })
        .collect()
}

/// Draws every plot into `dir`; returns the files written (file names relative to `dir`).
pub fn draw_all(records: &[RunRecord], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let line_plots = [
        (
            "quality_held_in.png",
            "held-in score vs models merged (selected on held-in)",
            "held-in score",
            quality_lines(records, false),
        ),
        (
            "quality_held_out.png",
            "held-out score vs models merged (selected on held-in)",
            "held-out score",
            quality_lines(records, true),
        ),
        (
            "cost_time.png",
            "merge wall time vs models merged",
            "merge wall time (s)",
            cost_lines(records, |r| r.cost.merge_secs),
        ),
        (
            "cost_flops.png",
            "estimated merge FLOPs vs models merged",
            "FLOPs",
            cost_lines(records, |r| r.cost.flops),
        ),
    ];
    let mut out = Vec::new();
    for (name, title, y_label, lines) in &line_plots {
        line_plot(&dir.join(name), title, y_label, lines)
            .with_context(|| format!("drawing {name}"))?;
        out.push(PathBuf::from(name));
    }
    let name = "held_in_vs_held_out.png";
    scatter(&dir.join(name), records).with_context(|| format!("drawing {name}"))?;
    out.push(PathBuf::from(name));
    Ok(out)
}

/// Width, height and number of distinct RGBA colours of a PNG file (decoded with `png`).
pub fn png_summary(path: &Path) -> Result<(u32, u32, usize)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().context("reading the PNG header")?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).context("decoding the PNG")?;
    let bpp = info.color_type.samples();
    let mut colours = std::collections::HashSet::new();
    for px in buf[..info.buffer_size()].chunks(bpp) {
        colours.insert(px.to_vec());
        if colours.len() > 4096 {
            break;
        }
    }
    Ok((info.width, info.height, colours.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Cost;

    fn rec(method: &str, count: usize, hin: f64, hout: f64) -> RunRecord {
        RunRecord {
            key: format!("{method}{count}{hin}"),
            method: method.into(),
            hyperparameters: String::new(),
            count,
            subset: 0,
            models: vec![],
            status: "ok".into(),
            error: None,
            held_in: Some(hin),
            held_out: Some(hout),
            tasks: vec![],
            cost: Cost {
                merge_secs: count as f64,
                flops: 1e6 * count as f64,
                ..Cost::default()
            },
        }
    }

    #[test]
    fn plots_are_non_blank_pngs_of_the_expected_size() {
        let t = tempfile::tempdir().unwrap();
        let rs = vec![
            rec("linear", 2, 0.5, 0.4),
            rec("linear", 3, 0.45, 0.5),
            rec("ties", 2, 0.6, 0.3),
            rec("ties", 3, 0.55, 0.35),
        ];
        let files = draw_all(&rs, t.path()).unwrap();
        assert_eq!(files.len(), 5);
        for f in files {
            let p = t.path().join(&f);
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f:?}");
            let (w, h, colours) = png_summary(&p).unwrap();
            assert_eq!((w, h), SIZE, "{f:?}");
            // White background, black axes and text, and the series colours (anti-aliased).
            assert!(colours > 10, "{f:?}: {colours} colours");
        }
        // A single point and no held-in score at all still draw.
        let mut one = rec("linear", 2, 0.5, 0.5);
        one.held_in = None;
        draw_all(&[one], t.path()).unwrap();
    }
}

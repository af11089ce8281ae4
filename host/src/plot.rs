//! PNG charts in pure Rust (plotters' bitmap backend; text drawn with a font compiled
//! into the binary, so no system font is needed): grouped bar charts, and x–y plots
//! with points, lines and least-squares fitted lines.
//!
//! Every function returns the encoded PNG bytes; write them with
//! [`crate::fsutil::write_atomic`].

use std::sync::Once;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// A chart could not be drawn or encoded.
#[derive(Debug, thiserror::Error)]
#[error("plot: {0}")]
pub struct PlotError(pub String);

fn err(e: impl std::fmt::Display) -> PlotError {
    PlotError(e.to_string())
}

const FONT: &str = "sans-serif";

fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped by the crate; failure would be a
        // packaging bug and shows up as missing text, so it is ignored here.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        );
    });
}

/// Colour-blind-safe palette (Okabe & Ito), then darker variants.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
    RGBColor(120, 120, 120),
    RGBColor(140, 60, 30),
];

/// The palette colour for series `i` (cycles).
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A grouped bar chart: one group per category, one bar per series in each group.
#[derive(Clone, Debug)]
pub struct BarChart {
    /// Title above the chart.
    pub title: String,
    /// Optional second line under the title (e.g. the settings used).
    pub subtitle: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Group names along the x axis.
    pub categories: Vec<String>,
    /// (legend name, one value per category).
    pub series: Vec<(String, Vec<f64>)>,
    /// y range; `None` is 0 to 1.05 × the largest value.
    pub y_range: Option<(f64, f64)>,
}

/// How an x–y series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XyStyle {
    /// Markers only.
    Points,
    /// A polyline through the points in the given order.
    Line,
    /// Markers and the least-squares line through them (with its equation in the legend).
    PointsWithFit,
}

/// One series of an x–y plot.
#[derive(Clone, Debug)]
pub struct XySeries {
    /// Legend name.
    pub name: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
    /// How it is drawn.
    pub style: XyStyle,
}

/// An x–y plot.
#[derive(Clone, Debug)]
pub struct XyPlot {
    /// Title above the chart.
    pub title: String,
    /// Optional second line under the title.
    pub subtitle: String,
    /// x axis label.
    pub x_label: String,
    /// y axis label.
    pub y_label: String,
    /// The series.
    pub series: Vec<XySeries>,
}

/// A least-squares line `y = slope·x + intercept` and its coefficient of determination.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearFit {
    /// Slope.
    pub slope: f64,
    /// Intercept.
    pub intercept: f64,
    /// R² (1 when the points are exactly on the line; 1 also when all y are equal).
    pub r2: f64,
}

/// Ordinary least squares through `points`; `None` with fewer than two distinct x.
pub fn linear_fit(points: &[(f64, f64)]) -> Option<LinearFit> {
    crate::calib::fit::fit_line(points).ok().map(|f| LinearFit {
        slope: f.slope,
        intercept: f.intercept,
        r2: f.r2,
    })
}

fn encode_png(buf: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>, PlotError> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(buf, w, h, ExtendedColorType::Rgb8)
        .map_err(err)?;
    Ok(out)
}

fn check_size((w, h): (u32, u32)) -> Result<(), PlotError> {
    if !(320..=8000).contains(&w) || !(240..=8000).contains(&h) {
        return Err(PlotError(format!(
            "image size {w}x{h} out of range (320x240 to 8000x8000)"
        )));
    }
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draws the title block and returns the area left below it.
fn title_block<'a>(root: &Area<'a>, title: &str, subtitle: &str) -> Result<Area<'a>, PlotError> {
    let (w, _) = root.dim_in_pixel();
    let head = if subtitle.is_empty() { 44 } else { 70 };
    let (top, rest) = root.split_vertically(head);
    let centre = Pos::new(HPos::Center, VPos::Top);
    top.draw(&Text::new(
        title.to_string(),
        (w as i32 / 2, 10),
        TextStyle::from((FONT, 24).into_font()).pos(centre),
    ))
    .map_err(err)?;
    if !subtitle.is_empty() {
        top.draw(&Text::new(
            subtitle.to_string(),
            (w as i32 / 2, 44),
            TextStyle::from((FONT, 13).into_font())
                .color(&RGBColor(70, 70, 70))
                .pos(centre),
        ))
        .map_err(err)?;
    }
    Ok(rest)
}

/// How a legend entry's swatch is drawn.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Swatch {
    Bar,
    Marker,
    Line,
}

/// Draws a legend (colour swatch + name per entry) into `area`, top-left aligned.
fn legend(area: &Area<'_>, entries: &[(String, RGBColor, Swatch)]) -> Result<(), PlotError> {
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (name, c, swatch)) in entries.iter().enumerate() {
        let y = 20 + 26 * i as i32;
        match swatch {
            Swatch::Marker => area.draw(&Circle::new((18, y), 6, c.filled())),
            Swatch::Bar => area.draw(&Rectangle::new([(10, y - 8), (26, y + 8)], c.filled())),
            Swatch::Line => area.draw(&PathElement::new(vec![(8, y), (28, y)], c.stroke_width(3))),
        }
        .map_err(err)?;
        area.draw(&Text::new(name.clone(), (34, y), style.clone()))
            .map_err(err)?;
    }
    Ok(())
}

fn legend_width(names: &[String]) -> u32 {
    let longest = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32;
    (longest * 9 + 50).clamp(120, 560)
}

/// Renders a grouped bar chart as a PNG of `size` pixels.
pub fn bar_chart_png(chart: &BarChart, size: (u32, u32)) -> Result<Vec<u8>, PlotError> {
    check_size(size)?;
    if chart.categories.is_empty() || chart.series.is_empty() {
        return Err(PlotError("bar chart with no data".to_string()));
    }
    if let Some((name, v)) = chart
        .series
        .iter()
        .find(|(_, v)| v.len() != chart.categories.len())
    {
        return Err(PlotError(format!(
            "series `{name}` has {} values for {} categories",
            v.len(),
            chart.categories.len()
        )));
    }
    register_fonts();
    let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let body = title_block(&root, &chart.title, &chart.subtitle)?;
        let names: Vec<String> = chart.series.iter().map(|s| s.0.clone()).collect();
        let (bw, _) = body.dim_in_pixel();
        let (plot_area, legend_area) = body.split_horizontally(bw - legend_width(&names));
        let max = chart
            .series
            .iter()
            .flat_map(|s| s.1.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let (y0, y1) = chart
            .y_range
            .unwrap_or((0.0, if max > 0.0 { max * 1.05 } else { 1.0 }));
        let n = chart.categories.len();
        let mut ctx = ChartBuilder::on(&plot_area)
            .margin_left(10)
            .margin_right(10)
            .margin_top(10)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, y0..y1)
            .map_err(err)?;
        ctx.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(chart.y_label.as_str())
            .y_label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .light_line_style(WHITE)
            .draw()
            .map_err(err)?;
        let k = chart.series.len() as f64;
        let group = 0.8;
        for (si, (_, values)) in chart.series.iter().enumerate() {
            let c = color(si);
            ctx.draw_series(values.iter().enumerate().map(|(ci, &v)| {
                let x0 = ci as f64 + (1.0 - group) / 2.0 + group * si as f64 / k;
                let v = if v.is_finite() { v.clamp(y0, y1) } else { y0 };
                Rectangle::new([(x0, y0), (x0 + group / k, v)], c.filled())
            }))
            .map_err(err)?;
        }
        let label_style =
            TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (ci, name) in chart.categories.iter().enumerate() {
            let (px, py) = ctx.backend_coord(&(ci as f64 + 0.5, y0));
            root.draw(&Text::new(name.clone(), (px, py + 8), label_style.clone()))
                .map_err(err)?;
        }
        let entries: Vec<(String, RGBColor, Swatch)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), color(i), Swatch::Bar))
            .collect();
        legend(&legend_area.margin(20, 0, 0, 0), &entries)?;
        root.present().map_err(err)?;
    }
    encode_png(&buf, size)
}

fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
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
        lo.abs().max(1.0) * 0.1
    };
    (lo - pad, hi + pad)
}

/// Renders an x–y plot as a PNG of `size` pixels. Series drawn with
/// [`XyStyle::PointsWithFit`] get their fitted line and its equation in the legend.
pub fn xy_plot_png(plot: &XyPlot, size: (u32, u32)) -> Result<Vec<u8>, PlotError> {
    check_size(size)?;
    if plot.series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError("x-y plot with no points".to_string()));
    }
    register_fonts();
    let mut entries: Vec<(String, RGBColor, Swatch)> = Vec::new();
    let fits: Vec<Option<LinearFit>> = plot
        .series
        .iter()
        .map(|s| match s.style {
            XyStyle::PointsWithFit => linear_fit(&s.points),
            _ => None,
        })
        .collect();
    for (i, s) in plot.series.iter().enumerate() {
        let name = match fits[i] {
            Some(f) => format!(
                "{}: y = {:.3}x {} {:.3}, R² = {:.2}",
                s.name,
                f.slope,
                if f.intercept < 0.0 { '-' } else { '+' },
                f.intercept.abs(),
                f.r2
            ),
            None => s.name.clone(),
        };
        let swatch = if s.style == XyStyle::Line {
            Swatch::Line
        } else {
            Swatch::Marker
        };
        entries.push((name, color(i), swatch));
    }
    let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let body = title_block(&root, &plot.title, &plot.subtitle)?;
        let names: Vec<String> = entries.iter().map(|e| e.0.clone()).collect();
        let (bw, _) = body.dim_in_pixel();
        let (plot_area, legend_area) = body.split_horizontally(bw - legend_width(&names));
        let all = || plot.series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = padded_range(all().map(|p| p.0));
        let (y0, y1) = padded_range(all().map(|p| p.1));
        let mut ctx = ChartBuilder::on(&plot_area)
            .margin(10)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        ctx.configure_mesh()
            .x_desc(plot.x_label.as_str())
            .y_desc(plot.y_label.as_str())
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .light_line_style(WHITE)
            .draw()
            .map_err(err)?;
        for (i, s) in plot.series.iter().enumerate() {
            let c = color(i);
            let pts = s
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite());
            match s.style {
                XyStyle::Line => {
                    ctx.draw_series(LineSeries::new(pts, c.stroke_width(2)))
                        .map_err(err)?;
                }
                XyStyle::Points | XyStyle::PointsWithFit => {
                    ctx.draw_series(pts.map(|p| Circle::new(p, 5, c.filled())))
                        .map_err(err)?;
                }
            }
            if let Some(f) = fits[i] {
                let line = [
                    (x0, f.slope * x0 + f.intercept),
                    (x1, f.slope * x1 + f.intercept),
                ];
                ctx.draw_series(LineSeries::new(line, c.stroke_width(2)))
                    .map_err(err)?;
            }
        }
        legend(&legend_area.margin(20, 0, 0, 0), &entries)?;
        root.present().map_err(err)?;
    }
    encode_png(&buf, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_line() {
        let pts: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 2.0 * i as f64 - 1.0)).collect();
        let f = linear_fit(&pts).unwrap();
        assert!((f.slope - 2.0).abs() < 1e-12 && (f.intercept + 1.0).abs() < 1e-12);
        assert!((f.r2 - 1.0).abs() < 1e-12);
        assert!(linear_fit(&[(1.0, 2.0), (1.0, 3.0)]).is_none());
        let noisy = [(0.0, 0.0), (1.0, 2.0), (2.0, 1.0), (3.0, 3.0)];
        let f = linear_fit(&noisy).unwrap();
        assert!(f.r2 > 0.0 && f.r2 < 1.0);
    }

    fn decode(png: &[u8]) -> image::RgbImage {
        image::load_from_memory(png).unwrap().to_rgb8()
    }

    #[test]
    fn bar_chart_draws_bars_in_series_colours() {
        let chart = BarChart {
            title: "t".into(),
            subtitle: "s".into(),
            y_label: "value".into(),
            categories: vec!["a".into(), "b".into()],
            series: vec![("x".into(), vec![1.0, 0.5]), ("y".into(), vec![0.2, 0.9])],
            y_range: Some((0.0, 1.0)),
        };
        let img = decode(&bar_chart_png(&chart, (640, 400)).unwrap());
        assert_eq!(img.dimensions(), (640, 400));
        let count = |c: RGBColor| img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        assert!(count(color(0)) > 1000 && count(color(1)) > 1000);
        // Text was drawn: some dark pixels besides the axes.
        assert!(img.pixels().filter(|p| p.0[0] < 60 && p.0[1] < 60).count() > 500);
        let bad = BarChart {
            series: vec![("x".into(), vec![1.0])],
            ..chart
        };
        assert!(bar_chart_png(&bad, (640, 400)).is_err());
    }

    #[test]
    fn xy_plot_draws_points_and_fits() {
        let plot = XyPlot {
            title: "fit".into(),
            subtitle: String::new(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![
                XySeries {
                    name: "data".into(),
                    points: vec![(0.0, 1.0), (1.0, 3.1), (2.0, 4.9)],
                    style: XyStyle::PointsWithFit,
                },
                XySeries {
                    name: "curve".into(),
                    points: vec![(0.0, 0.0), (2.0, 2.0)],
                    style: XyStyle::Line,
                },
            ],
        };
        let img = decode(&xy_plot_png(&plot, (640, 400)).unwrap());
        let c = color(0);
        assert!(img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count() > 100);
        assert!(xy_plot_png(&plot, (10, 10)).is_err());
    }
}

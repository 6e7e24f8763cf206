//! PNG charts beside the markdown tables, drawn from the same summaries. Horizontal bars, one
//! row per path; the runs' min–max as whiskers where there are several runs. The text is drawn
//! with DejaVu Sans embedded in the binary (`assets/`), so no system font is needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentedCoord;
use plotters::coord::types::{RangedCoordf64, RangedCoordusize};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Why a chart could not be drawn or written.
pub type ChartError = Box<dyn std::error::Error>;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const WIDTH: u32 = 1200;
const HEADING: u32 = 90;
const ROW: u32 = 40;
/// Caption above a panel and value axis below it.
const PANEL_FRAME: u32 = 110;
const MIGPROXY: RGBColor = RGBColor(31, 119, 180);
const OTHER: RGBColor = RGBColor(160, 160, 160);
const TARGET: RGBColor = RGBColor(214, 39, 40);

/// One bar: a path (or stream count, or percentile) and its value.
#[derive(Debug)]
pub struct Bar {
    label: String,
    /// The value, or why there is none.
    value: Result<f64, &'static str>,
    /// Min and max over the runs.
    spread: Option<(f64, f64)>,
    /// Drawn in migproxy's colour, apart from the other projects' paths.
    migproxy: bool,
}

impl Bar {
    /// A bar in migproxy's colour when its label names migproxy.
    pub fn new(label: impl Into<String>, value: f64) -> Self {
        let label = label.into();
        Self {
            migproxy: label.contains("migproxy"),
            label,
            value: Ok(value),
            spread: None,
        }
    }

    /// A bar of a benchmark of migproxy alone.
    pub fn of_migproxy(label: impl Into<String>, value: f64) -> Self {
        Self {
            migproxy: true,
            ..Self::new(label, value)
        }
    }

    pub fn failed(label: &str, why: &'static str) -> Self {
        Self {
            label: label.to_owned(),
            value: Err(why),
            spread: None,
            migproxy: false,
        }
    }

    pub fn spread(mut self, min: f64, max: f64) -> Self {
        self.spread = Some((min, max));
        self
    }

    /// Where the bar and its whisker end.
    fn end(&self) -> f64 {
        let value = self.value.unwrap_or(0.0);
        self.spread.map_or(value, |(_, max)| max.max(value))
    }

    /// The value as text, or why there is none.
    fn text(&self, decimals: usize) -> String {
        match self.value {
            Ok(value) => format!("{value:.decimals$}"),
            Err(why) => why.to_owned(),
        }
    }

    fn colour(&self) -> RGBColor {
        if self.migproxy { MIGPROXY } else { OTHER }
    }
}

/// Bars that share a value axis.
#[derive(Debug)]
pub struct Panel {
    caption: String,
    axis: &'static str,
    decimals: usize,
    pub bars: Vec<Bar>,
    /// A target drawn as a vertical line: its value and what it says.
    pub target: Option<(f64, &'static str)>,
}

impl Panel {
    pub fn new(caption: impl Into<String>, axis: &'static str, decimals: usize) -> Self {
        Self {
            caption: caption.into(),
            axis,
            decimals,
            bars: Vec::new(),
            target: None,
        }
    }

    fn height(&self) -> u32 {
        PANEL_FRAME + ROW * self.bars.len().max(1) as u32
    }

    /// The value axis: past every bar, whisker, value text and target.
    fn top(&self) -> f64 {
        let end = self.bars.iter().map(Bar::end).fold(0.0, f64::max);
        let top = self.target.map_or(end, |(t, _)| end.max(t)) * 1.15;
        if top > 0.0 { top } else { 1.0 }
    }
}

/// The title and machine line on top, then the panels one below the other.
pub fn draw(path: &Path, title: &str, machine: &str, panels: &[Panel]) -> Result<(), ChartError> {
    register_font()?;
    let height = HEADING + panels.iter().map(Panel::height).sum::<u32>();
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (heading, mut rest) = root.split_vertically(HEADING);
    draw_heading(&heading, title, machine)?;
    for panel in panels {
        let (area, below) = rest.split_vertically(panel.height());
        draw_panel(&area, panel)?;
        rest = below;
    }
    root.present()?;
    Ok(())
}

fn register_font() -> Result<(), ChartError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if *registered {
        Ok(())
    } else {
        Err("the embedded chart font could not be read".into())
    }
}

fn draw_heading(area: &Area<'_>, title: &str, machine: &str) -> Result<(), ChartError> {
    let centre = Pos::new(HPos::Center, VPos::Center);
    let x = WIDTH as i32 / 2;
    area.draw(&Text::new(
        title,
        (x, 32),
        TextStyle::from((FAMILY, 26).into_font().style(FontStyle::Bold)).pos(centre),
    ))?;
    area.draw(&Text::new(
        machine,
        (x, 66),
        (FAMILY, 18).into_font().color(&BLACK.mix(0.7)).pos(centre),
    ))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<RangedCoordf64, SegmentedCoord<RangedCoordusize>>,
>;

fn draw_panel(area: &Area<'_>, panel: &Panel) -> Result<(), ChartError> {
    let mut chart = axes(area, panel)?;
    // Bar 0 at the top: row `rows - 1 - i` holds bar `i`.
    let rows = panel.bars.len();
    let bars: Vec<(usize, &Bar)> = (0..rows).rev().zip(&panel.bars).collect();
    chart.draw_series(bars.iter().filter_map(|(row, bar)| bar_element(*row, bar)))?;
    draw_whiskers(&mut chart, &bars)?;
    // The value past the end of its bar and whisker.
    let style = TextStyle::from((FAMILY, 15)).pos(Pos::new(HPos::Left, VPos::Center));
    chart.draw_series(bars.iter().map(|(row, bar)| {
        EmptyElement::at((bar.end(), SegmentValue::CenterOf(*row)))
            + Text::new(bar.text(panel.decimals), (8, 0), style.clone())
    }))?;
    if let Some((value, what)) = panel.target {
        draw_target(&mut chart, value, what)?;
    }
    Ok(())
}

/// The caption, the value axis below and the bars' names on the left.
fn axes<'a, 'b>(area: &'a Area<'b>, panel: &Panel) -> Result<Chart<'a, 'b>, ChartError> {
    let labels: Vec<&str> = panel.bars.iter().map(|b| b.label.as_str()).collect();
    let label_width = labels
        .iter()
        .map(|l| area.estimate_text_size(l, &TextStyle::from((FAMILY, 16))))
        .try_fold(0, |widest, size| size.map(|(w, _)| widest.max(w)))?;
    // A segmented 0..last holds last + 1 segments: one per bar.
    let last = labels.len().max(1) - 1;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.caption, (FAMILY, 20))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(44)
        .y_label_area_size(label_width + 16)
        .build_cartesian_2d(0.0..panel.top(), (0..last).into_segmented())?;
    let name = |row: &SegmentValue<usize>| match row {
        SegmentValue::CenterOf(k) => last
            .checked_sub(*k)
            .and_then(|i| labels.get(i))
            .map_or_else(String::new, |l| (*l).to_owned()),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .y_labels(last + 1)
        .y_label_formatter(&name)
        .x_desc(panel.axis)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 16))
        .draw()?;
    Ok(chart)
}

fn bar_element(row: usize, bar: &Bar) -> Option<Rectangle<(f64, SegmentValue<usize>)>> {
    let value = bar.value.ok()?;
    let mut rect = Rectangle::new(
        [
            (0.0, SegmentValue::Exact(row)),
            (value, SegmentValue::Exact(row + 1)),
        ],
        bar.colour().filled(),
    );
    rect.set_margin(7, 7, 0, 0);
    Some(rect)
}

/// A line from the runs' min to their max with a mark at each end; none for a single run.
fn draw_whiskers(chart: &mut Chart<'_, '_>, bars: &[(usize, &Bar)]) -> Result<(), ChartError> {
    let style = BLACK.stroke_width(2);
    let spreads: Vec<(usize, f64, f64)> = bars
        .iter()
        .filter_map(|(row, bar)| {
            let (min, max) = bar.spread.filter(|(min, max)| max > min)?;
            Some((*row, min, max))
        })
        .collect();
    let centre = SegmentValue::CenterOf;
    chart.draw_series(spreads.iter().map(|&(row, min, max)| {
        PathElement::new([(min, centre(row)), (max, centre(row))], style)
    }))?;
    let ends = spreads
        .iter()
        .flat_map(|&(row, min, max)| [(min, row), (max, row)]);
    chart.draw_series(ends.map(|(x, row)| {
        EmptyElement::at((x, centre(row))) + PathElement::new([(0, -8), (0, 8)], style)
    }))?;
    Ok(())
}

/// A vertical line at the target, named at its top.
fn draw_target(chart: &mut Chart<'_, '_>, value: f64, what: &str) -> Result<(), ChartError> {
    chart.draw_series(std::iter::once(PathElement::new(
        [(value, SegmentValue::Exact(0)), (value, SegmentValue::Last)],
        TARGET.stroke_width(2),
    )))?;
    let anchor = Pos::new(HPos::Left, VPos::Top);
    let style = TextStyle::from((FAMILY, 15)).color(&TARGET).pos(anchor);
    chart.draw_series(std::iter::once(
        EmptyElement::at((value, SegmentValue::Last)) + Text::new(what.to_owned(), (6, 2), style),
    ))?;
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub const MACHINE: &str = "Intel(R) Xeon(R) Processor, 2 cores, Linux 6.18, QEMU 7.2.22";

    /// A PNG of some size, not a truncated file.
    pub fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{}",
            path.display()
        );
        assert!(
            bytes.len() > 10_000,
            "{}: {} bytes",
            path.display(),
            bytes.len()
        );
    }

    #[test]
    fn panels_with_spreads_failures_and_a_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut rate = Panel::new("Throughput", "GiB/s", 2);
        rate.bars
            .push(Bar::new("direct TCP", 2.75).spread(2.56, 2.82));
        rate.bars
            .push(Bar::new("migproxy relay", 1.57).spread(1.46, 1.58));
        rate.bars.push(Bar::failed("socat", "every run failed"));
        let mut jain = Panel::new("Fairness", "index", 3);
        jain.target = Some((0.95, "target ≥ 0.95"));
        jain.bars.push(Bar::of_migproxy("16 streams", 0.994));
        let path = dir.path().join("chart.png");
        draw(&path, "Chart", MACHINE, &[rate, jain]).unwrap();
        assert_png(&path);
    }

    #[test]
    fn an_unwritable_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("cancel.png");
        let mut panel = Panel::new("Cancel", "milliseconds", 1);
        panel.bars.push(Bar::of_migproxy("p50", 1.0));
        assert!(draw(&path, "Cancel", MACHINE, &[panel]).is_err());
    }
}

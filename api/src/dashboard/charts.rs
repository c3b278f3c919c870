//! The pictures of the instance page, as geometry the template draws as inline SVG (so every label goes
//! through the template's escaping): operation durations as bars, backup sizes over time as a line.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::text;

pub const WIDTH: f64 = 640.0;
pub const HEIGHT: f64 = 160.0;
/// Room for the axis labels on the left and at the bottom.
const LEFT: f64 = 70.0;
const BOTTOM: f64 = 20.0;
const TOP: f64 = 10.0;

#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
    /// `ok` or `failed`: the bar's colour.
    pub class: &'static str,
    /// The tooltip: what, how long, how it ended.
    pub title: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BarChart {
    pub width: f64,
    pub height: f64,
    pub bars: Vec<Bar>,
    /// The longest bar's value, written at the top of the axis.
    pub max_label: String,
    pub left: f64,
    pub baseline: f64,
}

/// One finished run to draw: its label, its duration in seconds and whether it succeeded.
#[derive(Debug, Clone)]
pub struct Run {
    pub label: String,
    pub secs: f64,
    pub succeeded: bool,
}

/// Bars of `runs` (oldest first), scaled to the longest; `None` with nothing to draw.
pub fn durations(runs: &[Run]) -> Option<BarChart> {
    let longest = runs.iter().map(|r| r.secs).fold(0.0_f64, f64::max);
    if runs.is_empty() || longest <= 0.0 {
        return None;
    }
    let plot_width = WIDTH - LEFT - 10.0;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let slot = plot_width / runs.len() as f64;
    let bars = runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let height = (run.secs / longest * plot_height).max(1.0);
            Bar {
                x: round(LEFT + i as f64 * slot + slot * 0.15),
                y: round(TOP + plot_height - height),
                width: round((slot * 0.7).max(1.0)),
                height: round(height),
                class: if run.succeeded { "ok" } else { "failed" },
                title: format!(
                    "{}: {} ({})",
                    run.label,
                    text::duration(run.secs),
                    if run.succeeded { "succeeded" } else { "failed" }
                ),
            }
        })
        .collect();
    Some(BarChart {
        width: WIDTH,
        height: HEIGHT,
        bars,
        max_label: text::duration(longest),
        left: LEFT,
        baseline: TOP + plot_height,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub title: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LineChart {
    pub width: f64,
    pub height: f64,
    /// `x,y x,y …` for the polyline.
    pub points: String,
    pub dots: Vec<Point>,
    pub max_label: String,
    pub first_label: String,
    pub last_label: String,
    pub left: f64,
    pub baseline: f64,
}

/// Sizes over time (`(when, bytes)`, any order) as a line from zero to the largest; `None` with fewer than
/// one point.
pub fn sizes(samples: &[(DateTime<Utc>, i64)]) -> Option<LineChart> {
    let mut samples = samples.to_vec();
    samples.sort_by_key(|(at, _)| *at);
    let (first, last) = (samples.first()?.0, samples.last()?.0);
    let largest = samples.iter().map(|(_, b)| *b).max()?.max(1) as f64;
    let span = (last - first).num_milliseconds().max(1) as f64;
    let plot_width = WIDTH - LEFT - 20.0;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let dots: Vec<Point> = samples
        .iter()
        .map(|(at, size)| {
            let along = if samples.len() == 1 {
                0.5
            } else {
                (*at - first).num_milliseconds() as f64 / span
            };
            Point {
                x: round(LEFT + 10.0 + along * plot_width),
                y: round(TOP + plot_height - *size as f64 / largest * plot_height),
                title: format!("{}: {}", text::timestamp(*at), text::bytes(*size)),
            }
        })
        .collect();
    let points = dots
        .iter()
        .map(|p| format!("{},{}", p.x, p.y))
        .collect::<Vec<_>>()
        .join(" ");
    Some(LineChart {
        width: WIDTH,
        height: HEIGHT,
        points,
        dots,
        max_label: text::bytes(largest as i64),
        first_label: text::timestamp(first),
        last_label: text::timestamp(last),
        left: LEFT,
        baseline: TOP + plot_height,
    })
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn bars_scale_to_the_longest_run() {
        let runs = [
            Run {
                label: "provision".into(),
                secs: 10.0,
                succeeded: true,
            },
            Run {
                label: "bind".into(),
                secs: 5.0,
                succeeded: false,
            },
        ];
        let chart = durations(&runs).unwrap();
        assert_eq!(chart.bars.len(), 2);
        assert!((chart.bars[0].height - 2.0 * chart.bars[1].height).abs() < 0.2);
        assert_eq!(chart.bars[1].class, "failed");
        assert_eq!(chart.max_label, "10.0 s");
        assert!(durations(&[]).is_none());
    }

    #[test]
    fn a_line_runs_through_every_sample_in_time_order() {
        let at = |s| Utc.timestamp_opt(s, 0).unwrap();
        let chart = sizes(&[(at(100), 2048), (at(0), 1024)]).unwrap();
        assert_eq!(chart.dots.len(), 2);
        assert!(chart.dots[0].x < chart.dots[1].x && chart.dots[0].y > chart.dots[1].y);
        assert_eq!(chart.points.split(' ').count(), 2);
        assert!(sizes(&[]).is_none());
    }
}

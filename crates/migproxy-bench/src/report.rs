//! How results are summarised: medians and spreads, and the targets of the benchmark issue
//! as a table.

use std::fmt::Write as _;

/// Median, min and max of a set of runs.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The median (sorting `values` in place); NaN for none.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.is_empty() {
        f64::NAN
    } else if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// The median of some values; NaN for none.
pub fn median_of(values: impl IntoIterator<Item = f64>) -> f64 {
    median(&mut values.into_iter().collect::<Vec<f64>>())
}

/// One target of the benchmark issue: what it asks, what was measured, whether it holds.
#[derive(Debug)]
pub struct Target {
    pub goal: &'static str,
    pub measured: String,
    pub holds: Option<bool>,
}

impl Target {
    /// A ratio that must reach `at_least` (none when a path did not run).
    pub fn ratio(goal: &'static str, ratio: Option<f64>, at_least: f64) -> Target {
        Target {
            goal,
            measured: ratio.map_or("not measured".into(), |r| format!("{r:.2}×")),
            holds: ratio.map(|r| r >= at_least),
        }
    }

    /// A quantity that must stay at or below `at_most`, shown with `unit`.
    pub fn at_most(goal: &'static str, value: Option<f64>, at_most: f64, unit: &str) -> Target {
        Target {
            goal,
            measured: value.map_or("not measured".into(), |v| format!("{v:.3} {unit}")),
            holds: value.map(|v| v <= at_most),
        }
    }

    /// Appends what bounds the target on this machine, measured in the same run:
    /// "(label: 1.23×; …)" for each bound that was measured.
    pub fn bounded_by(mut self, bounds: &[(&str, Option<f64>)]) -> Target {
        let known: Vec<String> = bounds
            .iter()
            .filter_map(|(label, ratio)| ratio.map(|r| format!("{label}: {r:.2}×")))
            .collect();
        if !known.is_empty() {
            self.measured = format!("{} ({})", self.measured, known.join("; "));
        }
        self
    }
}

/// The targets as a markdown table, printed with every result.
pub fn render_targets(targets: &[Target]) -> String {
    let mut out = String::from("\n| target | measured | holds |\n| --- | --- | --- |\n");
    for t in targets {
        let holds = match t.holds {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let _ = writeln!(out, "| {} | {} | {holds} |", t.goal, t.measured);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn a_target_shows_the_bounds_that_were_measured() {
        let target = Target::ratio("relay ≥ 1.5× haproxy's", Some(1.06), 1.5)
            .bounded_by(&[("yardstick", Some(1.04)), ("not run", None)]);
        assert_eq!(target.measured, "1.06× (yardstick: 1.04×)");
        assert_eq!(target.holds, Some(false));
        let unmeasured = Target::ratio("x", None, 1.0).bounded_by(&[("not run", None)]);
        assert_eq!(unmeasured.measured, "not measured");
        assert_eq!(unmeasured.holds, None);
    }
}

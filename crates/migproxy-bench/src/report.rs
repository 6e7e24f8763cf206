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

/// Ratios of two routes' runs paired by repetition (`b`'s over `a`'s, for the repetitions
/// where both ran): runs of the same repetition ran back to back, so a pair shares the
/// machine's state (a busy neighbour, a frequency change) that the medians of all runs mix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    pub median: f64,
    /// The middle half of the ratios: first and third quartiles.
    pub lower: f64,
    pub upper: f64,
    pub pairs: usize,
}

impl Paired {
    /// None without a pair.
    pub fn of(a: &[(usize, f64)], b: &[(usize, f64)]) -> Option<Paired> {
        let mut ratios: Vec<f64> = b
            .iter()
            .filter_map(|(rep, vb)| {
                let (_, va) = a.iter().find(|(r, _)| r == rep)?;
                Some(vb / va)
            })
            .collect();
        if ratios.is_empty() {
            return None;
        }
        let median = median(&mut ratios);
        let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
        Some(Paired {
            median,
            lower: at(0.25),
            upper: at(0.75),
            pairs: ratios.len(),
        })
    }

    /// "paired by repetition: median 0.95×, middle half 0.89–1.04× (25 pairs)".
    pub fn describe(&self) -> String {
        let pairs = match self.pairs {
            1 => "1 pair".to_owned(),
            n => format!("{n} pairs"),
        };
        format!(
            "paired by repetition: median {:.2}×, middle half {:.2}–{:.2}× ({pairs})",
            self.median, self.lower, self.upper
        )
    }
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

    /// Appends the same ratio paired by repetition, when measured: how far single runs
    /// stray from the ratio of the medians.
    pub fn paired(mut self, paired: Option<Paired>) -> Target {
        if let Some(paired) = paired {
            self.measured = format!("{} ({})", self.measured, paired.describe());
        }
        self
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Paired, Target};

    #[test]
    fn pairs_are_matched_by_repetition_and_a_lone_run_is_left_out() {
        // Repetition 2 failed on `a`, repetition 5 ran on `a` only.
        let a = [(0, 1.0), (1, 2.0), (3, 4.0), (4, 1.0), (5, 9.0)];
        let b = [(0, 0.9), (1, 2.2), (2, 7.0), (3, 4.0), (4, 0.5)];
        let paired = Paired::of(&a, &b).unwrap();
        // Ratios 0.9, 1.1, 1.0, 0.5: sorted 0.5, 0.9, 1.0, 1.1.
        assert_eq!(paired.pairs, 4);
        assert!((paired.median - 0.95).abs() < 1e-9, "{paired:?}");
        assert!((paired.lower - 0.9).abs() < 1e-9, "{paired:?}");
        assert!((paired.upper - 1.0).abs() < 1e-9, "{paired:?}");
        assert_eq!(Paired::of(&a, &[(2, 1.0)]), None);
        let one = Paired::of(&a, &[(1, 1.0)]).unwrap();
        assert!(one.describe().ends_with("(1 pair)"), "{}", one.describe());
        let target = Target::ratio("x", Some(0.96), 0.95).paired(Some(paired));
        assert_eq!(
            target.measured,
            "0.96× (paired by repetition: median 0.95×, middle half 0.90–1.00× (4 pairs))"
        );
    }

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

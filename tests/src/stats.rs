//! The figures the benches print: median and min–max over repetitions.
//!
//! The four benches (`agent/benches/{engine,store,tcp}.rs`,
//! `controller/benches/barrier.rs`) each had their own copy of these few lines, and
//! the copies had drifted: two medians are in use and both are kept here, under
//! the names statistics libraries give them, so that every bench prints the same
//! figures as before.
//!
//! - [`Samples::median`] is the usual median: for an even count, the mean of the two
//!   middle values. The engine bench uses it.
//! - [`Samples::median_high`] is the larger of the two middle values for an even
//!   count (the middle one for an odd count, like `median`): always a value that was
//!   measured. The store, TCP and barrier benches use it.
//!
//! Sorting uses [`f64::total_cmp`], and [`Samples::min`] and [`Samples::max`]
//! pass over NaN, as `f64::min`/`f64::max` do. The benches measure times and sizes,
//! which are never NaN; with NaN among the samples only the median could differ from
//! what a hand-written `partial_cmp` sort would give (which panicked instead).
//!
//! The table layout of each bench (column widths, units, verdicts) stays in the
//! bench; what is shared is the arithmetic and the two ways a range is written:
//! [`range`] (`lo - hi`, `lo–hi`, …) and [`median_range`] (`median (lo-hi)`).

/// The samples of one measurement, in the order they were taken (so that two of
/// them taken in the same repetitions can be paired, see [`Samples::ratios`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Samples(Vec<f64>);

impl Samples {
    /// No samples yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    /// The samples, in the order they were taken.
    pub fn values(&self) -> &[f64] {
        &self.0
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The median; for an even count the mean of the two middle values. `None`
    /// without samples.
    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    /// The high median: the value at index `len / 2` once sorted, which for an even
    /// count is the larger of the two middle values. `None` without samples.
    pub fn median_high(&self) -> Option<f64> {
        self.sorted().get(self.0.len() / 2).copied()
    }

    /// The smallest sample that is not NaN.
    pub fn min(&self) -> Option<f64> {
        self.fold_numbers(f64::min)
    }

    /// The largest sample that is not NaN.
    pub fn max(&self) -> Option<f64> {
        self.fold_numbers(f64::max)
    }

    fn fold_numbers(&self, f: fn(f64, f64) -> f64) -> Option<f64> {
        self.0.iter().copied().filter(|v| !v.is_nan()).reduce(f)
    }

    /// The smallest and the largest sample (see [`Samples::min`]).
    pub fn min_max(&self) -> Option<(f64, f64)> {
        Some((self.min()?, self.max()?))
    }

    /// Each sample passed through `f`, in the same order (a time into a throughput,
    /// for example).
    pub fn map(&self, f: impl Fn(f64) -> f64) -> Samples {
        Samples(self.0.iter().map(|&v| f(v)).collect())
    }

    /// `self[i] / other[i]` for each repetition `i`, as long as the shorter of the
    /// two: a ratio taken within one repetition, where both ran close together.
    pub fn ratios(&self, other: &Samples) -> Samples {
        Samples(self.0.iter().zip(&other.0).map(|(a, b)| a / b).collect())
    }
}

impl From<Vec<f64>> for Samples {
    fn from(v: Vec<f64>) -> Self {
        Samples(v)
    }
}

impl FromIterator<f64> for Samples {
    fn from_iter<I: IntoIterator<Item = f64>>(iter: I) -> Self {
        Samples(iter.into_iter().collect())
    }
}

/// `lo`, `sep`, `hi`, both with `precision` decimals: `range(1.0, 2.5, 2, " - ")` is
/// `"1.00 - 2.50"`.
pub fn range(lo: f64, hi: f64, precision: usize, sep: &str) -> String {
    format!("{lo:.precision$}{sep}{hi:.precision$}")
}

/// `median (lo-hi)` with `precision` decimals, the median being the high one (see
/// [`Samples::median_high`]); `None` without samples.
pub fn median_range(s: &Samples, precision: usize) -> Option<String> {
    let m = s.median_high()?;
    let (lo, hi) = s.min_max()?;
    Some(format!(
        "{m:.precision$} ({})",
        range(lo, hi, precision, "-")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[f64]) -> Samples {
        v.iter().copied().collect()
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(s(&[]).median(), None);
        assert_eq!(s(&[]).median_high(), None);
        assert_eq!(s(&[3.0]).median(), Some(3.0));
        assert_eq!(s(&[3.0]).median_high(), Some(3.0));
        // Unsorted on purpose: the order taken is kept, the median sorts.
        assert_eq!(s(&[5.0, 1.0, 3.0]).median(), Some(3.0));
        assert_eq!(s(&[5.0, 1.0, 3.0]).median_high(), Some(3.0));
        assert_eq!(s(&[4.0, 1.0, 3.0, 2.0]).median(), Some(2.5));
        assert_eq!(s(&[4.0, 1.0, 3.0, 2.0]).median_high(), Some(3.0));
        assert_eq!(s(&[4.0, 1.0, 3.0, 2.0]).values(), &[4.0, 1.0, 3.0, 2.0]);
    }

    #[test]
    fn min_max_passes_over_nan() {
        assert_eq!(s(&[]).min_max(), None);
        assert_eq!(s(&[f64::NAN]).min_max(), None);
        assert_eq!(s(&[2.0, f64::NAN, -1.0, 7.5]).min_max(), Some((-1.0, 7.5)));
        assert_eq!(s(&[2.0]).min_max(), Some((2.0, 2.0)));
    }

    #[test]
    fn map_and_ratios_keep_the_order() {
        let t = s(&[1.0, 2.0, 4.0]);
        assert_eq!(t.map(|v| v * 10.0).values(), &[10.0, 20.0, 40.0]);
        let base = s(&[2.0, 2.0]);
        assert_eq!(t.ratios(&base).values(), &[0.5, 1.0]);
        assert_eq!(t.ratios(&base).len(), 2);
        assert!(Samples::new().is_empty());
    }

    #[test]
    fn ranges_are_written_as_the_benches_print_them() {
        assert_eq!(range(1.0, 2.5, 2, " - "), "1.00 - 2.50");
        assert_eq!(range(0.04, 12.0, 1, "–"), "0.0–12.0");
        assert_eq!(
            median_range(&s(&[30.0, 10.0, 20.0, 40.0]), 1).as_deref(),
            Some("30.0 (10.0-40.0)")
        );
        assert_eq!(median_range(&Samples::new(), 1), None);
    }
}

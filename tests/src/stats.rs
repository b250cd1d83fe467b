//! The few statistics the benchmarks print (medians, a p99, a value's range), in one
//! place: the bench binary and qmp-cycles each had their own copies, and a figure in
//! docs/benchmarks.md must mean the same thing whichever of them printed it.
//!
//! Every statistic here is an *order statistic*: a value of the sample itself, never an
//! average of two. The median of an even count is the upper of the two middle values.

use std::cmp::Ordering;

/// The value at index `rank(len)` of `v` sorted by `cmp`; `None` when `v` is empty.
fn order_statistic<T: Copy>(
    v: &[T],
    cmp: impl FnMut(&T, &T) -> Ordering,
    rank: impl FnOnce(usize) -> usize,
) -> Option<T> {
    let mut sorted = v.to_vec();
    sorted.sort_by(cmp);
    sorted.get(rank(sorted.len())).copied()
}

/// The median of `v`: the value at index `len / 2` of the sorted values, so the upper
/// middle value of an even count. `None` when `v` is empty.
pub fn median_of<T: Ord + Copy>(v: &[T]) -> Option<T> {
    order_statistic(v, T::cmp, |n| n / 2)
}

/// The median of `v` as [`median_of`] takes it, ordered by [`f64::total_cmp`]; 0 when
/// `v` is empty.
pub fn median(v: &[f64]) -> f64 {
    order_statistic(v, f64::total_cmp, |n| n / 2).unwrap_or(0.0)
}

/// The `p` quantile of `v` (`p` a fraction, 0.99 for the p99): the sorted value nearest
/// to position `p · (len − 1)`, that is index `round(p · (len − 1))`, halves rounded
/// up (no interpolation between neighbours). 0 when `v` is empty. `percentile(v, 0.5)`
/// equals [`median`].
pub fn percentile(v: &[f64], p: f64) -> f64 {
    order_statistic(v, f64::total_cmp, |n| {
        ((n as f64 - 1.0) * p).round() as usize
    })
    .unwrap_or(0.0)
}

/// The smallest and the largest value of `v`, NaNs left out; `(f64::MAX, f64::MIN)`
/// when `v` is empty (or all NaN).
pub fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// The median of `v` with its smallest and largest value, as "M (L–H)", each with
/// `digits` decimals.
pub fn median_range(v: &[f64], digits: usize) -> String {
    let (lo, hi) = min_max(v);
    let m = median(v);
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn median_of_nothing_is_zero() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median_of::<u32>(&[]), None);
    }

    #[test]
    fn median_of_an_odd_count_is_the_middle_value() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[7.0]), 7.0);
        assert_eq!(median_of(&[9u32, 2, 4, 8, 1]), Some(4));
    }

    #[test]
    fn median_of_an_even_count_is_the_upper_middle_value() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(&[2.0, 1.0]), 2.0);
        let d = |ms| Duration::from_millis(ms);
        assert_eq!(median_of(&[d(4), d(1), d(3), d(2)]), Some(d(3)));
    }

    #[test]
    fn median_leaves_its_input_unsorted() {
        let v = [3.0, 1.0, 2.0];
        median(&v);
        assert_eq!(v, [3.0, 1.0, 2.0]);
    }

    #[test]
    fn percentile_of_nothing_is_zero() {
        assert_eq!(percentile(&[], 0.99), 0.0);
    }

    #[test]
    fn percentile_takes_the_nearest_rank() {
        let v: Vec<f64> = (1..=101).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 101.0);
        // An even count: 0.99 · 3 = 2.97, index 3.
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
        // Odd: 0.99 · 4 = 3.96, index 4.
        assert_eq!(percentile(&[5.0, 4.0, 3.0, 2.0, 1.0], 0.99), 5.0);
        // 0.99 · 9 = 8.91: index 9 of ten.
        let ten: Vec<f64> = (0..10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 0.99), 9.0);
        // 0.99 · 30 = 29.7: index 30 of 31; 0.99 · 50 = 49.5: index 50 of 51.
        let many: Vec<f64> = (0..51).map(f64::from).collect();
        assert_eq!(percentile(&many[..31], 0.99), 30.0);
        assert_eq!(percentile(&many, 0.99), 50.0);
    }

    #[test]
    fn percentile_at_a_half_is_the_median() {
        for n in 1..40 {
            let v: Vec<f64> = (0..n).map(|i| f64::from((i * 7919) % 101)).collect();
            assert_eq!(percentile(&v, 0.5), median(&v), "{n} values");
        }
    }

    #[test]
    fn min_max_of_values_and_of_nothing() {
        assert_eq!(min_max(&[3.0, -1.0, 2.0]), (-1.0, 3.0));
        assert_eq!(min_max(&[2.0, 5.0]), (2.0, 5.0));
        assert_eq!(min_max(&[f64::NAN, 4.0]), (4.0, 4.0));
        assert_eq!(min_max(&[]), (f64::MAX, f64::MIN));
    }

    #[test]
    fn median_range_formats_median_then_range() {
        assert_eq!(median_range(&[3.0, 1.0, 2.0], 0), "2 (1–3)");
        assert_eq!(median_range(&[1.2, 4.0, 2.5, 3.0], 1), "3.0 (1.2–4.0)");
    }
}

//! Small metric helpers shared by the tasks: the deterministic argmax and the median.
//!
//! Tie-break (methods.md §17): the prediction is the **first** index holding the maximum, as
//! torch's `argmax` (T-Few, FIB) does. BIG-bench's own `task_metrics.argmax` instead picks among
//! tied maxima pseudo-randomly from a sha256 of the float64 bytes of its *normalised*
//! log-probabilities (x − logsumexp(x)); those bytes depend on numpy's rounding, so amalgam does
//! not imitate it. Ties between distinct choices are rare with real model scores.

/// The first index of the largest value; NaN never wins (all NaN, or empty: 0).
pub fn first_argmax(values: &[f64]) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, &v) in values.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// The median (the mean of the two middle values for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The arithmetic mean; `None` when empty.
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_first_of_ties_and_nan() {
        assert_eq!(first_argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(first_argmax(&[f64::NAN, -1.0, -1.0]), 1);
        assert_eq!(first_argmax(&[f64::NAN, f64::NAN]), 0);
        assert_eq!(first_argmax(&[]), 0);
        assert_eq!(first_argmax(&[f64::NEG_INFINITY, f64::NEG_INFINITY]), 0);
        assert_eq!(first_argmax(&[-5.0, f64::INFINITY]), 1);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[0.3, 0.1, 0.2]), Some(0.2));
        assert_eq!(median(&[0.4, 0.1, 0.2, 0.3]), Some(0.25));
        assert_eq!(mean(&[1.0, 2.0]), Some(1.5));
        assert_eq!(mean(&[]), None);
    }
}

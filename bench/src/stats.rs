//! Pure helpers: order statistics, summaries and list parsing.

use serde::Serialize;
use std::fmt::Display;
use std::str::FromStr;

/// The median of `xs` (the mean of the two middle values for an even
/// count); `None` if empty. NaNs are not expected and sort last.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let s = sorted(xs);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The `p`-th percentile (0–100) of `xs` by the nearest-rank method: the
/// smallest sample such that at least p% of the samples are <= it. Always
/// one of the samples; p = 0 gives the minimum, p = 100 the maximum.
/// `None` if `xs` is empty or `p` is outside 0–100.
pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let s = sorted(xs);
    let n = s.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(s[rank.clamp(1, n) - 1])
}

fn sorted(xs: &[f64]) -> Vec<f64> {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// Median and spread of one statistic over the runs, with the raw samples
/// in run order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Summary {
    /// `None` if there are no samples.
    pub fn of(samples: Vec<f64>) -> Option<Summary> {
        let median = median(&samples)?;
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Summary {
            median,
            min,
            max,
            samples,
        })
    }
}

/// A comma-separated list given on the command line (`1,2,4`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

/// Parse `a,b,c`: at least one item, no empty items, no duplicates;
/// blanks around items are ignored.
pub fn parse_list<T>(s: &str) -> Result<List<T>, String>
where
    T: FromStr + PartialEq + Display,
    T::Err: Display,
{
    let mut out: Vec<T> = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!(
                "empty item in '{s}'; give a comma-separated list such as 1,2,4"
            ));
        }
        let v: T = item
            .parse()
            .map_err(|e| format!("'{item}' in '{s}': {e}"))?;
        if out.contains(&v) {
            return Err(format!("{v} is given twice in '{s}'"));
        }
        out.push(v);
    }
    Ok(List(out))
}

/// A list of instance sizes: positive integers.
pub fn parse_sizes(s: &str) -> Result<List<u32>, String> {
    let l = parse_list::<u32>(s)?;
    if l.0.contains(&0) {
        return Err(format!("sizes must be at least 1 (got '{s}')"));
    }
    Ok(l)
}

/// A list of ranks.
pub fn parse_ranks(s: &str) -> Result<List<u32>, String> {
    parse_list::<u32>(s)
}

/// A list of payload sizes in bytes, each at most the wire limit.
pub fn parse_pads(s: &str) -> Result<List<usize>, String> {
    let l = parse_list::<usize>(s)?;
    let max = canopy_proto::frame::MAX_PAYLOAD;
    if let Some(p) = l.0.iter().find(|p| **p > max) {
        return Err(format!("pad {p} exceeds the largest payload, {max} bytes"));
    }
    Ok(l)
}

/// Hops from rank 0 to `rank` in the k-ary tree (children of r are
/// r*k+1 ..= r*k+k), i.e. the rank's depth.
pub fn hops(rank: u32, fanout: u32) -> u32 {
    let k = fanout.max(1) as u64;
    let mut r = rank as u64;
    let mut d = 0;
    while r > 0 {
        r = (r - 1) / k;
        d += 1;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_unsorted() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[2.0, 2.0]), Some(2.0));
    }

    #[test]
    fn percentile_nearest_rank() {
        let xs: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), Some(50.0));
        assert_eq!(percentile(&xs, 99.0), Some(99.0));
        assert_eq!(percentile(&xs, 100.0), Some(100.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&xs, 0.5), Some(1.0));
        assert_eq!(percentile(&xs, 99.5), Some(100.0));
        // Small samples: p99 of 10 is the maximum, p50 the 5th value.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 50.0), Some(5.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&ten, 101.0), None);
        assert_eq!(percentile(&ten, -1.0), None);
    }

    #[test]
    fn summary_keeps_run_order() {
        let s = Summary::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.samples, vec![3.0, 1.0, 2.0]);
        assert_eq!(Summary::of(vec![]), None);
    }

    #[test]
    fn size_lists() {
        assert_eq!(
            parse_sizes("1,2,4,8,16,64").unwrap().0,
            vec![1, 2, 4, 8, 16, 64]
        );
        assert_eq!(parse_sizes("8").unwrap().0, vec![8]);
        assert_eq!(parse_sizes(" 1, 2 ").unwrap().0, vec![1, 2]);
        for bad in [
            "",
            "1,,2",
            "1,",
            ",1",
            "0",
            "1,0",
            "a",
            "-1",
            "1.5",
            "2,2",
            "99999999999",
        ] {
            assert!(parse_sizes(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_sizes("1,,2").unwrap_err().contains("empty item"));
        assert!(parse_sizes("2,2").unwrap_err().contains("twice"));
    }

    #[test]
    fn rank_and_pad_lists() {
        assert_eq!(parse_ranks("0,1,7").unwrap().0, vec![0, 1, 7]);
        assert_eq!(parse_pads("0,1024,65536").unwrap().0, vec![0, 1024, 65536]);
        assert!(parse_pads(&(canopy_proto::frame::MAX_PAYLOAD + 1).to_string()).is_err());
    }

    #[test]
    fn tree_depth() {
        assert_eq!(hops(0, 2), 0);
        assert_eq!(hops(1, 2), 1);
        assert_eq!(hops(2, 2), 1);
        assert_eq!(hops(3, 2), 2);
        assert_eq!(hops(7, 2), 3);
        assert_eq!(hops(62, 2), 5);
        assert_eq!(hops(63, 2), 6);
        assert_eq!(hops(3, 3), 1);
        assert_eq!(hops(4, 3), 2);
        assert_eq!(hops(5, 1), 5);
    }
}

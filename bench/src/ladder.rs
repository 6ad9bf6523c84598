//! Sizes a broker can serve. The test broker (Tansu 0.6.0) answers a fetch
//! with a query windowed over the rest of the partition, so reading a topic
//! takes time that grows about with the square of the topic's size: the
//! 100k sizes of a full run do not finish on it. A laddered scenario runs at
//! growing sizes, each within a bound, and keeps the largest that finished.
//! It does not start a size whose time, projected from the sizes before it,
//! passes the bound, so that a size the broker cannot serve does not leave
//! it busy for the scenarios after it.

use std::future::Future;
use std::time::{Duration, Instant};

/// What a laddered scenario measured, and at which size.
pub struct Served<T> {
    /// The figures of the largest size that finished.
    pub value: T,
    /// That size.
    pub size: usize,
    /// Why a larger size of the ladder was not measured (`None` when the
    /// last size was).
    pub short: Option<String>,
}

/// The growth exponent assumed before two sizes have been measured: the
/// test broker's reads grow with the square of the topic's size.
const FIRST_EXPONENT: f64 = 2.0;

/// The time a run at `next` is projected to take after runs at `steps`
/// (size, seconds), smallest first: the last time, grown by the exponent of
/// the last two (at least 1: nothing gets cheaper with size). `fixed`
/// seconds of every run do not grow with the size (pauses between rounds):
/// they are taken out before the growth is measured or applied, and added
/// back.
pub fn project(steps: &[(usize, f64)], next: usize, fixed: f64) -> Option<f64> {
    let grows = |secs: f64| (secs - fixed).max(MIN_GROWING);
    let &(size, secs) = steps.last()?;
    let exponent = match steps {
        [.., (s0, t0), (s1, t1)] if *s1 > *s0 => {
            ((grows(*t1) / grows(*t0)).ln() / (*s1 as f64 / *s0 as f64).ln()).max(1.0)
        }
        _ => FIRST_EXPONENT,
    };
    Some(fixed + grows(secs) * (next as f64 / size as f64).powf(exponent))
}

/// The least part of a run's time counted as growing with its size.
const MIN_GROWING: f64 = 1e-3;

/// A size in thousands, as the scenario names print it.
pub fn thousands(n: usize) -> String {
    if n.is_multiple_of(1000) { format!("{}k", n / 1000) } else { n.to_string() }
}

/// Runs `run` at each of `sizes` (ascending), each within `bound`, and keeps
/// the largest that finished. The first size must finish: its error is the
/// answer. A later size that fails or passes the bound ends the ladder, as
/// does one projected to pass it.
pub async fn largest_served<T, F, Fut>(
    sizes: &[usize],
    bound: Duration,
    fixed: Duration,
    mut run: F,
) -> anyhow::Result<Served<T>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut steps: Vec<(usize, f64)> = Vec::new();
    let mut best: Option<Served<T>> = None;
    for &size in sizes {
        if let Some(projected) = project(&steps, size, fixed.as_secs_f64())
            && projected > bound.as_secs_f64()
        {
            let why = format!(
                "{} not run: this broker took {} ({}{}), which projects {projected:.0} s for {}, past the \
                     scenario's bound of {:.0} s",
                thousands(size),
                steps.iter().map(|(s, t)| format!("{t:.0} s for {}", thousands(*s))).collect::<Vec<_>>().join(", "),
                if fixed.is_zero() {
                    String::new()
                } else {
                    format!("{:.0} s of each in pauses; ", fixed.as_secs_f64())
                },
                if steps.len() > 1 { "growth measured between the last two sizes" } else { "growth assumed square" },
                thousands(size),
                bound.as_secs_f64()
            );
            return finish(best, why);
        }
        eprintln!("  size {}", thousands(size));
        let started = Instant::now();
        let outcome = match tokio::time::timeout(bound, run(size)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("passed the scenario's bound of {} s", bound.as_secs())),
        };
        match outcome {
            Ok(value) => {
                steps.push((size, started.elapsed().as_secs_f64()));
                best = Some(Served { value, size, short: None });
            }
            Err(e) if best.is_none() => return Err(e),
            Err(e) => return finish(best, format!("{} failed on this broker: {e:#}", thousands(size))),
        }
    }
    best.ok_or_else(|| anyhow::anyhow!("no size to run"))
}

fn finish<T>(best: Option<Served<T>>, why: String) -> anyhow::Result<Served<T>> {
    let mut served = best.ok_or_else(|| anyhow::anyhow!("{why}"))?;
    eprintln!("  kept {}: {why}", thousands(served.size));
    served.short = Some(why);
    Ok(served)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_size_projects_the_square() {
        let p = project(&[(5_000, 10.0)], 20_000, 0.0).unwrap();
        assert!((p - 160.0).abs() < 1e-9, "{p}");
    }

    #[test]
    fn two_sizes_project_their_own_growth() {
        // Linear between 5k and 20k: 100k is five times 20k.
        let p = project(&[(5_000, 10.0), (20_000, 40.0)], 100_000, 0.0).unwrap();
        assert!((p - 200.0).abs() < 1e-6, "{p}");
        // Cubic growth is kept as measured.
        let p = project(&[(1_000, 1.0), (2_000, 8.0)], 4_000, 0.0).unwrap();
        assert!((p - 64.0).abs() < 1e-6, "{p}");
        // A size that took less than a smaller one grows linearly.
        let p = project(&[(1_000, 8.0), (2_000, 4.0)], 4_000, 0.0).unwrap();
        assert!((p - 8.0).abs() < 1e-6, "{p}");
    }

    #[test]
    fn pauses_are_not_grown_with_the_size() {
        // 19 s for 5k, 15 s of them pauses: the 4 s left grow, the pauses stay.
        let p = project(&[(5_000, 19.0)], 20_000, 15.0).unwrap();
        assert!((p - (15.0 + 4.0 * 16.0)).abs() < 1e-9, "{p}");
        // Growth between two sizes is measured on the growing parts alone.
        let p = project(&[(1_000, 12.0), (2_000, 14.0)], 4_000, 10.0).unwrap();
        assert!((p - (10.0 + 8.0)).abs() < 1e-6, "{p}");
        // A run no longer than its pauses still projects at least them.
        let p = project(&[(1_000, 5.0)], 2_000, 10.0).unwrap();
        assert!(p >= 10.0, "{p}");
    }

    #[test]
    fn nothing_measured_projects_nothing() {
        assert!(project(&[], 5_000, 0.0).is_none());
    }

    #[tokio::test]
    async fn the_ladder_stops_before_a_size_projected_past_the_bound() {
        let mut ran = Vec::new();
        // A size of n takes n ms: 1,000 is projected at about 1 s.
        let served = largest_served(&[10, 20, 1_000], Duration::from_millis(500), Duration::ZERO, |n| {
            ran.push(n);
            async move {
                tokio::time::sleep(Duration::from_millis(n as u64)).await;
                Ok(n * 2)
            }
        })
        .await
        .unwrap();
        assert_eq!(ran, [10, 20]);
        assert_eq!((served.value, served.size), (40, 20));
        assert!(served.short.unwrap().starts_with("1k not run"));
    }

    #[tokio::test]
    async fn a_failed_size_keeps_the_one_before_and_a_failed_first_size_fails() {
        let served = largest_served(&[1, 2, 3], Duration::from_secs(60), Duration::ZERO, |n| async move {
            anyhow::ensure!(n < 2, "too big");
            Ok(n)
        })
        .await
        .unwrap();
        assert_eq!(served.size, 1);
        assert!(served.short.unwrap().contains("too big"));
        let failed = largest_served(&[1, 2], Duration::from_secs(60), Duration::ZERO, |_| async {
            anyhow::bail!("no broker") as anyhow::Result<()>
        })
        .await;
        assert!(failed.is_err());
    }

    #[tokio::test]
    async fn every_size_served_leaves_nothing_short() {
        let served =
            largest_served(&[1, 2], Duration::from_secs(60), Duration::ZERO, |n| async move { Ok(n) }).await.unwrap();
        assert_eq!(served.size, 2);
        assert!(served.short.is_none());
    }
}

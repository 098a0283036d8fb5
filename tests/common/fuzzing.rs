//! Property-based fuzzing with proptest, shared by the fuzz tests: case counts and seeds from the
//! environment (`PROPTEST_CASES`, `FUZZ_SEED`), and a tally of the outcomes each case reports.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// `PROPTEST_CASES` when set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A runner without failure persistence; seeded from `FUZZ_SEED` when set (to replay a run).
pub fn runner(default_cases: u32, max_shrink_iters: u32) -> TestRunner {
    let config = Config {
        cases: cases(default_cases),
        failure_persistence: None,
        max_shrink_iters,
        ..Config::default()
    };
    match std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(seed) => {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
        }
        None => TestRunner::new(config),
    }
}

/// Runs `property` over `strategy`, tallying the outcomes it reports, and prints the tally.
pub fn fuzz<S: Strategy, O: Ord + std::fmt::Debug>(
    name: &str,
    default_cases: u32,
    max_shrink_iters: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<O, TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let tally = RefCell::new(BTreeMap::<O, u32>::new());
    let mut runner = runner(default_cases, max_shrink_iters);
    let start = Instant::now();
    let result = runner.run(&strategy, |input| {
        let outcome = property(input)?;
        *tally.borrow_mut().entry(outcome).or_default() += 1;
        Ok(())
    });
    let took = start.elapsed();
    let executed: u32 = tally.borrow().values().sum();
    println!(
        "FUZZ: {name}: {executed} cases in {:.1} s ({:.0}/s); outcomes {:?}",
        took.as_secs_f64(),
        f64::from(executed) / took.as_secs_f64().max(1e-9),
        tally.borrow()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

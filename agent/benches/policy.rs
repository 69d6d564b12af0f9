//! Policy decision time: median `PolicySet::evaluate` with 100 and 10,000 policies loaded
//! (indexed by namespace and selector, so it should stay flat). Part of `cargo xtask bench`.

use ambit_agent::policy::measure_decision_time;

fn main() {
    let quick = std::env::var("AMBIT_BENCH_QUICK").is_ok_and(|v| v == "1");
    let iterations = if quick { 2_000 } else { 100_000 };
    println!("policy decision time (median of {iterations} evaluations)");
    println!("| policies loaded | median decision |");
    println!("| ---: | ---: |");
    for n in [100, 10_000] {
        let median = measure_decision_time(n, iterations);
        println!("| {n} | {:.2} µs |", median.as_secs_f64() * 1e6);
    }
}

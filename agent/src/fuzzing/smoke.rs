//! The fuzz smoke run: every target of [`super::TARGETS`] on stable, in `cargo test` (and so
//! in `cargo xtask test`), a few seconds each. It replays every committed seed
//! (`agent/fuzz/seeds`), every regression input (`agent/fuzz/regressions/<target>`, crashes
//! found once and fixed) and libFuzzer's local working corpus (`agent/fuzz/corpus/<target>`,
//! when a coverage-guided run left one), then feeds the target random bytes and mutations of
//! those inputs. It has no coverage feedback: it catches regressions and shallow bugs
//! cheaply; `cargo xtask fuzz` is the coverage-guided search.
//!
//! A panic fails the run: the input is written to `agent/fuzz/artifacts/<target>/` (where
//! libFuzzer saves its crashes, so `cargo +nightly fuzz run -s none -a <target> <file>`
//! reproduces it) and the PRNG seed is printed, so `AMBIT_FUZZ_SEED=<seed>` replays the same
//! sequence. `AMBIT_FUZZ_SMOKE_SECS` sets the time per target (default 3). An input that
//! keeps the target busy past the per-input limit (10 s) fails the run the same way, as a
//! hang, instead of stalling the test run until CI's own timeout.
//!
//! Written here rather than with a fuzzing crate: the crates that run libFuzzer-style targets
//! need nightly instrumentation, and a replay-and-mutate loop is a few dozen lines.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use super::Target;

/// One input and where it came from (a file, or "mutation N").
#[derive(Clone, Debug)]
pub struct Input {
    pub origin: String,
    pub bytes: Vec<u8>,
}

/// How one target's smoke run went.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// Inputs read from files and replayed as they are.
    pub replayed: usize,
    /// Random and mutated inputs run after them.
    pub generated: usize,
}

/// The input a target panicked or hung on.
#[derive(Debug)]
pub struct Failure {
    pub target: String,
    pub origin: String,
    pub input: Vec<u8>,
    /// The file the input was written to.
    pub saved: PathBuf,
    /// The panic message, or what the hang was.
    pub message: String,
    /// The PRNG seed that generated the inputs.
    pub seed: u64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz target {} failed ({}) on {} ({} bytes), saved to {}; \
             replay the same run with AMBIT_FUZZ_SEED={}",
            self.target,
            self.message,
            self.origin,
            self.input.len(),
            self.saved.display(),
            self.seed
        )
    }
}

/// The run's settings: the PRNG seed, how long the generated inputs run, how long one input
/// may take before it counts as a hang, and where a failing input is saved.
pub struct Smoke {
    pub seed: u64,
    pub budget: Duration,
    pub input_timeout: Duration,
    pub failure_dir: PathBuf,
}

/// Each input's limit in the smoke run: every target takes microseconds per input, so only a
/// hang (or a blow-up to match one) comes near it.
pub const INPUT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes that matter to the targets' formats (separators, YAML and URI syntax, extremes).
const INTERESTING: &[u8] = b"\0\xff\x7f\x80/:-_.\n\r\t \"'{}[]%@#?=,&*!|>";

/// Replays `inputs` through `target`, then random and mutated ones until the budget is
/// spent. The first panic stops the run and is returned with its input, already saved.
pub fn run(
    name: &str,
    target: Target,
    inputs: &[Input],
    smoke: &Smoke,
) -> Result<Report, Box<Failure>> {
    // The smoke run is test code: a thread that cannot start is the test's own failure,
    // not an input's.
    let worker = Worker::start(target)
        .unwrap_or_else(|e| panic!("fuzz smoke {name}: no thread to run the target on: {e}"));
    for input in inputs {
        check(name, &worker, input, smoke)?;
    }
    let mut rng = StdRng::seed_from_u64(smoke.seed);
    // Inputs grow by splicing and repeating; cap them like libFuzzer's -max_len (4096 for a
    // fresh corpus), but never below the largest seed.
    let max_len = inputs
        .iter()
        .map(|i| i.bytes.len() * 2)
        .max()
        .unwrap_or(0)
        .max(4096);
    let started = Instant::now();
    let mut generated = 0;
    while started.elapsed() < smoke.budget {
        let bytes = if inputs.is_empty() || rng.random_ratio(1, 8) {
            random_input(&mut rng)
        } else {
            mutate(&mut rng, inputs, max_len)
        };
        generated += 1;
        let input = Input {
            origin: format!("generated input {generated}"),
            bytes,
        };
        check(name, &worker, &input, smoke)?;
    }
    Ok(Report {
        replayed: inputs.len(),
        generated,
    })
}

/// The thread the target runs on, so that the run can stop waiting for an input that hangs.
/// One for the whole run (a thread per input would halve the inputs a budget runs); after a
/// hang it is left behind, still busy, and the run ends.
struct Worker {
    inputs: std::sync::mpsc::Sender<Vec<u8>>,
    outcomes: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl Worker {
    fn start(target: Target) -> std::io::Result<Self> {
        let (inputs, to_run) = std::sync::mpsc::channel::<Vec<u8>>();
        let (report, outcomes) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("fuzz-smoke".into())
            .spawn(move || {
                while let Ok(bytes) = to_run.recv() {
                    let outcome =
                        catch_unwind(AssertUnwindSafe(|| target(&bytes))).map_err(|panic| {
                            panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                .unwrap_or_else(|| "a non-string panic".to_owned())
                        });
                    if report.send(outcome).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self { inputs, outcomes })
    }
}

/// One input through the worker's target; a panic or a hang becomes a [`Failure`] with the
/// input saved.
fn check(name: &str, worker: &Worker, input: &Input, smoke: &Smoke) -> Result<(), Box<Failure>> {
    use std::sync::mpsc::RecvTimeoutError;
    // A worker that is gone dropped its end of `outcomes` too: the wait below says so.
    let _ = worker.inputs.send(input.bytes.clone());
    let message = match worker.outcomes.recv_timeout(smoke.input_timeout) {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(panic)) => panic,
        Err(RecvTimeoutError::Timeout) => format!(
            "no result within {:?}: the target hangs (or takes that long) on this input",
            smoke.input_timeout
        ),
        Err(RecvTimeoutError::Disconnected) => "the worker thread is gone".into(),
    };
    Err(failure(name, input, smoke, message))
}

/// `input` saved under the failure directory, and the failure that names it.
fn failure(name: &str, input: &Input, smoke: &Smoke, message: String) -> Box<Failure> {
    let saved = smoke
        .failure_dir
        .join(format!("smoke-{:016x}", fnv1a(&input.bytes)));
    let saved = match std::fs::create_dir_all(&smoke.failure_dir)
        .and_then(|()| std::fs::write(&saved, &input.bytes))
    {
        Ok(()) => saved,
        Err(e) => PathBuf::from(format!("<not saved: {e}>")),
    };
    Box::new(Failure {
        target: name.to_owned(),
        origin: input.origin.clone(),
        input: input.bytes.clone(),
        saved,
        message,
        seed: smoke.seed,
    })
}

/// A content hash for the saved file's name, so one input is saved once.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Random bytes; half the time printable ASCII, since most targets want UTF-8 text.
fn random_input(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.random_range(0..256);
    let text = rng.random_bool(0.5);
    (0..len)
        .map(|_| {
            if text {
                rng.random_range(0x20..0x7f)
            } else {
                rng.random()
            }
        })
        .collect()
}

/// A seed with one to four mutations stacked: bit flips, interesting bytes, insertions,
/// deletions, truncations, repeated chunks and splices with another input.
fn mutate(rng: &mut StdRng, inputs: &[Input], max_len: usize) -> Vec<u8> {
    let mut bytes = inputs[rng.random_range(0..inputs.len())].bytes.clone();
    for _ in 0..rng.random_range(1..=4) {
        let len = bytes.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let at = rng.random_range(0..len);
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let at = rng.random_range(0..len);
                bytes[at] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            2 => {
                let at = rng.random_range(0..=len);
                let byte = if rng.random_bool(0.5) {
                    INTERESTING[rng.random_range(0..INTERESTING.len())]
                } else {
                    rng.random()
                };
                bytes.insert(at, byte);
            }
            3 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = rng.random_range(start..=len.min(start + 16));
                bytes.drain(start..end);
            }
            4 => bytes.truncate(rng.random_range(0..=len)),
            5 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = rng.random_range(start + 1..=len.min(start + 32));
                let chunk = bytes[start..end].to_vec();
                for _ in 0..rng.random_range(1..=8) {
                    bytes.splice(end..end, chunk.iter().copied());
                }
            }
            _ => {
                let other = &inputs[rng.random_range(0..inputs.len())].bytes;
                let keep = rng.random_range(0..=len);
                let from = rng.random_range(0..=other.len());
                bytes.truncate(keep);
                bytes.extend_from_slice(&other[from..]);
            }
        }
        bytes.truncate(max_len);
    }
    bytes
}

/// Every file directly in `dir`, sorted (none when it does not exist).
pub fn read_inputs(dir: &Path) -> Vec<Input> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let bytes = std::fs::read(&path).ok()?;
            Some(Input {
                origin: path.display().to_string(),
                bytes,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::TARGETS;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    /// The seed from `AMBIT_FUZZ_SEED`, or a fresh one (printed, so a failure reproduces).
    fn seed() -> u64 {
        std::env::var("AMBIT_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random)
    }

    fn budget() -> Duration {
        let secs = std::env::var("AMBIT_FUZZ_SMOKE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0);
        Duration::from_secs_f64(secs)
    }

    /// The smoke run of one target over its seeds, regressions and local corpus.
    fn smoke(name: &str) {
        let (_, target, seed_dirs) = TARGETS
            .iter()
            .find(|(t, _, _)| *t == name)
            .expect("a listed target");
        let dir = fuzz_dir();
        let mut inputs = Vec::new();
        for seeds in *seed_dirs {
            let found = read_inputs(&dir.join("seeds").join(seeds));
            assert!(!found.is_empty(), "no seeds in agent/fuzz/seeds/{seeds}");
            inputs.extend(found);
        }
        inputs.extend(read_inputs(&dir.join("regressions").join(name)));
        inputs.extend(read_inputs(&dir.join("corpus").join(name)));
        let settings = Smoke {
            seed: seed(),
            budget: budget(),
            input_timeout: INPUT_TIMEOUT,
            failure_dir: dir.join("artifacts").join(name),
        };
        println!("fuzz smoke {name}: AMBIT_FUZZ_SEED={}", settings.seed);
        match run(name, *target, &inputs, &settings) {
            Ok(report) => println!(
                "fuzz smoke {name}: {} inputs replayed, {} generated",
                report.replayed, report.generated
            ),
            Err(failure) => panic!("{failure}"),
        }
    }

    #[test]
    fn smoke_config_parse() {
        smoke("config_parse");
    }

    #[test]
    fn smoke_policy_compile() {
        smoke("policy_compile");
    }

    #[test]
    fn smoke_spiffe_id() {
        smoke("spiffe_id");
    }

    #[test]
    fn smoke_hbone_connect() {
        smoke("hbone_connect");
    }

    #[test]
    fn smoke_cgroup_path() {
        smoke("cgroup_path");
    }

    #[test]
    fn every_target_has_a_smoke_test() {
        // The names above, so a target added to TARGETS without a smoke test fails here.
        let smoked = [
            "config_parse",
            "policy_compile",
            "spiffe_id",
            "hbone_connect",
            "cgroup_path",
        ];
        let listed: Vec<&str> = TARGETS.iter().map(|(t, _, _)| *t).collect();
        assert_eq!(listed, smoked);
    }

    fn scratch_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ambit-smoke-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Panics on any input holding "BOOM".
    fn panics_on_boom(data: &[u8]) {
        assert!(!data.windows(4).any(|w| w == b"BOOM"), "found BOOM");
    }

    #[test]
    fn a_panic_on_a_replayed_input_fails_with_that_input_saved() {
        let dir = scratch_dir("replay");
        let inputs = [
            Input {
                origin: "seed ok".into(),
                bytes: b"fine".to_vec(),
            },
            Input {
                origin: "seed bad".into(),
                bytes: b"xxBOOMxx".to_vec(),
            },
        ];
        let settings = Smoke {
            seed: 1,
            budget: Duration::from_secs(60),
            input_timeout: INPUT_TIMEOUT,
            failure_dir: dir.clone(),
        };
        let failure = run("boom", panics_on_boom, &inputs, &settings).expect_err("must fail");
        assert_eq!(failure.origin, "seed bad");
        assert_eq!(failure.input, b"xxBOOMxx");
        assert!(
            failure.message.contains("found BOOM"),
            "{}",
            failure.message
        );
        assert_eq!(std::fs::read(&failure.saved).expect("saved"), b"xxBOOMxx");
        let shown = failure.to_string();
        assert!(
            shown.contains(&failure.saved.display().to_string()),
            "{shown}"
        );
        assert!(shown.contains("AMBIT_FUZZ_SEED=1"), "{shown}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// Panics when a 0xff byte directly follows "ab": no seed has it, a mutation must make it.
    fn panics_on_mutation(data: &[u8]) {
        assert!(
            !data.windows(3).any(|w| w == b"ab\xff"),
            "mutated into ab\\xff"
        );
    }

    #[test]
    fn a_panic_only_a_mutation_reaches_is_found_and_saved() {
        let dir = scratch_dir("mutate");
        let inputs = [Input {
            origin: "seed".into(),
            bytes: b"abc".to_vec(),
        }];
        let settings = Smoke {
            seed: 7,
            // A bound, not a timing: the fixed seed finds it within a few hundred inputs.
            budget: Duration::from_secs(60),
            input_timeout: INPUT_TIMEOUT,
            failure_dir: dir.clone(),
        };
        let failure =
            run("mutation", panics_on_mutation, &inputs, &settings).expect_err("must fail");
        assert!(failure.origin.starts_with("generated input "), "{failure}");
        assert!(failure.input.windows(3).any(|w| w == b"ab\xff"));
        assert_eq!(std::fs::read(&failure.saved).expect("saved"), failure.input);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_target_that_never_panics_passes_after_replaying_everything() {
        let inputs = [Input {
            origin: "seed".into(),
            bytes: b"abc".to_vec(),
        }];
        let settings = Smoke {
            seed: 3,
            budget: Duration::from_millis(50),
            input_timeout: INPUT_TIMEOUT,
            failure_dir: scratch_dir("pass"),
        };
        let report = run("quiet", |_| {}, &inputs, &settings).expect("passes");
        assert_eq!(report.replayed, 1);
        assert!(report.generated > 0);
        assert!(!settings.failure_dir.exists());
    }

    /// Never returns on an input holding "HANG" (the thread waits for an unpark that never
    /// comes).
    fn hangs_on_hang(data: &[u8]) {
        if data.windows(4).any(|w| w == b"HANG") {
            loop {
                std::thread::park();
            }
        }
    }

    #[test]
    fn an_input_that_hangs_fails_the_run_with_that_input_saved() {
        let dir = scratch_dir("hang");
        let inputs = [
            Input {
                origin: "seed ok".into(),
                bytes: b"fine".to_vec(),
            },
            Input {
                origin: "seed hangs".into(),
                bytes: b"xxHANGxx".to_vec(),
            },
        ];
        let settings = Smoke {
            seed: 5,
            budget: Duration::from_secs(60),
            // The hang is endless, so any limit fires; this one is far above what "fine" takes.
            input_timeout: Duration::from_secs(2),
            failure_dir: dir.clone(),
        };
        let failure = run("hang", hangs_on_hang, &inputs, &settings).expect_err("must fail");
        assert_eq!(failure.origin, "seed hangs");
        assert!(failure.message.contains("hangs"), "{}", failure.message);
        assert_eq!(std::fs::read(&failure.saved).expect("saved"), b"xxHANGxx");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

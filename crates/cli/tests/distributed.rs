//! Data-parallel training under `mpirun` (docs/DISTRIBUTED.md), against single-process
//! runs of the same binary: N ranks with accumulation k equal one process with
//! accumulation N·k; ZeRO-1 equals the unsharded run; a resume on another rank count
//! continues the same run; a killed rank ends the job, naming it, and its last
//! checkpoint resumes on one rank. Needs the `mpi` feature and Open MPI's `mpirun`
//! (.ci/run installs both and runs these).

#[cfg(not(feature = "mpi"))]
#[test]
fn distributed_tests_need_the_mpi_feature() {
    // Visible in the test output: these tests did not run in this build.
    eprintln!(
        "SKIPPED: the data-parallel tests (crates/cli/tests/distributed.rs) need `--features mpi`; \
         .ci/run builds and runs them"
    );
}

#[cfg(feature = "mpi")]
mod mpi_runs {
    use std::path::Path;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    const BIN: &str = env!("CARGO_BIN_EXE_anetrain");

    /// The tiny preset on the built-in corpus, a few steps.
    fn train_args(ckpt: &Path, telemetry: &Path, steps: u64, accum: usize, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--device",
            "cpu",
            "--quiet",
            "--batch",
            "2",
            "--seq",
            "32",
            "--sample-steps",
            "0",
            "--eval-every",
            "0",
            "--warmup",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(["--steps".into(), steps.to_string(), "--accum".into(), accum.to_string()]);
        v.extend(["--ckpt".into(), ckpt.display().to_string(), "--telemetry".into(), telemetry.display().to_string()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn mpirun(ranks: usize) -> Command {
        let mut c = Command::new("mpirun");
        // Root in CI containers, and more ranks than this machine's cores.
        c.args(["-np", &ranks.to_string(), "--oversubscribe", "--allow-run-as-root", BIN]);
        c.env("ANETRAIN_QUIET", "1");
        c
    }

    fn single() -> Command {
        let mut c = Command::new(BIN);
        c.env("ANETRAIN_QUIET", "1");
        c
    }

    fn ok(what: &str, out: std::io::Result<Output>) -> String {
        let out = out.unwrap_or_else(|e| panic!("{what}: cannot start it ({e}); is Open MPI's mpirun installed?"));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{what} failed ({}):\n{stderr}", out.status);
        stderr
    }

    /// The losses of the run's steps, from rank 0's telemetry.
    fn losses(telemetry: &Path) -> Vec<(u64, f64)> {
        std::fs::read_to_string(telemetry)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["event"] == "step")
            .map(|e| (e["step"].as_u64().unwrap(), e["loss"].as_f64().unwrap()))
            .collect()
    }

    /// `‖a − b‖ / ‖b‖`.
    fn relative(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let diff: f64 = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
        let norm: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
        (diff / norm).sqrt()
    }

    fn assert_same_run(what: &str, dir: &Path, run: &str, reference: &str) {
        let (a, b) = (losses(&dir.join(format!("{run}.jsonl"))), losses(&dir.join(format!("{reference}.jsonl"))));
        let a_steps: Vec<u64> = a.iter().map(|s| s.0).collect();
        let b_steps: Vec<u64> = b.iter().map(|s| s.0).collect();
        assert_eq!(a_steps, b_steps, "{what}: the runs' steps differ");
        for ((step, x), (_, y)) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * y.abs(), "{what}: step {step} loss {x} vs {y}");
        }
        let pa = train::trainer::load_params(&dir.join(run).join("ckpt.bin")).unwrap();
        let pb = train::trainer::load_params(&dir.join(reference).join("ckpt.bin")).unwrap();
        let r = relative(pa.as_slice(), pb.as_slice());
        assert!(r <= 1e-6, "{what}: final weights differ by {r:e} (relative)");
        // Learning happened: the weights are not the initial ones merely copied.
        assert!(pa.as_slice().iter().all(|v| v.is_finite()));
    }

    /// Runs `mpirun -np ranks anetrain train …` (or one process when `ranks` is 0) into
    /// `dir/name/ckpt.bin` and `dir/name.jsonl`.
    fn run(dir: &Path, name: &str, ranks: usize, steps: u64, accum: usize, extra: &[&str]) -> String {
        let args =
            train_args(&dir.join(name).join("ckpt.bin"), &dir.join(format!("{name}.jsonl")), steps, accum, extra);
        let mut cmd = if ranks == 0 { single() } else { mpirun(ranks) };
        ok(name, cmd.args(&args).current_dir(dir).output())
    }

    #[test]
    fn two_ranks_equal_one_process_with_twice_the_accumulation_and_zero1_and_resume_agree() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // The reference: one process, accumulation 2, 4 steps.
        run(d, "one", 0, 4, 2, &[]);
        // Two ranks, accumulation 1 each: the same 2 micro-batches per step.
        let stderr = run(d, "two", 2, 4, 1, &[]);
        assert!(stderr.contains("effective batch 2 × --accum 1 × 2 ranks = 4 sequences"), "{stderr}");
        assert_same_run("mpirun -np 2 vs one process with --accum 2", d, "two", "one");
        // ZeRO-1: the AdamW state sharded over the two ranks, the same run.
        let stderr = run(d, "zero", 2, 4, 1, &["--shard-optimizer"]);
        assert!(stderr.contains("ZeRO-1"), "{stderr}");
        assert_same_run("--shard-optimizer vs one process", d, "zero", "one");
        let full = train::checkpoint::Checkpoint::read(&d.join("two/ckpt.bin")).unwrap();
        let sharded = train::checkpoint::Checkpoint::read(&d.join("zero/ckpt.bin")).unwrap();
        for name in ["adam.m", "adam.v"] {
            let get = |c: &train::checkpoint::Checkpoint| c.arrays.iter().find(|a| a.0 == name).unwrap().1.clone();
            // The same to rounding: the global norm (so the clip factor) is summed from shards.
            let r = relative(&get(&sharded), &get(&full));
            assert!(r <= 1e-6, "ZeRO-1's gathered {name} differs from the unsharded run's by {r:e} (relative)");
        }
        // A run begun on 2 ranks, resumed on 1 after step 2: it continues the same
        // sample sequence and global batch (the checkpoint's accumulation 2).
        run(d, "resumed", 2, 2, 1, &["--ckpt-every", "1"]);
        let stderr = run(d, "resumed", 0, 4, 2, &["--resume"]);
        assert!(stderr.contains("resuming after step 2"), "{stderr}");
        assert_same_run("2 ranks then 1 rank vs one process", d, "resumed", "one");
    }

    #[test]
    fn a_killed_rank_ends_the_job_naming_it_and_its_checkpoint_resumes_on_one_rank() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ckpt = d.join("run/ckpt.bin");
        let args = train_args(&ckpt, &d.join("run.jsonl"), 100_000, 1, &["--ckpt-every", "1"]);
        let mut job =
            mpirun(2).args(&args).current_dir(d).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // Wait for a checkpoint, then kill rank 1 (a child of mpirun, known by its
        // environment) with SIGKILL.
        let start = Instant::now();
        while !ckpt.exists() {
            assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint after 300 s");
            assert!(job.try_wait().unwrap().is_none(), "the job ended before its first checkpoint");
            std::thread::sleep(Duration::from_millis(100));
        }
        let rank1 = rank_pid(job.id(), 1).expect("rank 1 is a child of mpirun");
        assert!(Command::new("kill").args(["-9", &rank1.to_string()]).status().unwrap().success());
        let killed = Instant::now();
        // The job must end, not hang: the bar is 30 s.
        let status = loop {
            if let Some(s) = job.try_wait().unwrap() {
                break s;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                job.kill().ok();
                panic!("the job still runs 30 s after rank 1 was killed");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "a job with a killed rank must fail:\n{stderr}");
        assert!(stderr.contains("rank 1"), "the error does not name rank 1:\n{stderr}");
        // The last checkpoint is whole, and a single process continues it.
        let step = train::trainer::checkpoint_summary(&ckpt).expect("the last checkpoint reads back").step;
        let args = train_args(&ckpt, &d.join("resume.jsonl"), step + 2, 2, &["--resume"]);
        let stderr = ok("resume on 1 rank", single().args(&args).current_dir(d).output());
        assert!(stderr.contains(&format!("resuming after step {step}")), "{stderr}");
        assert_eq!(train::trainer::checkpoint_summary(&ckpt).unwrap().step, step + 2);
    }

    /// The pid of rank `rank` among `mpirun`'s children (Open MPI sets OMPI_COMM_WORLD_RANK).
    fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // Field 4 (after the parenthesised name) is the parent pid.
            let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
            let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(mpirun) {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
                return Some(pid);
            }
        }
        None
    }
}

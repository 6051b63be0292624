//! A real multi-process data-parallel step: `mpirun -np N truesize verify --dp N` on tiny
//! configs. Built only with `--features mpi` (CI installs OpenMPI and runs it).
#![cfg(feature = "mpi")]

mod common;

use common::{fixtures, json_of};

fn mpirun(np: usize, config: &std::path::Path) -> std::process::Output {
    let bin = assert_cmd::cargo::cargo_bin("truesize");
    std::process::Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        .arg(bin)
        .args(["verify", "--config"])
        .arg(config)
        .args([
            "--dp",
            &np.to_string(),
            "--batch",
            "2",
            "--seq",
            "16",
            "--format",
            "json",
        ])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun runs (OpenMPI installed: libopenmpi-dev openmpi-bin)")
}

#[test]
fn data_parallel_step_matches_the_single_process_step() {
    for (name, np) in [("tiny-gpt2", 2), ("tiny-llama", 2), ("tiny-llama", 4)] {
        let out = mpirun(np, &fixtures().join(name));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let j = json_of(&out.stdout);
        assert_eq!(j["processes"], np, "{name}: {stderr}");
        let ranks = j["ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), np);
        for r in ranks {
            assert!(r["measured_peak_bytes"].as_u64().unwrap() > 0);
        }
        assert!(
            j["grad_rel_error"].as_f64().unwrap() <= 1e-5,
            "{name}: {}",
            j["grad_rel_error"]
        );
        assert_eq!(j["pass"], true, "{name} np {np}: {}", j["checks"]);
        assert!(out.status.success(), "{name}: {stderr}");
    }
}

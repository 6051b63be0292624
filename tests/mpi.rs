//! Real multi-process steps: `mpirun -np N truesize verify --tp T --pp P --dp D` on tiny configs
//! (N = T·P·D). Built only with `--features mpi` (CI installs OpenMPI and runs it).
#![cfg(feature = "mpi")]

mod common;

use common::{fixtures, json_of};

/// (tp, pp, dp) on `config`, 2 sequences of 16 tokens per DP rank, one thread per process;
/// `extra` arguments after those.
fn mpirun(
    layout: (usize, usize, usize),
    config: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let (tp, pp, dp) = layout;
    let bin = assert_cmd::cargo::cargo_bin("truesize");
    std::process::Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &(tp * pp * dp).to_string(),
        ])
        .arg(bin)
        .args(["verify", "--config"])
        .arg(config)
        .args(["--tp", &tp.to_string()])
        .args(["--pp", &pp.to_string()])
        .args(["--dp", &dp.to_string()])
        .args(["--batch", "2", "--seq", "16", "--format", "json"])
        .args(extra)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun runs (OpenMPI installed: libopenmpi-dev openmpi-bin)")
}

/// Every rank's peak within 5% of the lean step's closed form for its shard, and the gradients
/// (each rank's shard, DP-averaged, tied copies summed) within 1e-5 of the single-process step.
#[test]
fn parallel_steps_match_the_single_process_step_and_the_plan() {
    let cases = [
        ("tiny-gpt2", (1, 1, 2)),
        ("tiny-gpt2", (2, 1, 2)),
        ("tiny-gpt2", (1, 2, 2)),
        ("tiny-llama", (2, 1, 2)),
        ("tiny-llama", (1, 2, 2)),
        ("tiny-llama", (2, 2, 1)),
    ];
    for (name, layout) in cases {
        let (tp, pp, dp) = layout;
        let out = mpirun(layout, &fixtures().join(name), &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let j = json_of(&out.stdout);
        let np = tp * pp * dp;
        assert_eq!(j["processes"], np, "{name} {layout:?}: {stderr}");
        assert_eq!(
            (j["tp"].clone(), j["pp"].clone(), j["dp"].clone()),
            (tp.into(), pp.into(), dp.into())
        );
        let ranks = j["ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), np);
        for (r, rank) in ranks.iter().enumerate() {
            // The plan's numbering: TP fastest, then DP, then the stage.
            let tp_rank = rank["tp_rank"].as_u64().unwrap() as usize;
            let stage = rank["pp_stage"].as_u64().unwrap() as usize;
            let dp_rank = rank["dp_rank"].as_u64().unwrap() as usize;
            assert_eq!(r, tp_rank + tp * (dp_rank + dp * stage));
            let measured = rank["measured_peak_bytes"].as_u64().unwrap() as f64;
            let predicted = rank["predicted_peak_bytes"].as_u64().unwrap() as f64;
            assert!(
                (measured - predicted).abs() <= 0.05 * predicted,
                "{name} {layout:?} rank {r}: measured {measured} predicted {predicted}"
            );
        }
        assert!(
            j["grad_rel_error"].as_f64().unwrap() <= 1e-5,
            "{name} {layout:?}: {}",
            j["grad_rel_error"]
        );
        assert_eq!(j["pass"], true, "{name} {layout:?}: {}", j["checks"]);
        assert!(out.status.success(), "{name} {layout:?}: {stderr}");
    }
}

/// A pipeline stage holds only its layers: with two stages, each holds fewer parameter bytes
/// than the whole network, and the stages differ (embedding first, head last).
#[test]
fn pipeline_stages_hold_their_own_layers() {
    let whole = mpirun((1, 1, 1), &fixtures().join("tiny-llama"), &[]);
    let split = mpirun((1, 2, 1), &fixtures().join("tiny-llama"), &[]);
    let w = json_of(&whole.stdout);
    let s = json_of(&split.stdout);
    let whole_plan = w["ranks"][0]["plan_weights_grads_bytes"].as_u64().unwrap();
    let stage: Vec<u64> = s["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["plan_weights_grads_bytes"].as_u64().unwrap())
        .collect();
    assert!(
        stage.iter().all(|&b| b < whole_plan),
        "{stage:?} vs {whole_plan}"
    );
    for r in s["ranks"].as_array().unwrap() {
        assert!(
            r["measured_peak_bytes"].as_u64().unwrap()
                < w["ranks"][0]["measured_peak_bytes"].as_u64().unwrap()
        );
    }
}

/// ZeRO-1/2 across the DP group: the flat gradient buffer reduce-scattered, each rank's
/// partition equal to the same slice of the single-process gradients, and what a rank holds
/// afterwards (weights + 1/DP of the gradients) within 5% of the closed form.
#[test]
fn zero_reduce_scatters_the_flat_gradient_buffer() {
    for (name, layout, zero) in [
        ("tiny-gpt2", (1, 2, 2), "2"),
        ("tiny-llama", (2, 1, 2), "1"),
    ] {
        let out = mpirun(layout, &fixtures().join(name), &["--zero", zero]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let j = json_of(&out.stdout);
        assert_eq!(j["zero"].to_string(), zero, "{name}: {stderr}");
        for r in j["ranks"].as_array().unwrap() {
            let held = r["held_after_bytes"].as_u64().unwrap() as f64;
            let predicted = r["predicted_held_after_bytes"].as_u64().unwrap() as f64;
            assert!(
                (held - predicted).abs() <= 0.05 * predicted,
                "{name}: {held} vs {predicted}"
            );
            assert!(held < r["measured_peak_bytes"].as_u64().unwrap() as f64);
        }
        assert!(j["grad_rel_error"].as_f64().unwrap() <= 1e-5, "{name}");
        assert_eq!(j["pass"], true, "{name}: {}", j["checks"]);
        assert!(out.status.success(), "{name}: {stderr}");
    }
}

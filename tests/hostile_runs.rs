//! Hostile runs through the binary, one section per class of failure a hostile user found:
//! deep configs (stack), memory beyond the budget, unbounded reads, a closed or full stdout,
//! writes through planted links and leftovers after a signal, numeric garbage that used to
//! pass, flags that cannot be honoured, and messages that must name what the user wrote.
//! Every test asserts the documented exit code and that nothing panicked or aborted.

mod common;

use common::{fixtures, json_of, temp_file, truesize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Run truesize; the exit code, stdout and stderr (never a panic, an abort or a signal).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = truesize();
    c.args(args).env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run truesize");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("{args:?} died by a signal: {e}"));
    assert!(!e.contains("panicked"), "{args:?} panicked: {e}");
    assert!(!e.contains("overflowed its stack"), "{args:?}: {e}");
    (code, o, e)
}

fn gpt2_toml(n_layer: usize, name: Option<&str>) -> String {
    let name = name.map_or(String::new(), |n| format!("name = \"{n}\"\n"));
    format!(
        "{name}arch = \"gpt2\"\nvocab_size = 16\nblock_size = 8\nn_embd = 8\nn_layer = {n_layer}\nn_head = 1\n"
    )
}

// ---- 1. stack: depth is not recursion -----------------------------------------------------

/// The reproduction: 2,200 layers of a small GPT-2 aborted `estimate` with a stack overflow.
/// The deepest configs are counted without building (shapes) and run (a real step through
/// candle's autograd, whose graph walk recurses once per op).
#[test]
fn deep_configs_neither_overflow_nor_abort() {
    let (_d, deep) = temp_file("deep.toml", gpt2_toml(2200, None).as_bytes());
    for args in [
        vec!["estimate", "--config", s(&deep)],
        vec!["verify", "--config", s(&deep), "--shapes-only"],
        vec!["scaling", "--config", s(&deep)],
        vec![
            "verify",
            "--config",
            s(&deep),
            "--batch",
            "1",
            "--seq",
            "2",
            "--no-artifacts",
            "--format",
            "json",
        ],
    ] {
        let (code, out, err) = run(&args, &[]);
        assert!(code == 0 || code == 1, "{args:?}: {code} {err}");
        if args.contains(&"json") {
            let j = json_of(out.as_bytes());
            assert_eq!(j["params"]["total"], j["census"]["numel"]);
        }
    }
}

/// The deepest config validation allows (65,536 layers) through every subcommand that does not
/// train it: counted, estimated, fitted and planned from shapes, in seconds (the autograd replay
/// extends past 192 layers affinely instead of replaying every layer).
#[test]
fn deepest_allowed_config_through_every_counting_subcommand() {
    let toml = "name = \"deepest\"\narch = \"gpt2\"\nvocab_size = 16\nblock_size = 64\nn_embd = 8\nn_layer = 65536\nn_head = 1\n";
    let (_d, deep) = temp_file("deepest.toml", toml.as_bytes());
    for args in [
        vec!["estimate", "--config", s(&deep)],
        vec!["estimate", "--config", s(&deep), "--engine", "autograd"],
        vec!["verify", "--config", s(&deep), "--shapes-only"],
        vec!["scaling", "--config", s(&deep)],
        vec!["gpus", "--config", s(&deep)],
        vec!["infer", "--config", s(&deep), "--shapes-only"],
        vec!["plan", "--config", s(&deep), "--pp", "4"],
    ] {
        let (code, _out, err) = run(&args, &[]);
        assert!(code == 0 || code == 1, "{args:?}: {code} {err}");
    }
}

// ---- 2. memory: every allocating path admits its predicted peak first ---------------------

#[test]
fn extrapolation_runs_are_refused_before_allocating() {
    // The 1- and 2-layer runs at batch 512 × seq 1024 need tens of GB: refused by the budget
    // (exit 1) with the report still printed, instead of growing until killed.
    let (code, out, err) = run(
        &[
            "verify",
            "--preset",
            "gpt2",
            "--batch",
            "512",
            "--seq",
            "1024",
            "--extrapolate",
            "--max-memory",
            "4000000000",
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    let j = json_of(out.as_bytes());
    let checks = j["checks"].as_array().unwrap();
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c["pass"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        failed.iter().any(|n| n.contains("--extrapolate")),
        "{failed:?}"
    );
    assert!(err.contains("4,000,000,000"), "{err}");
}

#[test]
fn sweep_beyond_the_budget_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let (code, _, err) = run(
        &[
            "sweep",
            "--preset",
            "baby-gpt",
            "--batch",
            "1,64",
            "--seq",
            "256",
            "--max-memory",
            "1000000",
            "--out",
            s(out.path()),
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1,000,000"), "{err}");
}

// ---- 3. reads: regular files only, under a cap, never hanging ------------------------------

#[test]
fn configs_that_are_not_regular_files_or_too_big_are_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("config.json");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file system entry.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A 2 GiB file of NULs, sparse: no disk is used, and no byte of it may be read or echoed.
    let big = d.path().join("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    for (path, why) in [
        ("/dev/zero", "character device"),
        (s(&fifo), "FIFO"),
        (s(&big), "2147483648 bytes"),
    ] {
        for cmd in ["estimate", "verify", "gpus"] {
            let (code, _, err) = run(&[cmd, "--config", path], &[]);
            assert_eq!(code, 2, "{cmd} {path}: {err}");
            assert!(err.contains(why), "{cmd} {path}: {err}");
            assert!(err.len() < 400, "the message quotes the input: {err}");
        }
    }
    // A folder whose config.json is a FIFO, and an index that is /dev/zero.
    let (code, _, err) = run(&["estimate", "--config", s(d.path())], &[]);
    assert_eq!(code, 2, "{err}");
    let m = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/zero", m.path().join("model.safetensors.index.json")).unwrap();
    let index = m.path().join("model.safetensors.index.json");
    for target in [m.path(), index.as_path()] {
        let (code, _, err) = run(&["inspect", s(target)], &[]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("character device"), "{err}");
    }
}

#[test]
fn control_characters_in_input_never_reach_the_terminal_raw() {
    let (_d, p) = temp_file("esc.json", b"{\"model_type\": \"\\u001b[31mllama\\u0007\"}");
    let (code, _, err) = run(&["estimate", "--config", s(&p)], &[]);
    assert_eq!(code, 2);
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "{err:?}");
    assert!(err.contains("\\u{1b}"), "{err:?}");
}

// ---- 4. stdout closed or full --------------------------------------------------------------

#[test]
fn a_full_stdout_is_an_error_and_a_closed_pipe_ends_quietly() {
    let bin = assert_cmd::cargo::cargo_bin("truesize");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(&bin)
        .args(["estimate", "--preset", "gpt2"])
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A reader that exits at once, as `| true` or `| head -0`.
    let mut child = Command::new(&bin)
        .args(["estimate", "--preset", "llama3-8b"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

// ---- 5. writes: never through a link, nothing left after a signal ---------------------------

#[test]
fn sweep_replaces_a_planted_symlink_instead_of_writing_its_target() {
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for name in ["sweep.csv", "sweep.json", "sweep.svg"] {
        std::os::unix::fs::symlink(&victim, out.join(name)).unwrap();
    }
    let (code, _, err) = run(
        &[
            "sweep",
            "--preset",
            "baby-gpt",
            "--batch",
            "1",
            "--seq",
            "8",
            "--out",
            s(&out),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let csv = std::fs::symlink_metadata(out.join("sweep.csv")).unwrap();
    assert!(csv.is_file(), "sweep.csv is a fresh file");
    // Only the three outputs: no temporary file left beside them.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 3);
}

#[test]
fn sigterm_during_the_checkpoint_write_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = assert_cmd::cargo::cargo_bin("truesize");
    // A model whose checkpoint takes long enough to write that the test sees it appear.
    let mut child = Command::new(&bin)
        .args(["verify", "--preset", "gpt2", "--batch", "1", "--seq", "2"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut seen = false;
    while started.elapsed() < std::time::Duration::from_secs(300) {
        if std::fs::read_dir(tmp.path()).unwrap().next().is_some() {
            seen = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let left: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        seen,
        "the run never wrote a temporary file (status {status:?})"
    );
    assert!(left.is_empty(), "left behind after SIGTERM: {left:?}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
}

#[test]
fn an_unusable_tmpdir_fails_a_check_and_keeps_the_report() {
    let (code, out, err) = run(
        &["verify", "--format", "json"],
        &[("TMPDIR", "/nonexistent/truesize-test")],
    );
    assert_eq!(code, 1, "{err}");
    let j = json_of(out.as_bytes());
    let c = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "checkpoint: file written")
        .expect("the write is a check");
    assert_eq!(c["pass"], false);
    assert!(c["note"].as_str().unwrap().contains("TMPDIR"));
}

// ---- 6. numeric garbage fails ---------------------------------------------------------------

/// A copy of the tiny-gpt2 fixture whose weights `edit` rewrites.
fn edited_fixture(
    edit: impl Fn(&str, candle_core::Tensor) -> candle_core::Tensor,
) -> tempfile::TempDir {
    let src = fixtures().join("tiny-gpt2");
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let edited: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(n, t)| {
            let t = edit(&n, t);
            (n, t)
        })
        .collect();
    candle_core::safetensors::save(&edited, d.path().join("model.safetensors")).unwrap();
    d
}

#[test]
fn non_finite_weights_fail_verify() {
    for bad in [f32::NAN, f32::INFINITY] {
        let d = edited_fixture(|n, t| {
            if n.ends_with("ln_f.weight") {
                (t.ones_like().unwrap() * bad as f64).unwrap()
            } else {
                t
            }
        });
        let (code, out, err) = run(&["verify", "--model", s(d.path()), "--format", "json"], &[]);
        assert_eq!(code, 1, "{bad}: {err}");
        let j = json_of(out.as_bytes());
        assert_eq!(j["pass"], false);
        let failed: Vec<&str> = j["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["pass"] == false)
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(failed.contains(&"loss is finite"), "{bad}: {failed:?}");
    }
}

#[test]
fn integer_weights_fail_the_checkpoint_check() {
    let d = edited_fixture(|n, t| {
        if n.ends_with("c_fc.weight") {
            t.to_dtype(candle_core::DType::I64).unwrap()
        } else {
            t
        }
    });
    for args in [
        vec!["verify", "--model", s(d.path())],
        vec!["verify", "--model", s(d.path()), "--shapes-only"],
        vec!["inspect", s(d.path())],
    ] {
        let (code, out, err) = run(&args, &[]);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            out.contains("floating-point") || err.contains("floating-point"),
            "{args:?}: {out}{err}"
        );
    }
}

#[test]
fn undefined_math_in_a_config_is_bad_input_naming_the_key() {
    for (scaling, key) in [
        (
            r#"{"rope_type": "llama3", "factor": 0}"#,
            "rope_scaling.factor",
        ),
        (
            r#"{"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4}"#,
            "rope_scaling.high_freq_factor",
        ),
        (
            r#"{"rope_type": "llama3", "original_max_position_embeddings": 0}"#,
            "rope_scaling.original_max_position_embeddings",
        ),
    ] {
        let text = format!(
            r#"{{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100, "rope_scaling": {scaling}}}"#
        );
        let (_d, p) = temp_file("config.json", text.as_bytes());
        let (code, _, err) = run(&["verify", "--config", s(&p)], &[]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

// ---- 7. flags that cannot be honoured -------------------------------------------------------

#[test]
fn requests_that_would_be_dropped_are_refused() {
    let tiny = fixtures().join("tiny-gpt2");
    let t = s(&tiny);
    for (args, names) in [
        (
            vec!["verify", "--model", t, "--reference", t, "--shapes-only"],
            "--reference",
        ),
        (
            vec!["verify", "--shapes-only", "--optimizer", "adamw"],
            "--optimizer",
        ),
        (vec!["verify", "--shapes-only", "--repeat", "3"], "--repeat"),
        (
            vec!["verify", "--shapes-only", "--peak-tflops", "100"],
            "--peak-tflops",
        ),
        (
            vec!["verify", "--shapes-only", "--max-memory", "1000"],
            "--max-memory",
        ),
        (
            vec!["verify", "--model", t, "--reference", t, "--seq", "4"],
            "--seq",
        ),
    ] {
        let (code, out, err) = run(&args, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} did work before refusing");
        assert!(err.contains(names), "{args:?}: {err}");
    }
}

// ---- 9. validation first --------------------------------------------------------------------

#[test]
fn bad_flags_are_refused_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    for (args, names) in [
        (vec!["verify", "--peak-tflops", "0"], "--peak-tflops"),
        (vec!["verify", "--batch", "-1"], "--batch"),
        (vec!["estimate", "--seq", "-5"], "--seq"),
        (vec!["sweep", "--batch", "-1"], "--batch"),
        (
            vec!["sweep", "--batch", "1", "--seq", "8", "--out", s(&file)],
            "a-file",
        ),
    ] {
        let (code, out, err) = run(&args, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} did work before refusing");
        assert!(err.contains(names), "{args:?}: {err}");
    }
}

// ---- 10. messages name what the user wrote ----------------------------------------------------

#[test]
fn messages_use_the_users_spelling_and_file() {
    // HF keys, not truesize's internal names.
    let (_d, p) = temp_file(
        "config.json",
        br#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}"#,
    );
    let (code, _, err) = run(&["estimate", "--config", s(&p)], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("num_key_value_heads = 3") && err.contains("num_attention_heads = 4"),
        "{err}"
    );
    assert!(
        !err.contains(" n_kv_head") && !err.contains(" n_head"),
        "{err}"
    );
    // A TOML's own `name` does not hide the file.
    let (_d2, p) = temp_file(
        "odd.toml",
        gpt2_toml(1, Some("x"))
            .replace("n_head = 1", "n_head = 3")
            .as_bytes(),
    );
    let (code, _, err) = run(&["estimate", "--config", s(&p)], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("odd.toml") && err.contains("n_head = 3"),
        "{err}"
    );
}

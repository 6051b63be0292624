//! `truesize sweep` through the binary: a 2×2 grid on baby-gpt writes CSV, JSON and SVG.

mod common;
use common::*;
use predicates::prelude::*;

/// Columns before the six rules' `<key>_bytes,<key>_rel_error` pairs (report::csv).
const FIXED_COLUMNS: usize = 8;
const RULES: [&str; 6] = [
    "truesize",
    "korthikanti_16bit",
    "korthikanti_dtype",
    "weights_x3",
    "weights_x4",
    "weights_grads_adam",
];

/// Every opened element is closed in order; no stray `<`. Enough to catch truncated or
/// interleaved output (plotters writes no comments, CDATA or `<` inside text).
fn assert_well_formed_xml(text: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
        if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
            // declaration or self-closing
        } else if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else {
            let name = tag.split_whitespace().next().expect("tag name");
            stack.push(name.to_string());
        }
        rest = &rest[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
}

#[test]
fn tiny_sweep_writes_csv_json_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sw");
    truesize()
        .args([
            "sweep", "--preset", "baby-gpt", "--batch", "1,2", "--seq", "8,16",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .success()
        .stdout(predicate::str::contains("measured peak"));

    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + 4, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    assert_eq!(header.len(), FIXED_COLUMNS + 2 * RULES.len());
    assert_eq!(
        &header[..4],
        ["batch", "seq", "tokens", "measured_peak_bytes"]
    );
    for k in RULES {
        assert!(header.contains(&format!("{k}_bytes").as_str()), "{k}");
    }
    for (line, (b, t)) in lines[1..].iter().zip([(1, 8), (1, 16), (2, 8), (2, 16)]) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), header.len(), "{line}");
        assert_eq!(
            (cells[0], cells[1]),
            (b.to_string().as_str(), t.to_string().as_str())
        );
        let measured: u64 = cells[3].parse().unwrap();
        // At least the f32 weights and their gradients.
        assert!(measured > 2 * 3_481_088 * 4, "{line}");
    }

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(json["command"], "sweep");
    assert_eq!(json["params"], 3_481_088);
    let points = json["points"].as_array().unwrap();
    assert_eq!(points.len(), 4);
    assert_eq!(points[0]["rules"].as_array().unwrap().len(), RULES.len());
    // More tokens, more memory.
    assert!(points[3]["measured_peak_bytes"].as_u64() > points[0]["measured_peak_bytes"].as_u64());

    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    assert_well_formed_xml(&svg);
    for name in [
        "measured, seq 8",
        "truesize predicted, seq 16",
        "Korthikanti (f32, no dropout), seq 8",
        "3 × weights",
        "4 × weights",
        "weights + grads + Adam",
        "batch size",
        "peak memory above baseline (MiB)",
    ] {
        assert!(svg.contains(name), "SVG lacks {name:?}");
    }
}

#[test]
fn bad_lists_exit_2_and_name_the_flag() {
    for (flag, value) in [
        ("--batch", "1,x"),
        ("--batch", "0"),
        ("--seq", "1"),
        ("--seq", "100000"),
    ] {
        truesize()
            .args(["sweep", flag, value, "--out"])
            .arg(std::env::temp_dir().join("truesize-sweep-never-written"))
            .assert()
            .code(2)
            .stderr(predicate::str::contains(
                if flag == "--seq" && value == "100000" {
                    "seq"
                } else {
                    flag
                },
            ));
    }
}

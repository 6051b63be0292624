//! Checkpoint header reader: `inspect::read_header` on the fuzz input written as a
//! `model.safetensors`; when the header is valid, the whole `inspect` (comparison with a tiny
//! GPT-2 config and the report sections) runs on it too. Any panic is a bug: hostile
//! checkpoints must be `Err` (exit 2).
//!
//! `read_header` takes a path (it reads only 8 + n bytes of the file and stats its length), so
//! each input is written to a per-process folder on tmpfs; the file length is the input's.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A tiny GPT-2 (d = 4, 2 heads, 1 layer, vocab 8, 8 positions, tied head): its checkpoint is a
/// few hundred bytes, so fuzzed files that pass the header checks reach the config comparison.
const CONFIG_JSON: &str = r#"{"model_type": "gpt2", "vocab_size": 8, "n_positions": 8,
"n_embd": 4, "n_layer": 1, "n_head": 2, "tie_word_embeddings": true}"#;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("truesize-fuzz-header-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch folder");
        std::fs::write(d.join("config.json"), CONFIG_JSON).expect("fuzz config.json");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let file = d.join("model.safetensors");
    std::fs::write(&file, data).expect("write fuzz input");
    let Ok(h) = truesize::checkpoint::safetensors::read_header(&file) else {
        return;
    };
    // Invariants of a header that passed: the data section is tiled exactly.
    assert_eq!(h.file_bytes, data.len() as u64);
    assert_eq!(8 + h.header_bytes + h.data_bytes, h.file_bytes);
    let covered: u64 = h.entries.iter().map(|t| t.bytes).sum();
    assert_eq!(
        covered, h.data_bytes,
        "tensors do not tile the data section"
    );
    // The folder (with its config.json) and the bare file, as `truesize inspect` would see them.
    let inspect = |path: &std::path::Path, cfg: Option<&std::path::Path>| {
        use truesize::cmd::inspect::{report, Plan};
        if let Ok(plan) = Plan::new(path.to_path_buf(), cfg, truesize::cli::Format::Table) {
            if let Ok(r) = report(&plan) {
                let _ = truesize::report::inspect::sections(&r);
            }
        }
    };
    for cfg in [None, Some(d.join("config.json"))] {
        inspect(d, cfg.as_deref());
    }
    inspect(&file, None);
});

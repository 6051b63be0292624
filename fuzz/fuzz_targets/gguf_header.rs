//! GGUF header reader: `checkpoint::gguf::parse_bytes` on the fuzz input; when the header is
//! valid, the file-based path that `truesize inspect` and `infer --model` take runs too (the
//! same bytes written to a file: header read, config mapped from the metadata, the structure
//! compared with the genuine model, and candle's own GGUF reader opened on the validated file).
//! Any panic is a bug: hostile GGUF files must be `Err` (exit 2), and no claimed count or length
//! may be allocated before it is checked against the bytes left in the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use truesize::checkpoint::{gguf, gguf_inspect};

fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("truesize-fuzz-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch folder");
        d.join("model.gguf")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(h) = gguf::parse_bytes(data) else {
        return;
    };
    // Invariants of a header that passed: the parts add up to the file.
    assert_eq!(h.file_bytes, data.len() as u64);
    assert_eq!(
        h.header_bytes + h.padding_bytes + h.data_bytes + h.trailing_bytes,
        h.file_bytes
    );
    assert!(h.data_offset.is_multiple_of(h.alignment));
    let by_type: u64 = h.by_type().values().map(|c| c.bytes).sum();
    assert_eq!(by_type, h.data_bytes);
    let f = file();
    std::fs::write(f, data).expect("write fuzz input");
    let _ = gguf_inspect::inspect(f).map(|r| truesize::report::gguf::sections(&r));
    if let Ok(cfg) = gguf::config_from_header(&h) {
        let _ = truesize::estimate::serve::weights::gguf_layout(&cfg);
        // candle's reader on a file ours accepted must not panic either.
        let _ = gguf::GgufFile::open(f, &cfg);
    }
});

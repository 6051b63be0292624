//! truesize TOML: `config::toml::parse` → `validate` → `estimate::params::estimate` → the whole
//! estimate report. Any panic is a bug: hostile configs must be `Err` (exit 2).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    truesize_fuzz::estimate_everything(truesize::config::toml::parse(text, "fuzz"));
});

//! The census: what the genuine model (or its shape-only build) holds.

use crate::report::section::{s, Section};
use crate::report::sizing::Report;
use crate::units::{group, Bytes};

pub fn census(r: &Report) -> Option<Section> {
    let c = r.census.as_ref()?;
    let mut rows = vec![
        vec![s("tensors"), group(c.tensors as u64)],
        vec![s("numel"), group(c.numel)],
        vec![
            s("dtype (element bytes)"),
            format!("{} ({})", c.dtype, c.element_bytes),
        ],
        vec![s("bytes (numel × element)"), Bytes(c.bytes).to_string()],
    ];
    if let Some(sb) = c.storage_bytes {
        rows.push(vec![s("storage buffers (real)"), Bytes(sb).to_string()]);
    }
    Some(Section {
        title: if c.shapes_only {
            "Census (shape-only: names and shapes, nothing allocated)".into()
        } else {
            "Census of the genuine model".into()
        },
        header: vec![s("measure"), s("value")],
        rows,
        notes: c
            .unclassified
            .iter()
            .map(|n| format!("unclassified tensor: {n}"))
            .collect(),
    })
}

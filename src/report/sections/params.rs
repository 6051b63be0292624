//! Parameters: per component (estimate beside census), where the 12·d² rule differs, bytes
//! per storage format.

use crate::estimate::params::{rough_applies, Component};
use crate::report::section::{bytes_cells, s, signed_group, Section};
use crate::report::sizing::Report;
use crate::units::{group, percent};

/// Per component, the estimate beside the census when there is one.
pub fn parameters(r: &Report) -> Section {
    let m = &r.model;
    let p = &r.params;
    let mut header = vec![s("component"), s("estimate (params)")];
    if r.census.is_some() {
        header.push(s("census (numel)"));
    }
    header.push(s("share"));
    let mut rows = Vec::new();
    for c in Component::ALL {
        let e = p.get(c);
        let got = r.census.as_ref().map(|cs| cs.get(c));
        if e == 0 && got.unwrap_or(0) == 0 && !(c == Component::LmHead && m.tie_embeddings) {
            continue;
        }
        let mut row = vec![
            if c == Component::LmHead && m.tie_embeddings {
                s("lm_head (tied: shares embed_tokens)")
            } else {
                s(c.name())
            },
            group(e),
        ];
        if let Some(g) = got {
            row.push(group(g));
        }
        row.push(format!("{:.2}%", 100.0 * e as f64 / p.total.max(1) as f64));
        rows.push(row);
    }
    let mut total = vec![s("total"), group(p.total)];
    if let Some(cs) = &r.census {
        total.push(group(cs.numel));
    }
    total.push(s("100%"));
    rows.push(total);
    let mut notes = vec![format!(
        "non-embedding (Kaplan's N: without token/position embeddings): {}",
        group(p.non_embedding)
    )];
    if m.is_moe() {
        notes.push(format!(
            "active per token ({} of {} experts): {}",
            m.n_experts_per_tok,
            m.n_experts,
            group(p.active_per_token)
        ));
    }
    Section {
        title: "Parameters (exact; tied weights counted once)".into(),
        header,
        rows,
        notes,
    }
}

/// The 12·d² rule beside the exact count, term by term; `full` lists why its assumptions fail.
pub fn rule_gap(r: &Report, full: bool) -> Section {
    let p = &r.params;
    let mut notes = vec![format!(
        "12·d² rule (vocab + block)·d + 12·d²·L = {}  vs exact {}: {}{}",
        group(p.rough_12d2),
        group(p.total),
        percent(p.rough_rel_error),
        if p.rough_applies {
            " (its assumptions hold here)"
        } else {
            " (its assumptions do not hold here)"
        }
    )];
    if full {
        for why in rough_applies(&r.model) {
            notes.push(format!("  - {why}"));
        }
    }
    Section {
        title: "Where the 12·d² rule differs".into(),
        header: vec![s("term"), s("exact − rule (params)"), s("why")],
        rows: p
            .rough_gap
            .iter()
            .map(|g| vec![s(g.term), signed_group(g.delta), g.why.clone()])
            .collect(),
        notes,
    }
}

/// Weights at the naive width of each storage format.
pub fn weight_formats(r: &Report) -> Section {
    Section {
        title: "Weights by storage format (naive width, no quantisation scales)".into(),
        header: vec![s("format"), s("bits"), s("bytes"), s("binary")],
        rows: r
            .weights
            .iter()
            .map(|w| {
                let [b, h] = bytes_cells(w.bytes.0);
                vec![s(w.format), s(w.bits), b, h]
            })
            .collect(),
        notes: vec![],
    }
}
